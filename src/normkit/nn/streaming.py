"""``StreamingBatchNorm1d/2d/3d``: batch norm that normalizes with streaming (exponentially averaged) statistics.

The scheme is Equinox's ``BatchNorm(mode="ema")`` (patrick-kidger/equinox, ``equinox/nn/_batch_norm.py``): in
training the layer first folds the current batch into the exponential moving average and then normalizes with
that average, so the gradient flows through the current batch's share of it. The variance is merged the way
Online Normalization (Chiley et al. 2019, arXiv 1905.05894, forward statistics) streams it — the exponentially
weighted variance of everything seen, between-batch term included — so a stream of single samples, whose
within-batch variance is 0, still gets a proper variance. Online Normalization's error-feedback backward is *not*
implemented; the gradient is the plain autograd gradient through the current batch's contribution.
"""

from __future__ import annotations

import torch

from ..functional import _checks, _stats
from ..functional._snapshot import snapshot
from . import _scripting
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d


def _require_momentum(momentum) -> None:
    if momentum is None:
        return
    _checks.require_unit_momentum(momentum, "StreamingBatchNorm")


class _StreamingMixin:
    """Training forward with the streaming statistics; eval is the parent's (the running statistics)."""

    def __prepare_scriptable__(self):
        _scripting.not_scriptable(self, "torch has no streaming batch norm layer to run in its place")

    def _init_streaming(self, momentum, track_running_stats: bool) -> None:
        _require_momentum(momentum)
        if not track_running_stats:
            raise ValueError(
                f"{type(self).__name__} normalizes with its running statistics, so it needs "
                "track_running_stats=True; got False. Use normkit.BatchNorm* (batch statistics) or "
                "torch.nn.GroupNorm/LayerNorm for a layer without state."
            )

    def _streaming_factor(self) -> float:
        """The weight of the current batch: 1 on the first batch (the stream starts from it), then ``momentum``
        (``momentum=None``: ``1 / (t + 1)``, the plain average of the batches so far)."""
        if torch.compiler.is_compiling():  # traced: the same rule without reading the counter on the host
            seen = snapshot(self.num_batches_tracked, torch.float64)
            if self.momentum is None:
                return 1.0 / (seen + 1)
            return torch.where(seen == 0, torch.ones_like(seen), torch.full_like(seen, float(self.momentum)))
        seen = int(self.num_batches_tracked)
        if seen == 0:
            return 1.0
        if self.momentum is None:
            return _stats.cumulative_factor(seen + 1)
        return float(self.momentum)

    def streaming_statistics(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean and biased variance that a training call on ``input`` normalizes with (differentiable in
        ``input``); nothing is stored. ``input`` must already be validated."""
        dims = [d for d in range(input.dim()) if d != 1]
        acc = input.to(_stats.accumulation_dtype(input.dtype))
        batch_var, batch_mean = torch.var_mean(acc, dim=dims, correction=0)
        factor = self._streaming_factor()
        old_mean = snapshot(self.running_mean, acc.dtype)  # overwritten later in this forward
        old_var = snapshot(self.running_var, acc.dtype)
        mean = torch.lerp(old_mean, batch_mean, factor)
        # Chan's merge of two weighted populations (weights 1 - f and f): exact exponentially weighted variance.
        var = (1.0 - factor) * old_var + factor * batch_var + factor * (1.0 - factor) * (batch_mean - old_mean) ** 2
        return mean, var

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        op = type(self).__name__
        _checks.require_tensor(input, op)
        if not self.training:
            return super().forward(input)
        self._check_input_dim(input)
        _checks.require_floating(input, op)
        channels = input.shape[1]
        for name in ("weight", "bias", "running_mean", "running_var"):
            _checks.require_per_channel(name, getattr(self, name), channels, input)
        _checks.require_compatible_dtypes(input, weight=self.weight, bias=self.bias)
        _checks.require_eps(self.eps, True)
        _require_momentum(self.momentum)
        if input.numel() == 0:
            raise ValueError(
                f"{op}: expected a non-empty input in training, got shape {tuple(input.shape)}; an empty batch has "
                "no statistics to stream. Skip the call, or call .eval()."
            )

        mean, var = self.streaming_statistics(input)
        finite = torch.isfinite(mean) & torch.isfinite(var)
        if self.nonfinite == "raise":
            _stats.require_finite_channels(finite)  # raises before anything changed

        shape = [1, channels] + [1] * (input.dim() - 2)
        acc = input.to(mean.dtype)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(mean.dtype)
        output = (acc - mean.view(shape)) * scale.view(shape)
        if self.bias is not None:
            output = output + self.bias.to(mean.dtype).view(shape)
        output = output.to(input.dtype)

        new = torch.stack((mean.detach(), var.detach()))
        if self.nonfinite == "skip":
            new = torch.where(finite, new, torch.stack((self.running_mean, self.running_var)).to(new.dtype))
        _stats.write_running(self.running_mean, self.running_var, new)
        self.num_batches_tracked.add_(1)
        return output


_DOC = r"""Batch normalization with streaming statistics, for online learning (batch size 1 in training).

    .. math::
        \mu_t = (1 - f)\,\mu_{t-1} + f\,\bar x_t, \qquad
        \sigma^2_t = (1 - f)\,\sigma^2_{t-1} + f\,s^2_t + f(1 - f)\,(\bar x_t - \mu_{t-1})^2, \qquad
        y = \frac{x - \mu_t}{\sqrt{\sigma^2_t + \epsilon}} \cdot \gamma + \beta

    :math:`\bar x_t, s^2_t` are the current batch's mean and biased variance per channel and :math:`f` is
    ``momentum`` (1 on the first training batch, which starts the stream). So :math:`\mu_t, \sigma^2_t` are exactly
    the exponentially weighted mean and variance of every value seen so far (each batch weighs :math:`f`, shared
    by its values). Training normalizes with :math:`\mu_t, \sigma^2_t` — the average *including* the current batch,
    with the gradient flowing through the current batch's share (Equinox ``BatchNorm(mode="ema")``); the variance
    is streamed as in Online Normalization (Chiley et al. 2019, arXiv 1905.05894), without its error-feedback
    backward. A batch of one sample trains (no "Expected more than 1 value per channel" error) and, for a single
    sample, :math:`|y - \beta| \le |\gamma| \sqrt{(1 - f)/f}` whatever the input.

    ``running_mean``/``running_var`` *are* the streaming statistics (``running_var`` holds the biased, exponentially
    weighted variance) and eval normalizes with them, so the state_dict is a BatchNorm state_dict and a pretrained
    BatchNorm continues streaming from its running statistics (``num_batches_tracked > 0``).

    Args:
        num_features: number of channels :math:`C`.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        momentum: the weight :math:`f` of each new batch, torch's convention. ``None`` averages every batch so far
            equally. Default: ``0.1``.
        affine: learnable :math:`\gamma, \beta`. Default: ``True``.
        track_running_stats: must be ``True`` (the statistics are the layer's state). Default: ``True``.
        nonfinite: ``"skip"`` (default) keeps the state of a channel whose new statistics are inf/NaN;
            ``"propagate"`` stores them; ``"raise"`` raises ``FloatingPointError`` and changes nothing.

    Shape:
        - Input: {shape}. Output: same shape and dtype.

    Examples::

        >>> import torch
        >>> from normkit.nn.streaming import {name}
        >>> bn = {name}(4)
        >>> bn(torch.randn({example})).shape  # one sample per step in training
        torch.Size([{example}])
"""


def _make(parent: type, shape: str, example: str) -> type:
    class StreamingBatchNorm(_StreamingMixin, parent):
        def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                     track_running_stats: bool = True, device=None, dtype=None, *, nonfinite: str = "skip") -> None:
            self._init_streaming(momentum, track_running_stats)
            super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype,
                             running_var="biased", nonfinite=nonfinite)

    name = "Streaming" + parent.__name__
    StreamingBatchNorm.__name__ = StreamingBatchNorm.__qualname__ = name
    StreamingBatchNorm.__module__ = __name__
    StreamingBatchNorm.__doc__ = _DOC.replace("{name}", name).replace("{shape}", shape).replace("{example}", example)
    return StreamingBatchNorm


StreamingBatchNorm1d = _make(BatchNorm1d, r":math:`(N, C)` or :math:`(N, C, L)`", "1, 4")
StreamingBatchNorm2d = _make(BatchNorm2d, r":math:`(N, C, H, W)`", "1, 4, 5, 5")
StreamingBatchNorm3d = _make(BatchNorm3d, r":math:`(N, C, D, H, W)`", "1, 4, 3, 3, 3")

__all__ = ["StreamingBatchNorm1d", "StreamingBatchNorm2d", "StreamingBatchNorm3d"]
