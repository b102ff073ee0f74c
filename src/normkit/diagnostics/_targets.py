"""Turning a TARGET (``file.py:factory``, ``package.module:factory`` or a checkpoint file) into a model, safely."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import warnings
from pathlib import Path

from torch import nn


class TargetError(ValueError):
    """A TARGET that cannot be turned into a model: what was expected, what came, and the fix."""


def load_model(target: str | Path, *, allow_unsafe: bool = False) -> nn.Module:
    """The model a TARGET names, as ``normkit doctor TARGET`` loads it.

    A checkpoint is always read with ``torch.load(weights_only=True)``, which cannot run code. A file holding a
    pickled model object (``torch.save(model, path)``) needs ``allow_unsafe=True`` (``--unsafe-load`` on the
    command line): unpickling it can run any code embedded in the file, so do that only for files you trust.

    Args:
        target: ``path/to/file.py:factory`` or ``package.module:factory`` (a callable returning the model, called
            with no arguments), or the path of a checkpoint file holding a whole model.
        allow_unsafe: load a pickled model with ``weights_only=False`` (warns ``UserWarning`` that it runs code
            from the file). Default ``False``.

    Returns:
        The ``nn.Module``.

    Raises:
        TargetError: (a ``ValueError``) for a malformed TARGET, a file that does not exist, a factory whose import
            or call raises (``SyntaxError`` and ``SystemExit`` included), a result that is not a module, a file that
            is not a torch checkpoint, a state dict without its model, or a pickled model without
            ``allow_unsafe=True``.

    Examples::

        >>> from normkit.diagnostics import load_model
        >>> type(load_model("torch.nn:Identity")).__name__
        'Identity'
        >>> load_model("no-colon-here")
        Traceback (most recent call last):
        ...
        normkit.diagnostics._targets.TargetError: TARGET: expected path/to/file.py:factory, \
package.module:factory or an existing checkpoint file, got 'no-colon-here'
    """
    text = str(target)
    path = Path(text)
    if path.is_file():
        return _load_checkpoint(path, allow_unsafe)
    if path.is_dir():
        raise TargetError(f"TARGET: expected a checkpoint file or file.py:factory, got the directory {text!r}")
    source, colon, name = text.rpartition(":")
    if not colon or not source or not name:
        raise TargetError(f"TARGET: expected path/to/file.py:factory, package.module:factory or an existing "
                          f"checkpoint file, got {text!r}")
    factory = _import_attribute(source, name)
    if not callable(factory):
        raise TargetError(f"TARGET: expected {name!r} in {source} to be a callable returning a model, got "
                          f"{type(factory).__name__}")
    model = _guarded(f"calling {source}:{name}()", factory)
    if not isinstance(model, nn.Module):
        raise TargetError(f"TARGET: expected {source}:{name}() to return an nn.Module, got {type(model).__name__}")
    return model


def _guarded(what: str, action):
    """``action()``, with anything it raises (a syntax error, ``sys.exit``, Ctrl-C excepted) as a TargetError."""
    try:
        return action()
    except TargetError:
        raise
    except SystemExit as exc:
        raise TargetError(f"TARGET: {what} called sys.exit({exc.code!r}); a target must define the model without "
                          "exiting (guard script code with `if __name__ == '__main__':`)") from exc
    except SyntaxError as exc:
        raise TargetError(f"TARGET: {what} failed: SyntaxError in {exc.filename}, line {exc.lineno}: {exc.msg}; "
                          "fix the file") from exc
    except Exception as exc:  # the target's own failure is a bad TARGET, not a doctor finding
        raise TargetError(f"TARGET: {what} raised {type(exc).__name__}: {exc}") from exc


def _import_attribute(source: str, name: str):
    if source.endswith(".py") or Path(source).is_file():
        module = _import_file(Path(source))
    else:
        added = str(Path.cwd()) not in sys.path
        if added:  # as `python -m` does, so that the console script finds modules in the working directory
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = _guarded(f"importing {source}", lambda: _import_module(source))
        finally:
            if added:
                sys.path.remove(str(Path.cwd()))
    if not hasattr(module, name):
        raise TargetError(f"TARGET: expected {source} to define {name!r}; it does not")
    return getattr(module, name)


def _import_module(source: str):
    try:
        return importlib.import_module(source)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (source == exc.name or source.startswith(exc.name + ".")):
            raise  # the module exists; something it imports does not: its own failure
        raise TargetError(f"TARGET: expected an importable module {source!r}, got ModuleNotFoundError: {exc} "
                          "(run from the folder that holds it, or install it)") from exc


def _import_file(path: Path):
    if not path.is_file():
        raise TargetError(f"TARGET: expected a Python file, {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"_normkit_doctor_target_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)  # so that the file can import its neighbours
    try:
        _guarded(f"importing {path}", lambda: spec.loader.exec_module(module))
    finally:
        sys.path.remove(folder)
    return module


def _load_checkpoint(path: Path, allow_unsafe: bool) -> nn.Module:
    import torch

    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        if not _holds_pickled_objects(exc):
            raise TargetError(f"TARGET: expected a torch checkpoint or file.py:factory, {path} is not a checkpoint "
                              f"(torch.load: {_not_a_checkpoint(exc)})") from exc
        if not allow_unsafe:
            raise TargetError(
                f"TARGET: {path} holds pickled Python objects (e.g. a model saved with torch.save(model, path)), "
                "which torch.load(weights_only=True) refuses because unpickling can run code embedded in the file "
                f"(torch: {_refused_global(exc)}). "
                "If you trust the file, pass --unsafe-load (allow_unsafe=True); better, save a state_dict and pass "
                "file.py:factory") from exc
        warnings.warn(f"loading {path} with torch.load(weights_only=False): this runs any code embedded in the "
                      "file; do it only for files you trust", UserWarning, stacklevel=3)
        loaded = _guarded(f"torch.load({str(path)!r}, weights_only=False)",
                          lambda: torch.load(path, map_location="cpu", weights_only=False))
    if not isinstance(loaded, nn.Module):
        raise TargetError(f"TARGET: expected {path} to hold a whole model, got {type(loaded).__name__} (a state "
                          "dict needs its model: pass file.py:factory that builds the model and loads it)")
    return loaded


def _holds_pickled_objects(exc: Exception) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a valid pickle for its globals (not a broken file)."""
    text = str(exc)
    return "Weights only load failed" in text and ("unsupported global" in text.lower()
                                                   or "unrecognized function" in text.lower())


def _refused_global(exc: Exception) -> str:
    """What ``weights_only=True`` refused, from torch's message (``GLOBAL module.name``)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(exc))
    return f"it refused {found.group(1)}" if found else "it refused an object it does not allow"


def _not_a_checkpoint(exc: Exception) -> str:
    """torch's reason, without its advice to retry with ``weights_only=False`` (wrong for a broken file)."""
    cause = exc.__cause__ or exc.__context__
    reason = cause if isinstance(cause, Exception) and "Weights only load failed" in str(exc) else exc
    return f"{type(reason).__name__}: {_first_line(reason)}"


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"
