"""``GhostBatchNorm1d/2d/3d``: normkit's BatchNorm with ghost (virtual) batches in training (Hoffer et al. 2017)."""

from __future__ import annotations

import math

import torch

from ..functional import _checks, _stats
from ..functional.ghost_batch_norm import GROUPINGS, _ghost_batch_norm, require_virtual_batch_size
from . import _scripting
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d


class _GhostMixin:
    """The ghost-batch forward on top of normkit's ``BatchNorm*d`` (same parameters, buffers and state_dict)."""

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "torch has no ghost batch norm layer to run in its place")

    def _init_ghost(self, virtual_batch_size: int, grouping: str) -> None:
        self.virtual_batch_size = virtual_batch_size
        self.grouping = grouping

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, virtual_batch_size={self.virtual_batch_size}, grouping={self.grouping!r}"

    def _updates_this_call(self, batch: int) -> int:
        """Running updates of a training call: one per ghost batch (contiguous) or one (strided)."""
        if self.grouping == "strided":
            return 1
        return max(1, math.ceil(batch / self.virtual_batch_size))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        running_mean, running_var, uses_batch_stats = self._buffers_for_call()
        tracks = self._tracks_this_call()
        updates = self._updates_this_call(input.shape[0]) if uses_batch_stats else 1
        if self.momentum is not None:
            momentum = [self.momentum] * updates
        elif tracks:  # momentum=None: the cumulative average over every running update so far
            seen = int(self.num_batches_tracked)
            momentum = [_stats.cumulative_factor(seen + k + 1) for k in range(updates)]
        else:
            momentum = [0.0] * updates
        output = _ghost_batch_norm(
            input,
            running_mean,
            running_var,
            self.weight,
            self.bias,
            uses_batch_stats,
            momentum,
            self.eps,
            self.virtual_batch_size,
            self.grouping,
            self.running_var_mode,
            self.nonfinite,
            None,
        )
        if tracks:  # only after a call that succeeded: a failed call changes nothing
            self.num_batches_tracked.add_(updates)
        return output


_DOC = r"""Ghost batch normalization over a {shape} input (Hoffer, Hubara and Soudry, "Train longer, generalize
    better", NeurIPS 2017): normkit's :class:`~normkit.nn.batchnorm.{base}` whose training batches are split into
    ghost batches of ``virtual_batch_size`` samples, each normalized by its own statistics.

    .. math::
        y_i = \frac{{x_i - \mathrm{{E}}_g[x]}}{{\sqrt{{\mathrm{{Var}}_g[x] + \epsilon}}}} \gamma + \beta, \quad i \in g

    Parameters, buffers and the state_dict are exactly those of ``{base}`` (a BN checkpoint loads). In evaluation
    it is plain batch norm with the running statistics.
    See :func:`normkit.functional.ghost_batch_norm.ghost_batch_norm`.

    Args:
        num_features: the number of channels :math:`C`.
        virtual_batch_size: samples per ghost batch, a positive int.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        momentum: EMA factor of each running update, or ``None`` for a cumulative average. Default: ``0.1``.
        affine: learnable :math:`\gamma`, :math:`\beta`. Default: ``True``.
        track_running_stats: keep running statistics. Default: ``True``.
        grouping: ``"contiguous"`` (default; the paper's code, ``input.chunk``): ghost batch :math:`g` is samples
            :math:`gV \dots gV+V-1`, one EMA step per ghost batch in order (``num_batches_tracked`` counts ghost
            batches), and a batch that :math:`V` does not divide ends with a smaller ghost batch.
            ``"strided"`` (tf.keras ``virtual_batch_size``): with :math:`G = N/V`, ghost batch :math:`g` is samples
            :math:`g, g+G, \dots`, one EMA step per call towards the mean over ghost batches of their means and
            variances; :math:`V` must divide :math:`N` (``ValueError`` otherwise).
        bias, running_var, nonfinite: as in :class:`~normkit.nn.batchnorm.{base}` (keyword-only).

    Shape:
        - Input: {shape}. Output: same shape.

    Examples::

        >>> import torch
        >>> from normkit.nn.ghost import {name}
        >>> m = {name}(4, virtual_batch_size=4)
        >>> m(torch.randn({example})).shape
        torch.Size([{example}])
        >>> int(m.num_batches_tracked)  # one EMA step per ghost batch (contiguous)
        2
"""


def _make(base: type, name: str, shape: str, example: str) -> type:
    class GhostBatchNorm(_GhostMixin, base):
        def __init__(self, num_features: int, virtual_batch_size: int, eps: float = 1e-5,
                     momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True, *,
                     grouping: str = "contiguous", device=None, dtype=None, bias: bool = True,
                     running_var: str = "unbiased", nonfinite: str = "skip") -> None:
            require_virtual_batch_size(virtual_batch_size)
            _checks.choice("grouping", grouping, GROUPINGS)
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                             running_var=running_var, nonfinite=nonfinite)
            self._init_ghost(virtual_batch_size, grouping)

    GhostBatchNorm.__name__ = GhostBatchNorm.__qualname__ = name
    GhostBatchNorm.__module__ = __name__
    GhostBatchNorm.__doc__ = _DOC.format(shape=shape, base=base.__name__, name=name, example=example)
    return GhostBatchNorm


GhostBatchNorm1d = _make(BatchNorm1d, "GhostBatchNorm1d", ":math:`(N, C)` or :math:`(N, C, L)`", "8, 4")
GhostBatchNorm2d = _make(BatchNorm2d, "GhostBatchNorm2d", ":math:`(N, C, H, W)`", "8, 4, 5, 5")
GhostBatchNorm3d = _make(BatchNorm3d, "GhostBatchNorm3d", ":math:`(N, C, D, H, W)`", "8, 4, 3, 3, 3")

__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "GhostBatchNorm3d"]
