"""Model tools: functions ``f(model, ...) -> model`` that recurse over the submodules and share their state."""

from .adapt import adapt
from .agc import adaptive_clip_grad
from .convert import convert
from .fold import FoldReport, fold
from .freeze import freeze, unfreeze
from .param_groups import param_groups
from .recalibrate import recalibrate
from .sync import sync

__all__ = [
    "FoldReport",
    "adapt",
    "adaptive_clip_grad",
    "convert",
    "fold",
    "freeze",
    "param_groups",
    "recalibrate",
    "sync",
    "unfreeze",
]
