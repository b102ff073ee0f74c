"""The readable definitions: one plain-torch oracle per op.

Everything here is written for clarity, not speed: tests, kernels, benchmarks and the doctor compare against these
functions. They work in float64, are differentiable by autograd (to any order), and share the validation and the
running-statistics arithmetic of the fast paths, so that the only thing that differs between an oracle and a fast
path is how the numbers are computed.
"""

from __future__ import annotations

import torch

from . import _checks, _layout, _stats


def batch_moments(x: torch.Tensor, channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and *biased* variance over every dimension but ``channel``, in at least float32.

    Two passes (mean first, then the mean of squared deviations), so a large mean costs no precision.
    """
    dims = [d for d in range(x.dim()) if d != channel]
    xf = x.to(_stats.accumulation_dtype(x.dtype))
    mean = xf.mean(dims)
    shape = per_channel_shape(x, channel)
    var = ((xf - mean.view(shape)) ** 2).mean(dims)
    return mean, var


def per_channel_shape(x: torch.Tensor, channel: int) -> list[int]:
    """The shape that broadcasts a ``(C,)`` vector along ``channel`` of ``x``."""
    return [x.shape[d] if d == channel else 1 for d in range(x.dim())]


def batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    running_var_mode: str = "unbiased",
    channel_dim: int = 1,
    nonfinite: str = "skip",
) -> torch.Tensor:
    r"""Batch normalization, written out. Same signature and semantics as :func:`normkit.functional.batch_norm`.

    .. math::
        \mu = \frac{1}{m}\sum_i x_i,\quad \sigma^2 = \frac{1}{m}\sum_i (x_i - \mu)^2,\quad
        y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta
    """
    channel, momentum, eps = _checks.validate_batch_norm(input, running_mean, running_var, weight, bias, training,
                                                         momentum, eps, running_var_mode, channel_dim, nonfinite)
    if not training:
        return normalize(input, channel, running_mean, running_var, weight, bias, eps)
    y, mean, var = train_forward(input, channel, weight, bias, eps)
    with torch.no_grad():
        _stats.update_running_stats(running_mean, running_var, mean, var,
                                    _checks.values_per_channel(input, channel), momentum, running_var_mode,
                                    nonfinite)
    return y


def normalize(input, channel, mean, var, weight, bias, eps) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` per channel, computed in at least float32, returned in the
    input's dtype and memory format."""
    acc = _stats.accumulation_dtype(input.dtype)
    shape = per_channel_shape(input, channel)
    y = (input.to(acc) - mean.to(acc).view(shape)) / torch.sqrt(var.to(acc).view(shape) + eps)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return y.to(input.dtype)


def train_forward(input, channel, weight, bias, eps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, biased var)`` with the batch's statistics; ``y`` differentiable through them (an empty batch
    gives NaN statistics and an empty ``y``). A float16/bfloat16 input is converted once, so its gradient's two
    large, cancelling terms meet in float32."""
    xf = input.to(_stats.accumulation_dtype(input.dtype))
    mean, var = batch_moments(xf, channel)
    return normalize(xf, channel, mean, var, weight, bias, eps).to(input.dtype), mean.detach(), var.detach()


def batch_norm_backward(
    grad_output: torch.Tensor,
    input: torch.Tensor,
    weight: torch.Tensor | None,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    training: bool,
    channel: int,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    r"""The closed-form gradient of batch normalization, in plain (differentiable) torch ops.

    With :math:`\hat x = (x - \mu)\,\mathrm{invstd}` and :math:`g = \partial L / \partial y \cdot \gamma`:

    .. math::
        \frac{\partial L}{\partial x} = \mathrm{invstd}\,\big(g - \overline{g} - \hat x\,\overline{g\,\hat x}\big)
        \ \text{(training)},\qquad
        \frac{\partial L}{\partial x} = g\,\mathrm{invstd}\ \text{(running statistics)},

    :math:`\partial L/\partial\gamma = \sum \partial L/\partial y\,\hat x`, :math:`\partial L/\partial\beta =
    \sum \partial L/\partial y`, where the bars are means over every dimension but the channel one. ``mean`` and
    ``invstd`` are the statistics the forward normalized with; pass them as functions of ``input`` to get a graph
    that differentiates the batch statistics too (double backward).

    Returns ``(grad_input, grad_weight, grad_bias)``; ``grad_weight`` is ``None`` when ``weight`` is ``None``.
    """
    dims = [d for d in range(input.dim()) if d != channel]
    shape = per_channel_shape(input, channel)
    acc = _stats.accumulation_dtype(input.dtype)
    dy = grad_output.to(acc)
    x_hat = (input.to(acc) - mean.view(shape)) * invstd.view(shape)
    g = dy * weight.to(acc).view(shape) if weight is not None else dy
    if training:
        grad_input = invstd.view(shape) * (g - g.mean(dims, keepdim=True)
                                           - x_hat * (g * x_hat).mean(dims, keepdim=True))
    else:
        grad_input = g * invstd.view(shape)
    grad_weight = None if weight is None else (dy * x_hat).sum(dims).to(weight.dtype)
    grad_bias = dy.sum(dims).to(weight.dtype if weight is not None else acc)
    return grad_input.to(input.dtype), grad_weight, grad_bias


def group_norm(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, activation: str | None = None) -> torch.Tensor:
    r"""Group normalization (then an optional ``"silu"``/``"relu"``), written out; no validation.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \gamma + \beta\Big)
    """
    c = input.shape[1]
    # (N, G, C/G, *): a view whatever the memory format, so every elementwise step keeps the input's layout
    xg = input.to(_stats.accumulation_dtype(input.dtype)).unflatten(1, (num_groups, c // num_groups))
    dims = tuple(range(2, xg.dim()))
    centred = xg - xg.mean(dims, keepdim=True)
    centred = centred - centred.mean(dims, keepdim=True)  # the corrected two-pass: a large mean costs no precision
    var = (centred * centred).mean(dims, keepdim=True)
    y = (centred / torch.sqrt(var + eps)).flatten(1, 2)
    shape = [c] + [1] * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    y = activate(y, activation).to(input.dtype)
    memory_format = _layout.suggest_memory_format(input)
    return y if y.is_contiguous(memory_format=memory_format) else y.contiguous(memory_format=memory_format)


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    r"""Layer normalization over the trailing ``normalized_shape``, written out; no validation.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta
    """
    k = 1 if isinstance(normalized_shape, int) else len(normalized_shape)
    dims = tuple(range(input.dim() - k, input.dim()))
    xf = input.to(_stats.accumulation_dtype(input.dtype))
    mean = xf.mean(dims, keepdim=True)
    var = ((xf - mean) ** 2).mean(dims, keepdim=True)
    y = (xf - mean) / torch.sqrt(var + eps)
    if weight is not None:
        y = y * weight.to(y.dtype)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.to(input.dtype)


def activate(z: torch.Tensor, act: str | None) -> torch.Tensor:
    """``act(z)`` for ``None`` (identity), ``"relu"``, ``"silu"`` or ``"gelu"`` (exact, erf): the activations that
    normkit fuses into a norm."""
    if act is None:
        return z
    if act == "relu":
        return torch.relu(z)
    if act == "silu":
        return torch.nn.functional.silu(z)
    if act == "gelu":
        return torch.nn.functional.gelu(z)
    raise ValueError(f"activation must be one of None, 'relu', 'silu', 'gelu'; got {act!r}.")
