"""normkit: batch normalization and its whole family for PyTorch -- exact, fast, and hard to misuse."""

from . import compat, diagnostics, distributed, functional, nn, tools
from .diagnostics import Monitor, Report, doctor
from .nn import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    SyncBatchNorm,
    norm_layer,
)

__version__ = "0.1.0"

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "Monitor",
    "Report",
    "SyncBatchNorm",
    "__version__",
    "compat",
    "diagnostics",
    "distributed",
    "doctor",
    "functional",
    "nn",
    "norm_layer",
    "tools",
]
