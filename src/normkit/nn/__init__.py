"""Modules: torch names, torch constructor arguments, torch state_dicts."""

from .batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d
from .batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from .cross_iteration import CrossIterationBatchNorm2d
from .frozen import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from .frozen_act import (
    FrozenBatchNormAct,
    FrozenBatchNormAct1d,
    FrozenBatchNormAct2d,
    FrozenBatchNormAct3d,
    FrozenBatchNormDropAct,
)
from .ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d
from .instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from .norm_layer import NormAct, norm_factory, norm_layer
from .normalization import GroupNorm, LayerNorm
from .residual_act import ResidualAct
from .scaled_std_conv import ScaledStdConv2d
from .streaming import StreamingBatchNorm1d, StreamingBatchNorm2d, StreamingBatchNorm3d
from .syncbatchnorm import SyncBatchNorm
from .syncbatchnorm_act import SyncBatchNormAct

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormAct1d",
    "BatchNormAct2d",
    "BatchNormAct3d",
    "BatchRenorm1d",
    "BatchRenorm2d",
    "BatchRenorm3d",
    "CrossIterationBatchNorm2d",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "FrozenBatchNormAct",
    "FrozenBatchNormAct1d",
    "FrozenBatchNormAct2d",
    "FrozenBatchNormAct3d",
    "FrozenBatchNormDropAct",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "GhostBatchNorm3d",
    "GroupNorm",
    "InstanceNorm1d",
    "InstanceNorm2d",
    "InstanceNorm3d",
    "LayerNorm",
    "NormAct",
    "ResidualAct",
    "ScaledStdConv2d",
    "StreamingBatchNorm1d",
    "StreamingBatchNorm2d",
    "StreamingBatchNorm3d",
    "SyncBatchNorm",
    "SyncBatchNormAct",
    "norm_factory",
    "norm_layer",
]
