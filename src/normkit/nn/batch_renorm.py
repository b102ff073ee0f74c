"""``BatchRenorm1d/2d/3d`` (Ioffe 2017): batch norm corrected towards the running statistics, with warm-up."""

from __future__ import annotations

import math

import torch

from ..functional._snapshot import snapshot
from ..functional.batch_renorm import batch_renorm, batch_renorm_keras, check_bounds
from . import _scripting
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

_KERAS_BUFFERS = ("moving_stddev", "renorm_mean", "renorm_stddev")


def _check_steps(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative int (a number of training steps), got {value!r}.")


def renorm_bounds(step: int, rmax: float, dmax: float, warmup_steps: int, rmax_ramp_end: int,
                  dmax_ramp_end: int) -> tuple[float, float]:
    """The clipping bounds ``(rmax_t, dmax_t)`` at training step ``step`` (0-based) under the paper's schedule.

    ``rmax_t = 1`` and ``dmax_t = 0`` for the first ``warmup_steps`` steps, then linear up to ``rmax`` at step
    ``rmax_ramp_end`` and ``dmax`` at step ``dmax_ramp_end``, constant afterwards. ``warmup_steps=0`` (or a ramp
    that ends at or before the warm-up) gives the final bounds at once.

    Examples::

        >>> from normkit.nn.batch_renorm import renorm_bounds
        >>> [renorm_bounds(t, 3.0, 5.0, 5000, 40000, 25000) for t in (0, 5000, 15000, 22500, 40000)]
        [(1.0, 0.0), (1.0, 0.0), (1.5714285714285714, 2.5), (2.0, 4.375), (3.0, 5.0)]
    """
    if warmup_steps == 0:
        return float(rmax), float(dmax)
    if isinstance(step, torch.Tensor):  # a traced step counter: the same schedule, branch-free
        def ramp_tensor(final: float, start: float, end: int) -> torch.Tensor:
            if end <= warmup_steps or math.isinf(final):
                value = torch.full_like(step, float(final))
            else:
                value = start + (final - start) * ((step - warmup_steps) / (end - warmup_steps)).clamp(0.0, 1.0)
            return torch.where(step < warmup_steps, start, value)

        return ramp_tensor(rmax, 1.0, rmax_ramp_end), ramp_tensor(dmax, 0.0, dmax_ramp_end)
    if step < warmup_steps:
        return 1.0, 0.0

    def ramp(final: float, start: float, end: int) -> float:
        if end <= warmup_steps or math.isinf(final):
            return float(final)
        return start + (final - start) * min(1.0, (step - warmup_steps) / (end - warmup_steps))

    return ramp(rmax, 1.0, rmax_ramp_end), ramp(dmax, 0.0, dmax_ramp_end)


class _BatchRenormMixin:
    """Options, schedule and forward of the renorm layers; the rest is the plain BatchNorm's."""

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "torch has no batch renormalization layer to run in its place")

    def _init_renorm(self, rmax, dmax, warmup_steps, rmax_ramp_end, dmax_ramp_end, keras_compatible,
                     renorm_momentum) -> None:
        self.rmax, self.dmax = float(rmax), float(dmax)
        self.warmup_steps, self.rmax_ramp_end, self.dmax_ramp_end = warmup_steps, rmax_ramp_end, dmax_ramp_end
        self.keras_compatible = keras_compatible
        self.renorm_momentum = self.momentum if renorm_momentum is None else float(renorm_momentum)
        if keras_compatible:
            for name in _KERAS_BUFFERS:
                self.register_buffer(name, torch.zeros_like(self.running_mean))
            self.reset_running_stats()

    @staticmethod
    def _check_options(rmax, dmax, warmup_steps, rmax_ramp_end, dmax_ramp_end, keras_compatible, renorm_momentum,
                       momentum, track_running_stats) -> None:
        check_bounds(rmax, dmax, "BatchRenorm")
        _check_steps("warmup_steps", warmup_steps)
        _check_steps("rmax_ramp_end", rmax_ramp_end)
        _check_steps("dmax_ramp_end", dmax_ramp_end)
        if keras_compatible and (momentum is None or not track_running_stats):
            raise ValueError(
                "BatchRenorm: keras_compatible=True needs a float momentum and track_running_stats=True (Keras "
                f"keeps moving statistics with a fixed momentum), got momentum={momentum!r}, "
                f"track_running_stats={track_running_stats!r}."
            )
        if renorm_momentum is not None and (isinstance(renorm_momentum, bool) or not isinstance(
                renorm_momentum, (int, float)) or not 0 <= renorm_momentum <= 1):
            raise ValueError(f"BatchRenorm: renorm_momentum must be None or a number in [0, 1] (torch convention: "
                             f"a Keras renorm_momentum m is 1 - m), got {renorm_momentum!r}.")

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        if getattr(self, "keras_compatible", False):
            self.moving_stddev.fill_(1)
            self.renorm_mean.zero_()
            self.renorm_stddev.fill_(1)

    def extra_repr(self) -> str:
        text = super().extra_repr() + f", rmax={self.rmax}, dmax={self.dmax}, warmup_steps={self.warmup_steps}"
        if self.keras_compatible:
            text += f", keras_compatible=True, renorm_momentum={self.renorm_momentum}"
        return text

    def current_bounds(self) -> tuple[float, float]:
        """The clipping bounds ``(rmax_t, dmax_t)`` the next training step uses (step = ``num_batches_tracked``)."""
        step = int(self.num_batches_tracked) if self.num_batches_tracked is not None else 0
        return renorm_bounds(step, self.rmax, self.dmax, self.warmup_steps, self.rmax_ramp_end, self.dmax_ramp_end)

    def _bounds_for_call(self):
        """This training step's bounds: Python floats eagerly, 0-dim tensors from the counter when traced (so a
        compiled or exported model follows the schedule without reading the counter on the host)."""
        if not torch.compiler.is_compiling() or self.num_batches_tracked is None:
            return self.current_bounds()
        return renorm_bounds(snapshot(self.num_batches_tracked, torch.float32), self.rmax, self.dmax, self.warmup_steps,
                             self.rmax_ramp_end, self.dmax_ramp_end)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        rmax, dmax = self._bounds_for_call() if self.training else (self.rmax, self.dmax)
        if self.keras_compatible:
            output = batch_renorm_keras(input, self.running_mean, self.running_var, self.moving_stddev,
                                        self.renorm_mean, self.renorm_stddev, self.weight, self.bias, self.training,
                                        float(self.momentum), self.renorm_momentum, self.eps, rmin=1.0 / rmax,
                                        rmax=rmax, dmax=dmax)
        else:
            running_mean, running_var, uses_batch_stats = self._buffers_for_call()
            output = batch_renorm(
                input,
                running_mean,
                running_var,
                self.weight,
                self.bias,
                uses_batch_stats,
                self._ema_factor(),
                self.eps,
                rmax=rmax,
                dmax=dmax,
                running_var_mode=self.running_var_mode,
                nonfinite=self.nonfinite,
            )
        if self._tracks_this_call():  # only after a call that succeeded: a failed call changes nothing
            self.num_batches_tracked.add_(1)
        return output


