"""Batch-norm passes through ATen's native kernels, for the layouts where they measure fastest (BENCHMARKS.md).

Only whole passes are delegated, never the semantics: running statistics, the stored variance, non-finite
handling and validation stay normkit's. ATen's training forward is called on scratch buffers with momentum 1, so
it hands back its (double-accumulated) batch mean and unbiased variance instead of moving any real buffer.
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
    y, _, _ = torch.ops.aten._native_batch_norm_legit(xc, weight, bias, mean, var, True, 1.0, eps)
    var.mul_((count - 1) / count)
    return y, mean, var


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
