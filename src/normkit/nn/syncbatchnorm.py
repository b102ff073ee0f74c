"""``SyncBatchNorm`` on ``torch.distributed``: any backend (gloo on CPU included), count-weighted over ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..functional import _checks, _stats
from . import _sync
from ._torch_compat import with_bias
from .batchnorm import _BatchNormMixin


class SyncBatchNorm(_BatchNormMixin, with_bias(torch.nn.SyncBatchNorm)):
    r"""Batch normalization over the union of the batches of every rank of a process group.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training, with an initialised ``torch.distributed`` process group of size > 1, :math:`\mathrm{E}[x]` and the
    biased :math:`\mathrm{Var}[x]` are those of the concatenation of all ranks' batches: each rank's
    ``(count, mean, M2)`` is all-gathered (one collective, ``2C + 6`` doubles per rank) and merged count-weighted
    (Chan et al.), so uneven batches, and empty ones, give exactly what one process would compute on the whole
    batch. The backward all-reduces ``sum(dy)`` and ``sum(dy * (x - mean))`` (one collective) and returns the exact
    full-batch input gradient; ``weight``/``bias`` gradients stay per rank (DDP sums them). Every rank ends with
    identical running statistics: ``running = (1 - momentum) * running + momentum * batch`` with the global mean and
    the global *unbiased* variance (``running_var="biased"``: the biased one). In evaluation, with world size 1 or
    without a process group, it is :class:`normkit.nn.BatchNorm2d`'s computation, identical results.

    Unlike :class:`torch.nn.SyncBatchNorm` it runs on every backend (gloo on CPU, NCCL on GPU), accepts a rank with
    an empty local batch (it still joins both collectives and returns an empty output), and detects a rank that
    calls another layer in the same collective instead of mixing layers or hanging (see ``docs/distributed.md``
    for the cases a single collective cannot detect). A peer that never arrives raises ``RuntimeError`` after the
    process group's timeout (``torch.distributed.init_process_group(timeout=...)``). Every rank must call every
    layer the same number of times in the same order and run the backward of each training forward.

    Args:
        num_features: :math:`C` from an expected input of size :math:`(N, C, +)`.
        eps: added to the variance inside the square root. Default: ``1e-5``
        momentum: factor of the running update (torch convention), ``None`` for a cumulative average.
            Default: ``0.1``
        affine: learnable :math:`\gamma`, :math:`\beta`. Default: ``True``
        track_running_stats: keep running statistics. Default: ``True``
        process_group: the group to synchronise over; ``None`` is the default (world) group. Default: ``None``
        device, dtype: of the parameters and buffers.
        bias: learn :math:`\beta` (only with ``affine=True``). Default: ``True``
        running_var: ``"unbiased"`` (default, torch) stores ``var * n / (n - 1)`` with ``n`` the global count;
            ``"biased"`` stores the biased global variance (Keras, Flax).
        nonfinite: ``"skip"`` (default) leaves the running statistics of a channel whose global statistics are
            inf/NaN unchanged; ``"propagate"`` is torch's behaviour; ``"raise"`` raises ``FloatingPointError`` on
            every rank and changes nothing.

    Shape:
        - Input: :math:`(N, C, +)`; ``N`` may differ between ranks and be 0.
        - Output: same shape, dtype and memory format as the input.

    Examples::

        >>> import torch, normkit, normkit.tools
        >>> bn = normkit.nn.SyncBatchNorm(4)  # without a process group: a plain BatchNorm
        >>> bn(torch.randn(8, 4, 5, 5)).shape
        torch.Size([8, 4, 5, 5])
        >>> model = normkit.tools.sync(torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4)))
        >>> type(model[1]).__name__
        'SyncBatchNorm'
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group=None, device=None, dtype=None, *,
                 bias: bool = True, running_var: str = "unbiased", nonfinite: str = "skip") -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, process_group, device, dtype,
                         bias=bias)
        self._init_options(running_var, nonfinite)
        self._init_sync_state()

    def _init_sync_state(self, tag: int = 0, name: str = "") -> None:
        self._sync_tag = tag  # equal on every rank for the same layer; set from the layer's name by tools.sync
        self._sync_name = name
        self._sync_calls = 0  # synchronized calls so far; carried in the payload to pair the k-th calls

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("_sync_tag", 0)
        self.__dict__.setdefault("_sync_name", "")
        self.__dict__.setdefault("_sync_calls", 0)

    def _sync_group(self):
        """``(group, world_size)`` when this call synchronises, else ``None`` (eval, no group, world size 1)."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group, world = _sync.group_and_size(self.process_group)
        return (group, world) if world > 1 else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        synchronised = self._sync_group()
        if synchronised is None:
            return super().forward(input)
        group, world = synchronised
        tracks = self.track_running_stats
        running_mean, running_var = (self.running_mean, self.running_var) if tracks else (None, None)
        factor = self._ema_factor()
        self._validate(input, running_mean, running_var, factor)
        with torch.no_grad():
            total, mean, var = _sync.gather_statistics(input, group, world, self._sync_tag, self._sync_calls,
                                                             self._sync_name)
        _sync.check_total(total, input, world)
        if self.nonfinite == "raise":
            _stats.require_finite_statistics(mean, var)
        output = _sync.SyncBatchNormFunction.apply(input, self.weight, self.bias, mean, var, total, self.eps, group,
                                                   self._sync_tag, self._sync_calls, self._sync_name)
        with torch.no_grad():  # only now, after every check and both ends of the collective, does state change
            _stats.update_running_stats(running_mean, running_var, mean, var, total, factor,
                                        self.running_var_mode, self.nonfinite)
        if self._tracks_this_call():
            self.num_batches_tracked.add_(1)
        self._sync_calls += 1
        return output

    def _validate(self, input, running_mean, running_var, momentum) -> None:
        """batch_norm's checks, except the count of values per channel, which only the ranks together know."""
        if not input.is_floating_point():
            _checks.require_floating(input, "batch_norm")
        _checks.require_eps(self.eps, True)
        _checks.require_momentum(momentum)
        channels = input.shape[1]
        given = {"running_mean": running_mean, "running_var": running_var, "weight": self.weight,
                 "bias": self.bias}
        for name, tensor in given.items():
            _checks.require_per_channel(name, tensor, channels, input)
        _checks.require_compatible_dtypes(input, **given)

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
        r"""Every BatchNorm under ``module`` becomes a :class:`normkit.nn.SyncBatchNorm` sharing its parameters and
        buffers (same as :func:`normkit.tools.sync`, which see).

        Args:
            module: the model (or a single BatchNorm, in which case the new layer is returned).
            process_group: the group to synchronise over; ``None`` is the default group. Default: ``None``

        Examples::

            >>> import torch, normkit
            >>> bn = normkit.nn.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3))
            >>> type(bn).__module__, type(bn).__name__
            ('normkit.nn.syncbatchnorm', 'SyncBatchNorm')
        """
        from ..tools.sync import sync

        return sync(module, process_group)


__all__ = ["SyncBatchNorm"]