_DOC = r"""Batch Renormalization (Ioffe, 2017): batch norm whose output is corrected towards the running statistics.

    .. math::
        y = \Big(\frac{x - \mu_B}{\sigma_B}\,r + d\Big)\gamma + \beta,\quad
        r = \mathrm{sg}\,\mathrm{clip}_{[1/r_{max}, r_{max}]}\frac{\sigma_B}{\sigma},\quad
        d = \mathrm{sg}\,\mathrm{clip}_{[-d_{max}, d_{max}]}\frac{\mu_B - \mu}{\sigma}

    with :math:`\sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon}` and :math:`\mu`, :math:`\sigma = \sqrt{\text{running
    var} + \epsilon}` the running statistics before this step (:func:`normkit.functional.batch_renorm.batch_renorm`).
    Evaluation is plain batch norm with the running statistics. A subclass of :class:`normkit.{bn}` (same buffers and
    state_dict; ``num_batches_tracked`` is the schedule's step counter). The bounds follow the paper's schedule
    (:func:`normkit.nn.batch_renorm.renorm_bounds`): ``rmax=1``, ``dmax=0`` for ``warmup_steps`` training steps,
    then linear to ``rmax`` at ``rmax_ramp_end`` and ``dmax`` at ``dmax_ramp_end``; ``warmup_steps=0`` applies the
    final bounds from the first step. With ``rmax=1, dmax=0`` it is exactly batch norm.

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, running_var, nonfinite:
            as :class:`normkit.{bn}` (defaults ``1e-5``, ``0.1``, ``True``, ``True``, ``None``, ``None``,
            ``True``, ``"unbiased"``, ``"skip"``).
        rmax: final bound of ``r`` (clipped to ``[1/rmax, rmax]``), ``>= 1``. Default: ``3.0``.
        dmax: final bound of ``d`` (clipped to ``[-dmax, dmax]``), ``>= 0``. Default: ``5.0``.
        warmup_steps: training steps with ``r = 1``, ``d = 0``. Default: ``5000``.
        rmax_ramp_end, dmax_ramp_end: steps at which the bounds reach ``rmax``/``dmax``. Default: ``40000``,
            ``25000``.
        keras_compatible: reproduce Keras 3's ``BatchNormalization(renorm=True)``: ``r``/``d`` from separate renorm
            statistics (buffers ``renorm_mean``, ``renorm_stddev``, with ``renorm_momentum``), a ``moving_stddev``
            buffer, ``running_var = relu(moving_stddev**2 - eps)``. Adds these three buffers to the state_dict.
            Use ``eps=1e-3, momentum=0.01, warmup_steps=0`` for Keras's defaults. Default: ``False``.
        renorm_momentum: Keras mode only, torch convention (Keras ``0.99`` is ``0.01``). Default: ``momentum``.

    Shape:
        - Input: ``{shape}``. Output: same as input.

    Examples::

        >>> import torch
        >>> from normkit.nn.batch_renorm import {name}
        >>> layer = {name}(4, warmup_steps=0)
        >>> layer({example}).shape
        torch.Size([{size}])
        >>> layer.current_bounds()
        (3.0, 5.0)
"""


