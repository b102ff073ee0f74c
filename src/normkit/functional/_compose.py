"""Batch-norm passes as compositions of vectorised torch reductions, on the canonical layouts of ``_layout``.

Statistics are two-pass: a first sum gives a shift close to the mean, the data are centred once, and the sums of
the centred values give the mean's correction and the variance (the corrected two-pass algorithm), so a large mean
costs no precision. Per-plane sums of squares and of products are batched dot products (``bmm``), which BLAS runs
at memory speed.
"""

from __future__ import annotations

import torch

from . import _stats


def _per_channel(v: torch.Tensor, kind: str) -> torch.Tensor:
    """A ``(C,)`` vector shaped to broadcast over the canonical layout."""
    return v.view(-1, 1) if kind == "planes" else v


def _sum(t: torch.Tensor, kind: str, dtype=None) -> torch.Tensor:
    """Per-channel sum over a canonical tensor."""
    return t.sum(2, dtype=dtype).sum(0) if kind == "planes" else t.sum(0, dtype=dtype)


def _dot(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-channel sum of ``a * b`` over two canonical tensors of the same dtype."""
    if kind == "planes":
        planes, channels, size = a.shape
        products = torch.bmm(a.reshape(planes * channels, 1, size), b.reshape(planes * channels, size, 1))
        return products.view(planes, channels).sum(0)
    return (a * b).sum(0)


def _count(xc: torch.Tensor, kind: str) -> int:
    return xc.shape[0] * xc.shape[2] if kind == "planes" else xc.shape[0]


def moments(xc: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, in at least float32 (corrected two-pass)."""
    acc = _stats.accumulation_dtype(xc.dtype)
    count = _count(xc, kind)
    shift = _sum(xc, kind, dtype=acc) / count
    centred = xc - _per_channel(shift, kind)  # type promotion gives `acc`
    correction = _sum(centred, kind) / count
    var = (_dot(centred, centred, kind) / count - correction * correction).clamp_min(0)
    return shift + correction, var


def affine_coefficients(mean, var, weight, bias, eps):
    """``scale`` and ``shift`` with ``y = x * scale + shift``, in the statistics' dtype."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return scale, shift


def normalize(xc, kind, mean, var, weight, bias, eps) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` as one fused multiply-add, in the input's dtype."""
    scale, shift = affine_coefficients(mean, var, weight, bias, eps)
    return torch.addcmul(_per_channel(shift, kind), xc, _per_channel(scale, kind)).to(xc.dtype)


def backward(dyc, xc, kind, weight, mean, var, eps, training, grad_affine):
    """Closed-form gradients; see :func:`normkit.functional.reference.batch_norm_backward` for the math."""
    acc = mean.dtype
    dyf = dyc.to(acc)
    invstd = torch.rsqrt(var + eps)
    gain = invstd * weight.to(acc) if weight is not None else invstd
    need_dot = training or grad_affine
    sum_dy = _sum(dyf, kind) if (training or grad_affine) else None
    centred = xc - _per_channel(mean, kind) if need_dot else None
    sum_dy_centred = _dot(dyf, centred, kind) if need_dot else None
    if training:
        count = _count(xc, kind)
        along_centred = -gain * invstd * invstd * sum_dy_centred / count
        constant = -gain * sum_dy / count
        dxc = torch.addcmul(_per_channel(constant, kind), centred, _per_channel(along_centred, kind))
        dxc.addcmul_(dyf, _per_channel(gain, kind))
    else:
        dxc = dyf * _per_channel(gain, kind)
    if not grad_affine:
        return dxc.to(xc.dtype), None, None
    return dxc.to(xc.dtype), (sum_dy_centred * invstd).to(weight.dtype), sum_dy.to(weight.dtype)
