"""``SyncBatchNormAct``: ``SyncBatchNorm``, an optional residual and an activation (the synchronised
``BatchNormAct``)."""

from __future__ import annotations

import torch

from . import _scripting
from .batchnorm_act import _BatchNormActMixin
from .syncbatchnorm import SyncBatchNorm


class SyncBatchNormAct(SyncBatchNorm):
    r"""Batch normalization over the union of the ranks' batches, then an optional residual and an activation.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta
        + \mathrm{residual}\Big)

    What :func:`normkit.tools.sync` turns a :class:`normkit.nn.BatchNormAct2d` (1d, 3d) into: a
    :class:`normkit.nn.SyncBatchNorm` (same arguments, statistics, collectives, state_dict and fault detection)
    whose ``forward(input, residual=None)`` then adds the residual and applies the activation, as
    ``BatchNormAct`` does (the statistics are those of the normalized input, before the residual). Without a
    process group, in eval or with world size 1 it computes exactly what ``BatchNormAct`` computes on the CPU path
    (one Triton kernel is not used here: the batch norm runs first, the residual and activation after).

    Args:
        num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype, bias, running_var,
        nonfinite: as :class:`normkit.nn.SyncBatchNorm`.
        act: ``"relu"`` (default), ``"silu"``, ``"gelu"`` (exact, erf) or ``None`` (identity).

    Shape:
        - Input: :math:`(N, C, +)`; ``N`` may differ between ranks and be 0; ``residual``: ``None`` or the input's
          shape, dtype and device. Output: same as input.

    Examples::

        >>> import torch, normkit, normkit.tools
        >>> model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), normkit.BatchNormAct2d(4, act="silu"))
        >>> normkit.tools.sync(model)[1]
        SyncBatchNormAct(4, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True, act='silu')
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, act: str | None = "relu", running_var: str = "unbiased",
                 nonfinite: str = "skip") -> None:
        _BatchNormActMixin._check_act(act)  # before anything is allocated
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias, running_var=running_var, nonfinite=nonfinite)
        self.act = act

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        _BatchNormActMixin._check_residual(self, input, residual)  # before the collectives: nothing changes
        return _BatchNormActMixin._add_residual_and_act(self, super().forward(input), residual)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "its forward adds a residual and an activation that torch's SyncBatchNorm "
                                  "does not have")


__all__ = ["SyncBatchNormAct"]
