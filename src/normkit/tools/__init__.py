"""Model tools: functions ``f(model, ...) -> model`` that recurse over the submodules and share their state."""

from .convert import convert
from .sync import sync

__all__ = ["convert", "sync"]
