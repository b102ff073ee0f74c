"""``normkit.functional.batch_norm``: one front (validation, torch's memory format, the dtype and non-finite policies,
the running-statistics update), then a backend that only computes."""

from __future__ import annotations

import math

import torch

from .. import kernels
from . import _aten, _checks, _compose, _dispatch, _layout, _stats, reference


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
    backend: str | None = None,
    num_batches_tracked: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""Batch normalization over every dimension but the channel one.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    In training the batch mean and the *biased* batch variance normalize, and the running statistics (if given)
    move in place by ``running = (1 - momentum) * running + momentum * batch``; ``running_var`` receives the
    unbiased variance ``var * n / (n - 1)`` unless ``running_var_mode="biased"`` (Keras and Flax store the biased
    one). In evaluation the running statistics normalize. Same positional signature and errors as
    :func:`torch.nn.functional.batch_norm`; statistics are accumulated in at least float32.

    Args:
        input: ``(N, C, *)`` tensor, or ``(N, *, C)`` with ``channel_dim=-1``.
        running_mean, running_var: ``(C,)`` buffers, updated in place when ``training``; may be ``None`` in
            training.
        weight, bias: ``(C,)`` affine parameters :math:`\gamma`, :math:`\beta`, or ``None``. Default: ``None``.
        training: normalize with the batch's statistics and update the running ones. Default: ``False``.
        momentum: EMA factor of the running update (torch convention). Default: ``0.1``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        running_var_mode: ``"unbiased"`` (torch) or ``"biased"`` (Keras, Flax): which variance is stored.
        channel_dim: the dimension holding the channels. Default: ``1``.
        nonfinite: when a channel's batch statistics are inf/NaN, ``"skip"`` (default) keeps that channel's
            running statistics unchanged, ``"propagate"`` lets them through as torch does, ``"raise"`` raises
            ``FloatingPointError`` before anything changes (this one synchronises with the device).
        backend: ``"cpu"`` (the default on every device: torch's ATen ops behind this front), ``"reference"``
            (the readable oracle) or ``"triton"`` (normkit's GPU kernels, on request until a GPU run has measured
            them; what they do not take, float64, ..., runs ``"cpu"``: see ``docs/kernels.md``).
            ``$NORMKIT_BACKEND`` sets it for every call that does not pass one. Whichever runs, validation, the
            output's memory format (torch's), the dtype policy and the running-statistics update are the same.
        num_batches_tracked: a counter to add one to when a training call succeeds (what the modules pass; inside
            the statistics kernel on ``"triton"``). Default: ``None``.

    Shape:
        - Input: :math:`(N, C, *)` (or channels at ``channel_dim``). Output: same shape, dtype and memory format.

    Examples::

        >>> import torch, normkit.functional as F
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> F.batch_norm(x, rm, rv, training=True).flatten()
        tensor([-1.3416, -0.4472,  0.4472,  1.3416])
        >>> rm, rv
        (tensor([0.2500]), tensor([1.0667]))
    """
    channel, momentum, eps = _checks.validate_batch_norm(input, running_mean, running_var, weight, bias, training,
                                                         momentum, eps, running_var_mode, channel_dim, nonfinite)
    x = _native(input, channel)
    name = _dispatch.backend_for(x, backend, op="batch_norm_train" if training else "batch_norm_eval")
    if name == "reference":  # autograd through elementwise ops: the input gradient in torch's format
        x = _native(_layout.gradient_in_torch_format(input), channel)
    if x.numel() == 0:  # torch's result: an empty output that still depends on the affine parameters
        output = _aten.evaluate(x, running_mean, running_var, weight, bias, eps, training)
    elif not training:
        output = _evaluate(name, x, running_mean, running_var, weight, bias, eps)
    elif name == "triton":  # the kernels move the running statistics and the counter themselves where they can
        output = train_on_kernels(x, weight, bias, running_mean, running_var, momentum, eps, running_var_mode,
                                  nonfinite, num_batches_tracked)
        return output if channel == 1 else output.view(input.shape)
    elif (name == "cpu" and (running_var_mode == "unbiased" or running_mean is None) and type(momentum) is float
          and not _dispatch.composes_training(x, nonfinite)):
        output = _train_in_place(x, weight, bias, running_mean, running_var, momentum, eps, nonfinite)
    else:
        output, mean, var = _train(name, x, weight, bias, eps, nonfinite)
        _stats.update_running_stats(running_mean, running_var, mean, var, x.numel() // max(x.shape[1], 1),
                                    momentum, running_var_mode, nonfinite)
    if training and num_batches_tracked is not None:  # only after a call that succeeded
        num_batches_tracked.add_(1)
    return output if channel == 1 else output.view(input.shape)


def train_on_kernels(x, weight, bias, running_mean, running_var, momentum, eps, running_var_mode, nonfinite,
                     num_batches_tracked, activation=None, residual=None) -> torch.Tensor:
    """A validated, non-empty training call on the Triton kernels (``act(bn(x) + residual)``): the statistics
    kernel moves the running statistics and ``num_batches_tracked`` itself (two launches forward) when the momentum
    is a float, the policy needs no host read (not ``"raise"``) and it can write the buffers (float32/16/bf16 on
    the input's device); otherwise the front moves them after the kernels, as on every other backend."""
    if type(momentum) is float and nonfinite != "raise" and (running_mean is None or (
            running_mean.dtype in kernels.BUFFER_DTYPES and running_var.dtype in kernels.BUFFER_DTYPES
            and running_mean.device == x.device == running_var.device)):
        return kernels.batch_norm_train(x, weight, bias, eps, activation=activation, residual=residual,
                                        running_mean=running_mean, running_var=running_var,
                                        num_batches_tracked=num_batches_tracked, momentum=momentum,
                                        running_var_mode=running_var_mode, nonfinite=nonfinite, checked=True)[0]
    output, mean, var = kernels.batch_norm_train(x, weight, bias, eps, activation=activation, residual=residual,
                                                 checked=True)
    _stats.update_running_stats(running_mean, running_var, mean, var, x.numel() // x.shape[1], momentum,
                                running_var_mode, nonfinite)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return output


def _native(input: torch.Tensor, channel: int) -> torch.Tensor:
    """The tensor every backend computes on: ``(N, C, *)`` dense in torch's memory format for that input (a copy
    only for sliced, transposed or expanded inputs), or, for channels at another ``channel_dim``, the contiguous
    input viewed as ``(P, C, S)`` (``(P, C)`` when nothing follows the channels)."""
    if channel == 1:
        return _layout.in_torch_format(input)
    before, after = math.prod(input.shape[:channel]), math.prod(input.shape[channel + 1:])
    shape = (before, input.shape[channel]) if after == 1 else (before, input.shape[channel], after)
    return input.contiguous().view(shape)


def _evaluate(name, x, running_mean, running_var, weight, bias, eps):
    if name == "triton":
        return kernels.batch_norm_eval(x, running_mean, running_var, weight, bias, eps)
    if name == "reference":
        return reference.normalize(x, 1, running_mean, running_var, weight, bias, eps)
    return _aten.evaluate(x, running_mean, running_var, weight, bias, eps)


def _train(name, x, weight, bias, eps, nonfinite="skip"):
    """``(output, batch mean, biased batch variance)`` from the backend, for the front to store."""
    if name == "triton":
        return kernels.batch_norm_train(x, weight, bias, eps)
    if name == "reference":
        return reference.train_forward(x, 1, weight, bias, eps)
    if _dispatch.composes_training(x, nonfinite):
        return _compose.ComposedTrain.apply(x, weight, bias, eps)
    return _aten.train(x, weight, bias, eps)


def _train_in_place(x, weight, bias, running_mean, running_var, momentum, eps, nonfinite):
    """ATen moves the buffers by torch's rule; the non-finite policy then puts back what it must. Eagerly on CPU
    one cheap host read tells whether any running value came out non-finite (nothing to do otherwise); elsewhere
    the same correction runs branch-free."""
    if nonfinite == "propagate" or running_mean is None:
        return _aten.train_in_place(x, weight, bias, running_mean, running_var, momentum, eps)[0]
    old = torch.stack((running_mean, running_var))
    output, save_mean, save_invstd = _aten.train_in_place(x, weight, bias, running_mean, running_var, momentum, eps)
    if nonfinite == "skip" and _dispatch.eager_cpu(x) and math.isfinite(torch.dot(running_mean, running_var)):
        return output
    _stats.restore_nonfinite_channels(running_mean, running_var, old, save_mean, save_invstd, nonfinite)
    return output


def train_with_statistics(input: torch.Tensor, channel: int, weight, bias, eps: float, backend: str | None = None):
    """A validated training call without running statistics through the front: ``(output, batch mean, biased
    batch variance)``, the statistics in at least float32 and not differentiable. For the layers built on batch
    norm's training pass (batch renorm, BatchNormAct)."""
    x = _native(input, channel)
    if x.numel() == 0:
        nan = torch.full((x.shape[1],), float("nan"), device=x.device)
        output, mean, var = _aten.evaluate(x, None, None, weight, bias, eps, True), nan, nan
    else:
        output, mean, var = _train(_dispatch.backend_for(x, backend, op="batch_norm_train"), x, weight, bias, eps)
    return (output if channel == 1 else output.view(input.shape)), mean, var
