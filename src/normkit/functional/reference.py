"""The readable definitions: one plain-torch oracle per op.

Everything here is written for clarity, not speed: tests, kernels, benchmarks and the doctor compare against these
functions. They work in float64, are differentiable by autograd (to any order), and share the validation and the
running-statistics arithmetic of the fast paths, so that the only thing that differs between an oracle and a fast
path is how the numbers are computed.
"""

from __future__ import annotations

import torch

from . import _checks, _stats


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
    channel = validate_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                  running_var_mode, channel_dim, nonfinite)
    acc = _stats.accumulation_dtype(input.dtype)
    shape = per_channel_shape(input, channel)
    if training:
        mean, var = batch_moments(input, channel)
        if input.numel() > 0:
            if nonfinite == "raise":
                _stats.require_finite_statistics(mean, var)
            with torch.no_grad():
                _stats.update_running_stats(running_mean, running_var, mean.detach(), var.detach(),
                                            _checks.values_per_channel(input, channel), momentum,
                                            running_var_mode, nonfinite)
    else:
        mean, var = running_mean.to(acc), running_var.to(acc)
    y = (input.to(acc) - mean.view(shape)) / torch.sqrt(var.view(shape) + eps)
    if weight is not None:
        y = y * weight.to(acc).view(shape)
    if bias is not None:
        y = y + bias.to(acc).view(shape)
    return y.to(input.dtype)


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

    Returns ``(grad_input, grad_weight, grad_bias)``; the last two are ``None`` when ``weight`` is ``None``.
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
    if weight is None:
        return grad_input.to(input.dtype), None, None
    grad_weight = (dy * x_hat).sum(dims).to(weight.dtype)
    grad_bias = dy.sum(dims).to(weight.dtype)
    return grad_input.to(input.dtype), grad_weight, grad_bias


_RUNNING_VAR_MODES = ("unbiased", "biased")
_NONFINITE_POLICIES = ("skip", "propagate", "raise")


def validate_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        running_var_mode, channel_dim, nonfinite) -> int:
    """Every check of a batch-norm call, before anything is computed or changed; returns the channel index.

    Written for the common case first (it runs on every call): each test is one comparison, and only a failing
    one calls the helper that builds the message.
    """
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        _checks.require_floating(input, "batch_norm")
    channel = 1 if channel_dim == 1 and input.dim() >= 2 else _checks.channel_index(input, channel_dim, "batch_norm")
    if running_var_mode not in _RUNNING_VAR_MODES:
        _checks.choice("running_var_mode", running_var_mode, _RUNNING_VAR_MODES)
    if nonfinite not in _NONFINITE_POLICIES:
        _checks.choice("nonfinite", nonfinite, _NONFINITE_POLICIES)
    if not (eps > 0 if training else eps >= 0):
        _checks.require_eps(eps, training)
    if type(momentum) is not float or not 0.0 <= momentum <= 1.0:
        _checks.require_momentum(momentum)
    channels, device = input.shape[channel], input.device
    given = [t for t in (running_mean, running_var, weight, bias) if t is not None]
    if any(not isinstance(t, torch.Tensor) or t.numel() != channels or t.device != device for t in given):
        for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                        ("bias", bias)):
            _checks.require_per_channel(name, t, channels, input)
    if given and not _dtypes_fit(input.dtype, given):
        _checks.require_compatible_dtypes(input, weight=weight, bias=bias, running_mean=running_mean,
                                          running_var=running_var)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "batch_norm: running_mean and running_var must both be tensors or both be None, got "
            f"running_mean={'a tensor' if running_mean is not None else 'None'} and "
            f"running_var={'a tensor' if running_var is not None else 'None'}."
        )
    if not training and running_mean is None:
        raise RuntimeError(
            "running_mean must be defined in evaluation mode: with training=False batch_norm normalizes with the "
            "running statistics. Pass them, or training=True to use the batch's statistics."
        )
    if training:
        _checks.require_more_than_one_value_per_channel(input, channel)
    return channel


def _dtypes_fit(input_dtype: torch.dtype, tensors: list[torch.Tensor]) -> bool:
    dtype = tensors[0].dtype
    if any(t.dtype != dtype for t in tensors):
        return False
    return dtype == input_dtype or (dtype == torch.float32 and input_dtype in _checks.LOW_PRECISION)


def group_norm(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, *, activation: str | None = None) -> torch.Tensor:
    r"""Group normalization (then an optional ``"silu"``/``"relu"``), written out; no validation.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \gamma + \beta\Big)
    """
    n, c = input.shape[0], input.shape[1]
    xg = input.to(_stats.accumulation_dtype(input.dtype)).reshape(n, num_groups, -1)
    mean = xg.mean(2, keepdim=True)
    var = ((xg - mean) ** 2).mean(2, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + eps)).reshape(input.shape)
    shape = [c] + [1] * (input.dim() - 2)
    if weight is not None:
        y = y * weight.to(y.dtype).reshape(shape)
    if bias is not None:
        y = y + bias.to(y.dtype).reshape(shape)
    return activate(y, activation).to(input.dtype)


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
