"""Modules: torch names, torch constructor arguments, torch state_dicts."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .norm_layer import norm_layer
from .syncbatchnorm import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "SyncBatchNorm",
    "norm_layer",
]
