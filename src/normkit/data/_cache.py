"""Where normkit caches generated data, and an atomic ``.npz`` write that never leaves a half-written file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np


def cache_dir() -> Path:
    """The directory where normkit caches generated datasets.

    ``$NORMKIT_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/normkit``, else ``~/.cache/normkit``. It is created only
    when something is written to it.

    Returns:
        The directory (``~`` expanded).

    Examples:
        >>> isinstance(cache_dir(), Path)
        True
    """
    explicit = os.environ.get("NORMKIT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "normkit"


def load_arrays(path: Path, names: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The arrays ``names`` of the ``.npz`` at ``path``, or ``None`` if it is missing, unreadable or incomplete."""
    try:
        with open(path, "rb") as file, np.load(file, allow_pickle=False) as archive:  # we own the file handle
            return {name: archive[name] for name in names}
    except Exception:  # missing, truncated, not a zip, a key missing: all mean "regenerate"
        return None


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> bool:
    """Write ``arrays`` to ``path`` atomically (temporary file in the same directory, then rename).

    Returns:
        ``True`` if written, ``False`` if the directory is not writable (the caller goes on without a cache).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    except OSError:
        return False
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)
        os.replace(temporary, path)
        return True
    except OSError:
        Path(temporary).unlink(missing_ok=True)
        return False
