"""Batch-norm passes through ATen's native kernels, for the layouts where they measure fastest (BENCHMARKS.md).

Only whole passes are delegated, never the semantics: the stored variance, non-finite handling and validation
stay normkit's. :func:`train_forward` calls ATen's training forward on scratch buffers with momentum 1, so it hands
back the batch mean and unbiased variance without moving any real buffer; :func:`train_forward_in_place` lets ATen
move the real buffers by torch's own rule (unbiased variance) and applies normkit's non-finite policy on top.
"""

from __future__ import annotations

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


def train_forward_in_place(xc, weight, bias, running_mean, running_var, momentum, eps, nonfinite):
    """ATen's training forward moving ``running_mean``/``running_var`` itself (``running_var_mode="unbiased"``).

    A channel whose updated statistics are not finite got them from a non-finite batch (or had them already):
    ``nonfinite="skip"`` puts its old values back, ``"raise"`` puts every old value back and raises. On CPU the
    check is one host read; elsewhere the restore runs unconditionally, without a synchronisation.
    """
    if running_mean is None or nonfinite == "propagate":
        return torch.native_batch_norm(xc, weight, bias, running_mean, running_var, True,
                                                       momentum, eps)[0]
    old = torch.stack([running_mean, running_var])
    y = torch.native_batch_norm(xc, weight, bias, running_mean, running_var, True, momentum,
                                                eps)[0]
    finite = torch.isfinite(running_mean + running_var)
    if (xc.device.type == "cpu" or nonfinite == "raise") and bool(finite.all()):
        return y
    if nonfinite == "raise":
        running_mean.copy_(old[0])
        running_var.copy_(old[1])
        _stats.require_finite_channels(finite)
    running_mean.copy_(torch.where(finite, running_mean, old[0]))
    running_var.copy_(torch.where(finite, running_var, old[1]))
    return y


def normalize(xc, kind, mean, var, weight, bias, eps):
    if weight is not None:
        mean, var = mean.to(weight.dtype), var.to(weight.dtype)
    return torch.ops.aten._native_batch_norm_legit_no_training(xc, weight, bias, mean, var, 0.0, eps)[0]


def backward(dyc, xc, kind, weight, mean, var, eps, training, grad_affine):
    mask = [True, grad_affine, grad_affine]
    if weight is not None:  # ATen wants every parameter and statistic in one dtype
        mean, var = mean.to(weight.dtype), var.to(weight.dtype)
    if training:
        invstd = torch.rsqrt(var + eps)
        dxc, dw, db = torch.ops.aten.native_batch_norm_backward(dyc, xc, weight, None, None, mean, invstd, True,
                                                                eps, mask)
    else:
        dxc, dw, db = torch.ops.aten.native_batch_norm_backward(dyc, xc, weight, mean, var, None, None, False,
                                                                eps, mask)
    return dxc, dw, db
