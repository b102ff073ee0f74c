"""``act(bn(x) + residual)``: the activations' derivatives and the fused closed-form backward in differentiable ops.

Shared by :class:`normkit.nn.BatchNormAct2d` and the Triton kernels' autograd functions: under
``create_graph=True`` their backward runs this closed form, so double backward differentiates the batch statistics
too.
"""

from __future__ import annotations

import math

import torch

from . import _stats, reference

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT2PI = 1.0 / math.sqrt(2.0 * math.pi)


def activation_grad(z: torch.Tensor, act: str | None) -> torch.Tensor | None:
    """The derivative of the activation at the pre-activation ``z`` (``None`` for the identity)."""
    if act == "relu":
        return (z > 0).to(z.dtype)
    if act == "silu":
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if act == "gelu":  # exact (erf) GELU, torch's default: Phi(z) + z * phi(z)
        return 0.5 * (1 + torch.erf(z * _INV_SQRT2)) + z * _INV_SQRT2PI * torch.exp(-0.5 * z * z)
    return None


def closed_form_backward(grad_output, input, weight, bias, residual, mean, var, eps: float, training: bool,
                         channel: int, act: str | None):
    r"""The gradients of ``act(bn(x) + residual)`` in plain torch ops: ``(dx, dweight, dbias, dresidual)``.

    .. math::
        dz = dy \cdot \mathrm{act}'(z),\quad g = dz\,\gamma,\quad
        dx = \mathrm{invstd}\,(g - \overline{g} - \hat x\,\overline{g\hat x})\ \text{(training)},\ g\,\mathrm{invstd}
        \ \text{(running statistics)};\quad d\gamma = \textstyle\sum dz\,\hat x,\ d\beta = \sum dz,\ d\,r = dz.

    In training the statistics are recomputed from ``input`` (so a graph through them exists); otherwise ``mean``
    and ``var`` (the running statistics used) are constants. ``dresidual`` is ``None`` when ``residual`` is.
    """
    if training:  # let the statistics depend on the input
        mean, var = reference.batch_moments(input, channel)
    dims = [d for d in range(input.dim()) if d != channel]
    shape = reference.per_channel_shape(input, channel)
    acc = _stats.accumulation_dtype(input.dtype)
    invstd = torch.rsqrt(var.to(acc) + eps).view(shape)
    x_hat = (input.to(acc) - mean.to(acc).view(shape)) * invstd
    dz = grad_output.to(acc)
    if act is not None:
        z = x_hat * weight.to(acc).view(shape) if weight is not None else x_hat
        if bias is not None:
            z = z + bias.to(acc).view(shape)
        if residual is not None:
            z = z + residual.to(acc)
        dz = dz * activation_grad(z, act)
    g = dz * weight.to(acc).view(shape) if weight is not None else dz
    if training:
        grad_input = invstd * (g - g.mean(dims, keepdim=True) - x_hat * (g * x_hat).mean(dims, keepdim=True))
    else:
        grad_input = g * invstd
    grad_weight = (dz * x_hat).sum(dims).to(weight.dtype) if weight is not None else None
    grad_bias = dz.sum(dims).to(bias.dtype) if bias is not None else None
    grad_residual = dz.to(residual.dtype) if residual is not None else None
    return grad_input.to(input.dtype), grad_weight, grad_bias, grad_residual
