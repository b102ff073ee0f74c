"""The ATen backend of batch norm: torch's own differentiable ops, called on the front's ``(N, C, *)`` tensor.

These are the ops :func:`torch.nn.functional.batch_norm` reaches, so values, gradients (double backward included),
strides and dtype handling are torch's, and everything around them works as it does for torch's layer: in-place ops
on the output, ``torch.compile`` (no graph break), ``torch.export``, ``torch.func`` and forward-mode AD. Nothing
here validates or decides a policy: :func:`normkit.functional.batch_norm` has done that.
"""

from __future__ import annotations

import torch


def evaluate(x, running_mean, running_var, weight, bias, eps, training=False):
    """Normalization with the running statistics (torch's eval-mode op; cuDNN on CUDA where torch takes it); also
    torch's answer to an empty batch (``training=True``: nothing to normalize, nothing updated)."""
    return torch.batch_norm(x, weight, bias, running_mean, running_var, training, 0.0, eps,
                            torch.backends.cudnn.enabled)


def train_in_place(x, weight, bias, running_mean, running_var, momentum, eps):
    """Training forward that moves the real running statistics by torch's own rule (unbiased variance; ``None``
    buffers: no update): ``(y, save_mean, save_invstd)``, the last two being the batch's mean and
    ``1 / sqrt(var + eps)`` (not differentiable)."""
    return torch.native_batch_norm(x, weight, bias, running_mean, running_var, True, momentum, eps)


def train(x, weight, bias, eps):
    """Training forward that returns the batch statistics for the front to store: ``(y, mean, biased var)``.

    ATen moves scratch buffers with momentum 1, which leaves exactly the batch mean and unbiased variance in them
    (its own numbers, no second pass over ``x``)."""
    channels = x.shape[1]
    count = x.numel() // channels
    dtype = weight.dtype if weight is not None else torch.float64 if x.dtype == torch.float64 else torch.float32
    scratch = torch.zeros(2, channels, dtype=dtype, device=x.device)
    mean, var = scratch[0], scratch[1]
    y = torch.native_batch_norm(x, weight, bias, mean, var, True, 1.0, eps)[0]
    return y, mean, var * ((count - 1) / count)
