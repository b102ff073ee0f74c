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
        # (1, S) @ (S, 1) per plane; the transposed view (not a reshape) lets BLAS read b without a copy.
        rows_b = b.reshape(planes * channels, 1, size)
        products = torch.bmm(a.reshape(planes * channels, 1, size), rows_b.transpose(1, 2))
        return products.view(planes, channels).sum(0)
    return (a * b).sum(0)


def _count(xc: torch.Tensor, kind: str) -> int:
    return xc.shape[0] * xc.shape[2] if kind == "planes" else xc.shape[0]


# Centred copies are made a block of this many bytes at a time: a temporary of the input's size would come from
# fresh pages (glibc hands such blocks back to the OS), and page faults would cost more than the arithmetic.
BLOCK_BYTES = 4 << 20


# The corrected two-pass formula loses about (mean - shift)^2 / var ulps; past this ratio the shift is redone.
SHIFT_TOLERANCE = 1e3


def moments(xc: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance, in at least float32.

    Corrected two-pass with a shift ``K`` per channel: ``mean = K + sum(x - K) / n`` and
    ``var = sum((x - K)^2) / n - (mean - K)^2``, exact to rounding when ``K`` is near the mean. ``K`` is the first
    sample's mean (a 1/N read); if it lands too far from the batch mean (``(mean - K)^2 > 1e3 var``, a host
    check, free on CPU), a second round runs with ``K`` = that mean.
    """
    acc = _stats.accumulation_dtype(xc.dtype)
    first = xc[:1]
    shift = _sum(first, kind, dtype=acc) / _count(first, kind)
    mean, var = _shifted_moments(xc, kind, shift, acc)
    if xc.device.type == "cpu" and bool(((mean - shift) ** 2 > SHIFT_TOLERANCE * var).any()):
        mean, var = _shifted_moments(xc, kind, mean, acc)
    return mean, var


def _shifted_moments(xc, kind, shift, acc):
    count = _count(xc, kind)
    centred_sum = torch.zeros_like(shift)
    squares_sum = torch.zeros_like(shift)
    step = max(1, BLOCK_BYTES // max(1, xc[:1].numel() * torch.finfo(acc).bits // 8))
    for start in range(0, xc.shape[0], step):
        centred = xc[start:start + step] - _per_channel(shift, kind)  # type promotion gives `acc`
        centred_sum += _sum(centred, kind)
        squares_sum += _sum_of_squares_(centred, kind)
    correction = centred_sum / count
    var = (squares_sum / count - correction * correction).clamp_min(0)
    return shift + correction, var


def _sum_of_squares_(t: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-channel sum of ``t * t``; may overwrite ``t``."""
    return _dot(t, t, kind) if kind == "planes" else t.square_().sum(0)


def affine_coefficients(mean, var, weight, bias, eps):
    """``scale`` and ``shift`` with ``y = x * scale + shift``, in the statistics' dtype."""
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.to(scale.dtype)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.to(scale.dtype)
    return scale, shift


def scale_shift(xc: torch.Tensor, kind: str, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` per channel, one pass, in the input's dtype.

    On ``planes`` the per-channel multiply-add of ATen's inference batch norm (called with mean 0, variance 1 and
    eps 0, so it applies ``scale`` and ``shift`` exactly) is the fastest such pass; on ``rows`` ``addcmul`` is.
    """
    if kind == "planes":
        identity_mean, identity_var = torch.zeros_like(scale), torch.ones_like(scale)
        return torch.ops.aten._native_batch_norm_legit_no_training(xc, scale, shift, identity_mean, identity_var,
                                                                   0.0, 0.0)[0]
    return torch.addcmul(shift, xc, scale).to(xc.dtype)


def per_channel_affine(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``x * scale + shift`` along dim 1 of an ``(N, C, *)`` tensor in its own memory format, as a new tensor (not
    a view: in-place ops after the layer work), by ATen's inference batch norm with mean 0, variance 1 and eps 0."""
    return torch.ops.aten._native_batch_norm_legit_no_training(x, scale, shift, torch.zeros_like(scale),
                                                               torch.ones_like(scale), 0.0, 0.0)[0]


class ComposedTrain(torch.autograd.Function):
    """Training forward of an NCHW-contiguous ``(N, C, *)`` tensor with :func:`moments` and ATen's per-channel
    multiply-add; ATen's training backward (the closed form in differentiable ops under ``create_graph``).

    Returns ``(y, mean, biased var)``; ``y`` is a fresh tensor of the input's shape (not a view), so in-place ops
    after the layer work. Eager CPU only (see ``_dispatch.composes_training``): torch.func, forward-mode AD and the
    compilers take ATen's ops instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps: float):
        xc = x.view(x.shape[0], x.shape[1], -1)
        mean, var = moments(xc, "planes")
        y = per_channel_affine(x, *affine_coefficients(mean, var, weight, bias, eps))
        ctx.save_for_backward(x, weight, mean, var)
        ctx.eps = eps
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        from . import reference

        x, weight, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: statistics as functions of x, in differentiable ops
            mean, var = reference.batch_moments(x, 1)
            dx, dw, db = reference.batch_norm_backward(grad_output, x, weight, mean, torch.rsqrt(var + ctx.eps),
                                                       True, 1)
        else:
            mask = [need[0], weight is not None and need[1], need[2]]
            dx, dw, db = torch.ops.aten.native_batch_norm_backward(
                grad_output, x, weight, None, None, mean, torch.rsqrt(var + ctx.eps), True, ctx.eps, mask)
        return dx if need[0] else None, dw if need[1] else None, db if need[2] else None, None
