"""Drop-in ``BatchNorm1d/2d/3d``: the torch classes, with normkit's implementation and two extra options."""

from __future__ import annotations

import torch

from ..functional import _checks, _stats
from ..functional._snapshot import snapshot
from ..functional.batch_norm import batch_norm
from . import _scripting
from ._state_loading import AtomicStateLoading
from ._torch_compat import with_bias


class _BatchNormMixin(AtomicStateLoading):
    """What normkit adds to ``torch.nn.modules.batchnorm._BatchNorm``: options, validation order, the forward."""

    def _init_options(self, running_var: str, nonfinite: str) -> None:
        self.running_var_mode = _checks.choice("running_var", running_var, ("unbiased", "biased"))
        self.nonfinite = _checks.choice("nonfinite", nonfinite, ("skip", "propagate", "raise"))

    def __setstate__(self, state):
        super().__setstate__(state)
        self.__dict__.setdefault("running_var_mode", "unbiased")
        self.__dict__.setdefault("nonfinite", "skip")

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.running_var_mode != "unbiased":
            text += f", running_var={self.running_var_mode!r}"
        if self.nonfinite != "skip":
            text += f", nonfinite={self.nonfinite!r}"
        return text

    def __prepare_scriptable__(self) -> torch.nn.Module:
        """For ``torch.jit.script``: torch's class sharing this module's tensors (see ``normkit.nn._scripting``)."""
        if self.running_var_mode != "unbiased":
            _scripting.not_scriptable(self, "TorchScript runs torch's batch norm, which stores the unbiased running "
                                      "variance, and this layer stores the biased one (running_var='biased')")
        return _scripting.torch_twin(self)

    def _ema_factor(self) -> float:
        """The running-update factor of this call; ``momentum=None`` averages over every batch so far."""
        if self.momentum is not None:
            return self.momentum
        if not self._tracks_this_call():
            return 0.0
        if torch.compiler.is_compiling():  # traced: from the counter, without reading it on the host
            return 1.0 / (snapshot(self.num_batches_tracked, torch.float64) + 1)
        return _stats.cumulative_factor(int(self.num_batches_tracked) + 1)

    def _tracks_this_call(self) -> bool:
        return self.training and self.track_running_stats and self.num_batches_tracked is not None

    def _buffers_for_call(self) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
        """torch's rules: ``(running_mean, running_var, uses_batch_stats)`` for this call.

        Batch statistics normalize in training, or in eval without buffers; the buffers are passed only where eval
        reads them or training tracks them (so flipping ``track_running_stats`` off stops updates, as in torch).
        """
        uses_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        passes_buffers = not self.training or self.track_running_stats
        if not passes_buffers:
            return None, None, uses_batch_stats
        return self.running_mean, self.running_var, uses_batch_stats

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # _buffers_for_call, _ema_factor and _tracks_this_call written out with one read of each buffer: this runs
        # every call, and every module attribute read that is a tensor goes through nn.Module.__getattr__.
        self._check_input_dim(input)
        buffers = self._buffers
        running_mean, running_var = buffers.get("running_mean"), buffers.get("running_var")
        counter = buffers.get("num_batches_tracked")
        training, tracking = self.training, self.track_running_stats
        tracks = training and tracking and counter is not None
        if training:
            uses_batch_stats = True
            if not tracking:
                running_mean = running_var = None
        else:
            uses_batch_stats = running_mean is None and running_var is None
        momentum = self.momentum
        if momentum is None:
            momentum = self._ema_factor()
        # the counter moves only after a call that succeeded (a failed call changes nothing)
        return batch_norm(input, running_mean, running_var, self.weight, self.bias, uses_batch_stats, momentum,
                          self.eps, running_var_mode=self.running_var_mode, nonfinite=self.nonfinite,
                          num_batches_tracked=counter if tracks else None)


_OPTIONS_DOC = """

    normkit adds two keyword-only options (everything else, including the state_dict, is torch's):

    Args:
        running_var: ``"unbiased"`` (default, torch) stores ``var * n / (n - 1)`` in ``running_var``;
            ``"biased"`` stores the biased batch variance (Keras, Flax).
        nonfinite: ``"skip"`` (default) leaves the running statistics of a channel whose batch statistics are
            inf/NaN unchanged (no host synchronisation); ``"propagate"`` is torch's behaviour; ``"raise"`` raises
            ``FloatingPointError`` and changes nothing.

    Momentum follows torch: ``running = (1 - momentum) * running + momentum * batch``; ``momentum=None`` is a
    cumulative average. A Keras momentum ``m`` is ``1 - m`` here (:func:`normkit.compat.momentum_from_keras`).
"""


def _make(torch_class: type, example_shape: str) -> type:
    class BatchNorm(_BatchNormMixin, with_bias(torch_class)):
        def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                     track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                     running_var: str = "unbiased", nonfinite: str = "skip") -> None:
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
            self._init_options(running_var, nonfinite)

    BatchNorm.__name__ = BatchNorm.__qualname__ = torch_class.__name__
    BatchNorm.__module__ = __name__
    BatchNorm.__doc__ = (
        f"Drop-in for :class:`torch.nn.{torch_class.__name__}` (same arguments, defaults, repr, state_dict and "
        f"errors) running :func:`normkit.functional.batch_norm`.\n\n    Examples::\n\n"
        f"        >>> import torch, normkit\n        >>> bn = normkit.{torch_class.__name__}(4)\n"
        f"        >>> bn(torch.randn({example_shape})).shape\n        torch.Size([{example_shape}])\n"
        + _OPTIONS_DOC
    )
    return BatchNorm


BatchNorm1d = _make(torch.nn.BatchNorm1d, "8, 4")
BatchNorm2d = _make(torch.nn.BatchNorm2d, "8, 4, 5, 5")
BatchNorm3d = _make(torch.nn.BatchNorm3d, "8, 4, 3, 3, 3")

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]
