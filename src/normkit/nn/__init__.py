"""Modules: torch names, torch constructor arguments, torch state_dicts."""

from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
