"""Output paths of the ``normkit`` command, checked before any training so that a bad one costs no run."""

from __future__ import annotations

import tempfile
from pathlib import Path


class OutputPathError(ValueError):
    """An output path the command cannot write: what was expected, what is there, and the fix."""


def prepare_dir(path: Path, flag: str) -> Path:
    """Create the folder ``path`` (and its parents) and check that a file can be written in it.

    Args:
        path: the folder the command will write into.
        flag: the option that named it (``"--out"``), for the message.

    Returns:
        ``path``.

    Raises:
        OutputPathError: when ``path`` or one of its parents is a file, or the folder cannot be created or written.

    Examples::

        >>> import tempfile
        >>> from pathlib import Path
        >>> folder = Path(tempfile.mkdtemp()) / "runs" / "a"
        >>> prepare_dir(folder, "--out").is_dir()
        True
    """
    blocker = _file_on_the_way(path)
    if blocker is not None:
        what = "is a file" if blocker == path else f"lies under {blocker}, which is a file"
        raise OutputPathError(f"{flag}: expected a folder to write into, but {path} {what}; pass another folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise OutputPathError(f"{flag}: expected a folder that can be written, but {path} cannot be "
                              f"({exc.strerror or exc}); pass a writable folder") from exc
    return path


def prepare_file(path: Path, flag: str) -> Path:
    """Check that the file ``path`` can be written (creating its folder), without creating the file itself.

    Args:
        path: the file the command will write.
        flag: the option that named it (``"--json"``), for the message.

    Returns:
        ``path``.

    Raises:
        OutputPathError: when ``path`` is a folder, or its folder cannot be created or written.
    """
    if path.is_dir():
        raise OutputPathError(f"{flag}: expected a file path, but {path} is a folder; pass a file name such as "
                              f"{path / 'result.json'}")
    prepare_dir(path.parent if str(path.parent) else Path("."), flag)
    if path.exists() and not _can_append(path):
        raise OutputPathError(f"{flag}: expected a writable file, but {path} cannot be written; pass another path")
    return path


def _file_on_the_way(path: Path) -> Path | None:
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            return candidate if not candidate.is_dir() else None
    return None


def _can_append(path: Path) -> bool:
    try:
        with path.open("ab"):
            return True
    except OSError:
        return False
