"""Batch-norm passes through ATen's native kernels, for the layouts where they measure fastest (BENCHMARKS.md).

Only whole passes are delegated, never the semantics: the stored variance, non-finite handling and validation
stay normkit's. :func:`train_forward` calls ATen's training forward on scratch buffers with momentum 1, so it hands
back the batch mean and unbiased variance without moving any real buffer; :func:`train_forward_in_place` lets ATen
move the real buffers by torch's own rule (unbiased variance) and applies normkit's non-finite policy on top.
"""

from __future__ import annotations

import math

import torch

from . import _stats


def train_forward(xc, kind, weight, bias, eps):
    channels = xc.shape[1]
    count = xc.numel() // channels
    param_dtype = weight.dtype if weight is not None else _stats.accumulation_dtype(xc.dtype)
    mean = torch.zeros(channels, dtype=param_dtype, device=xc.device)
    var = torch.zeros_like(mean)
    y, _, _ = torch.native_batch_norm(xc, weight, bias, mean, var, True, 1.0, eps)
    return y, mean, var * ((count - 1) / count)  # out of place: autograd saved the scratch buffers


def native_view(t: torch.Tensor, layout) -> torch.Tensor:
    """``t`` as ATen's kernels take it fastest: ``(N, C, *)`` as is when contiguous or channels_last, else the
    canonical view (a view costs a few microseconds under autograd, so skip it where it is not needed)."""
    if layout.channel == 1 and (t.is_contiguous() or (t.dim() in (4, 5) and t.is_contiguous(
            memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d))):
        return t
    return layout.view(t)


def native_restore(y: torch.Tensor, t: torch.Tensor, layout) -> torch.Tensor:
    """Undo :func:`native_view`."""
    return y if y.shape == t.shape else layout.restore(y)


def train_forward_in_place(xc, weight, bias, running_mean, running_var, momentum, eps, nonfinite):
    """ATen's training forward moving ``running_mean``/``running_var`` itself (``running_var_mode="unbiased"``).

    A channel whose updated statistics are not finite got them from a non-finite batch (or had them already):
    ``nonfinite="skip"`` puts its old values back, ``"raise"`` puts every old value back and raises. The check is
    one host read, free on CPU; the dispatcher sends other devices and ``torch.compile`` down the path that needs
    none.
    """
    if running_mean is None or nonfinite == "propagate":
        return torch.native_batch_norm(xc, weight, bias, running_mean, running_var, True,
                                                       momentum, eps)[0]
    old = torch.stack([running_mean, running_var])
    y = torch.native_batch_norm(xc, weight, bias, running_mean, running_var, True, momentum,
                                                eps)[0]
    if math.isfinite(torch.dot(running_mean, running_var).item()):  # any inf/NaN (or an overflow) makes it so
        return y
    finite = torch.isfinite(running_mean + running_var)
    # .data: ATen's autograd node saved the buffers (unused in training); restoring them must not bump their
    # version and break this call's backward.
    running_mean.data.copy_(torch.where(finite, running_mean, old[0]) if nonfinite == "skip" else old[0])
    running_var.data.copy_(torch.where(finite, running_var, old[1]) if nonfinite == "skip" else old[1])
    if nonfinite == "raise":
        _stats.require_finite_channels(finite)
    return y


def normalize(xc, kind, mean, var, weight, bias, eps):
    if weight is not None and mean.dtype != weight.dtype:
        mean, var = mean.to(weight.dtype), var.to(weight.dtype)
    if torch.jit.is_tracing():  # the TorchScript ONNX exporter knows aten::batch_norm only
        return torch.batch_norm(xc, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)
    return torch.ops.aten._native_batch_norm_legit_no_training(xc, weight, bias, mean, var, 0.0, eps)[0]


def backward(dyc, xc, kind, weight, mean, var, eps, training, grad_affine):
    mask = [True, grad_affine, grad_affine]
    if weight is not None and mean.dtype != weight.dtype:  # ATen wants one dtype for parameters and statistics
        mean, var = mean.to(weight.dtype), var.to(weight.dtype)
    if training:
        invstd = torch.rsqrt(var + eps)
        dxc, dw, db = torch.ops.aten.native_batch_norm_backward(dyc, xc, weight, None, None, mean, invstd, True,
                                                                eps, mask)
    else:
        dxc, dw, db = torch.ops.aten.native_batch_norm_backward(dyc, xc, weight, mean, var, None, None, False,
                                                                eps, mask)
    return dxc, dw, db
