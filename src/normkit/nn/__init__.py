"""Modules: torch names, torch constructor arguments, torch state_dicts."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .syncbatchnorm import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"]
