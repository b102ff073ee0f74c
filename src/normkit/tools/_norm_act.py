"""Batch norms that carry an activation, as the tools see them: normkit's ``BatchNormAct``/``SyncBatchNormAct``
(an ``act`` string and a ``residual`` argument) and timm's ``BatchNormAct2d`` layout (``drop`` and ``act`` modules,
recognised by duck typing, never imported)."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d
from ..nn.frozen import FrozenBatchNorm, rank_of
from ..nn.frozen_act import _BY_RANK as FROZEN_ACT_BY_RANK
from ..nn.frozen_act import FrozenBatchNormDropAct, _FrozenActMixin
from ..nn.norm_layer import FROZEN, NormAct
from ..nn.residual_act import ResidualAct
from ..nn.syncbatchnorm_act import SyncBatchNormAct

# normkit's trainable batch norms with an activation (exact types: a subclass may change what forward does).
NORMKIT_ACT_NORMS = (BatchNormAct1d, BatchNormAct2d, BatchNormAct3d, SyncBatchNormAct)
# The torch activation module of each of normkit's activations (in place where the layer applies it in place).
TORCH_ACTIVATIONS = {"relu": lambda: torch.nn.ReLU(inplace=True), "silu": lambda: torch.nn.SiLU(inplace=True),
                     "gelu": lambda: torch.nn.GELU()}


def is_normkit_act(module: torch.nn.Module) -> bool:
    """normkit's ``BatchNormAct1d/2d/3d`` or ``SyncBatchNormAct`` (exact types), or their frozen forms."""
    return type(module) in NORMKIT_ACT_NORMS or isinstance(module, _FrozenActMixin)


def is_drop_act(module: torch.nn.Module) -> bool:
    """A batch norm in timm's ``BatchNormAct2d`` layout: a ``_BatchNorm`` subclass (not normkit's) with ``act`` and
    ``drop`` submodules and ``forward(x) = act(drop(bn(x)))``, or its frozen form
    :class:`normkit.nn.FrozenBatchNormDropAct`. The forward is taken on trust from the attribute names (timm's
    ``BatchNormAct2d`` and ``SyncBatchNormAct``)."""
    if isinstance(module, FrozenBatchNormDropAct):
        return True
    return (isinstance(module, _BatchNorm) and not isinstance(module, NORMKIT_ACT_NORMS)
            and isinstance(getattr(module, "act", None), torch.nn.Module)
            and isinstance(getattr(module, "drop", None), torch.nn.Module))


def carries_activation(module: torch.nn.Module) -> bool:
    return is_normkit_act(module) or is_drop_act(module)


def describe_activation(module: torch.nn.Module) -> str:
    """``"act='relu'"`` or ``"drop=Identity, act=SiLU"``: what a plain replacement would drop."""
    if is_normkit_act(module):
        return f"act={module.act!r}"
    return f"drop={type(module.drop).__name__}, act={type(module.act).__name__}"


def frozen(module: torch.nn.Module, dim: int | None = None) -> FrozenBatchNorm:
    """The frozen form of a batch norm that keeps what it adds; ``dim`` is the rank of a rank-free layer
    (``SyncBatchNorm``), ``None`` for the rank-free frozen class."""
    if is_drop_act(module):
        return FrozenBatchNormDropAct.from_batch_norm(module)
    rank = rank_of(module) or dim
    table = FROZEN_ACT_BY_RANK if is_normkit_act(module) else {None: FrozenBatchNorm, **FROZEN}
    return table[rank].from_batch_norm(module)


def fold_remnant(bn: torch.nn.Module) -> torch.nn.Module:
    """What stands where ``bn`` stood once its affine map is folded into the layer before it: ``nn.Identity`` for
    a plain batch norm, :class:`normkit.nn.ResidualAct` (same ``residual`` argument) for normkit's activation
    layers, :class:`normkit.nn.NormAct` ``(Identity, act, drop)`` with the layer's own modules for timm's layout."""
    if is_normkit_act(bn):
        remnant = ResidualAct(bn.act)
    elif is_drop_act(bn):
        remnant = NormAct(torch.nn.Identity(), bn.act, bn.drop)
    else:
        return torch.nn.Identity()
    remnant.training = bn.training
    return remnant


def torch_equivalent(module: torch.nn.Module, plain: torch.nn.Module) -> torch.nn.Module:
    """``plain`` (torch's batch norm sharing ``module``'s state) followed by the torch activation of ``module``:
    ``nn.Sequential(plain, ReLU/SiLU/GELU)``, or ``plain`` alone for ``act=None``."""
    if module.act is None:
        return plain
    sequential = torch.nn.Sequential(plain, TORCH_ACTIVATIONS[module.act]())
    sequential.training = module.training
    return sequential