def _make(base: type, name: str, shape: str, size: str) -> type:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, *, rmax: float = 3.0, dmax: float = 5.0,
                 warmup_steps: int = 5000, rmax_ramp_end: int = 40000, dmax_ramp_end: int = 25000,
                 device=None, dtype=None, bias: bool = True, running_var: str = "unbiased",
                 nonfinite: str = "skip", keras_compatible: bool = False,
                 renorm_momentum: float | None = None) -> None:
        _BatchRenormMixin._check_options(rmax, dmax, warmup_steps, rmax_ramp_end, dmax_ramp_end, keras_compatible,
                                         renorm_momentum, momentum, track_running_stats)
        base.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                      running_var=running_var, nonfinite=nonfinite)
        self._init_renorm(rmax, dmax, warmup_steps, rmax_ramp_end, dmax_ramp_end, keras_compatible,
                          renorm_momentum)

    cls = type(name, (_BatchRenormMixin, base), {"__init__": __init__, "__module__": __name__})
    doc = _DOC
    for key, value in (("{bn}", base.__name__), ("{name}", name), ("{shape}", shape), ("{size}", size),
                       ("{example}", f"torch.randn({size})")):
        doc = doc.replace(key, value)
    cls.__doc__ = doc
    return cls


BatchRenorm1d = _make(BatchNorm1d, "BatchRenorm1d", "(N, C) or (N, C, L)", "8, 4")
BatchRenorm2d = _make(BatchNorm2d, "BatchRenorm2d", "(N, C, H, W)", "8, 4, 5, 5")
BatchRenorm3d = _make(BatchNorm3d, "BatchRenorm3d", "(N, C, D, H, W)", "8, 4, 3, 3, 3")

__all__ = ["BatchRenorm1d", "BatchRenorm2d", "BatchRenorm3d", "renorm_bounds"]
