"""normkit: batch normalization and its whole family for PyTorch -- exact, fast, and hard to misuse."""

from . import compat, functional, nn
from .nn import BatchNorm1d, BatchNorm2d, BatchNorm3d

__version__ = "0.1.0"

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "__version__", "compat", "functional", "nn"]
