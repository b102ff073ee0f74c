"""On-disk cache of tuned launch configs: ``key -> config dict``, one JSON file per Triton version and device.

Generic: no triton import and no knowledge of any kernel. The tuner (``_tuning``) stores the winner of a timed
choice here, so other processes (DDP ranks, later runs) reuse it instead of timing again and every process computes
a tuned shape with the same config (bitwise-identical results). The batch-norm kernels may use it the same way.

The file is ``$NORMKIT_CACHE_DIR/tuning-<triton version>-<device name>.json`` (default folder
``~/.cache/normkit``), a JSON object ``{"format": 1, "entries": {key: config}}``. Writes are atomic (a temporary
file in the same folder, then ``os.replace``) under an advisory lock where the platform has ``fcntl``; the first
config stored for a key wins (:func:`store` returns the one kept), so ranks that tuned at the same time still
agree. An unreadable or malformed file is ignored with a ``RuntimeWarning`` (and replaced by the next store).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

CACHE_DIR_ENV = "NORMKIT_CACHE_DIR"
FORMAT = 1
_LOADED: dict[Path, dict[str, dict]] = {}  # path -> entries, read once per process


def cache_dir() -> Path:
    """The cache folder: ``$NORMKIT_CACHE_DIR`` when set, else ``~/.cache/normkit``."""
    folder = os.environ.get(CACHE_DIR_ENV)
    return Path(folder) if folder else Path.home() / ".cache" / "normkit"


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", name).strip("_") or "unknown"


def cache_path(triton_version: str, device_name: str) -> Path:
    """The cache file of one Triton version and device kind.

    Args:
        triton_version: e.g. ``triton.__version__``.
        device_name: e.g. ``torch.cuda.get_device_name()``; characters other than letters, digits and ``._+-``
            become ``_``.
    """
    return cache_dir() / f"tuning-{_safe(triton_version)}-{_safe(device_name)}.json"


def _parse(text: str) -> dict[str, dict]:
    """The entries of a cache file's text; ``ValueError`` when it is not a cache file of this format."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        raise ValueError(f"not a format-{FORMAT} normkit tuning cache")
    entries = data["entries"]
    if not all(isinstance(k, str) and isinstance(v, dict) for k, v in entries.items()):
        raise ValueError("an entry is not a key -> config object")
    return entries


def read(path: Path) -> dict[str, dict]:
    """The entries stored in ``path`` (``{}`` when the file is missing; ignored with a warning when corrupt).

    Args:
        path: a cache file (:func:`cache_path`).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except OSError as error:
        warnings.warn(f"normkit: ignoring the tuning cache {path}: {error}", RuntimeWarning, stacklevel=2)
        return {}
    try:
        return _parse(text)
    except ValueError as error:  # json.JSONDecodeError is a ValueError
        warnings.warn(f"normkit: ignoring the corrupted tuning cache {path} ({error}); it is rewritten on the "
                      "next tuning", RuntimeWarning, stacklevel=2)
        return {}


def lookup(path: Path, key: str) -> dict | None:
    """The config stored under ``key``, or ``None``; the file is read once per process (then kept in memory).

    Args:
        path: a cache file (:func:`cache_path`).
        key: what the config was tuned for (kernel and shape class).
    """
    path = Path(path)
    if path not in _LOADED:
        _LOADED[path] = read(path)
    return _LOADED[path].get(key)


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive advisory lock on ``path``'s sidecar ``.lock`` file (no lock where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace alone
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _write(path: Path, entries: dict[str, dict]) -> None:
    """Writes ``entries`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"format": FORMAT, "entries": entries}, handle, indent=1, sort_keys=True)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def store(path: Path, key: str, config: dict, *, valid: Callable[[dict], bool] | None = None) -> dict:
    """Stores ``config`` under ``key`` unless the file already holds a valid one; returns the config kept.

    The file is re-read under the lock first, so entries other processes wrote meanwhile are kept and a key that
    another process stored first keeps its config (every process then uses that one). A cache that cannot be
    written (read-only folder) only warns: the config is still used by this process.

    Args:
        path: a cache file (:func:`cache_path`); its folder is created.
        key: what the config was tuned for.
        config: a JSON-serialisable dict (e.g. ``{"num_warps": 8}``).
        valid: whether an existing entry may be kept (default: any); an invalid one is replaced.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(path):
            entries = read(path)
            kept = entries.get(key)
            if kept is None or (valid is not None and not valid(kept)):
                kept = entries[key] = dict(config)
                _write(path, entries)
    except OSError as error:
        warnings.warn(f"normkit: could not write the tuning cache {path}: {error}", RuntimeWarning, stacklevel=2)
        entries = dict(_LOADED.get(path, {}))
        kept = entries[key] = dict(config)
    _LOADED[path] = entries
    return kept


def clear_memory() -> None:
    """Forgets the files read by this process (the next :func:`lookup` reads them again); for tests."""
    _LOADED.clear()
