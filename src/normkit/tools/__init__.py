"""Model tools: functions ``f(model, ...) -> model`` that recurse over the submodules and share their state."""

from .convert import convert
from .freeze import freeze, unfreeze
from .param_groups import param_groups
from .sync import sync

__all__ = ["convert", "freeze", "param_groups", "sync", "unfreeze"]
