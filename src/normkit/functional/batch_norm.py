"""``normkit.functional.batch_norm``: validation, dispatch, the running-statistics update, an explicit backward."""

from __future__ import annotations

import torch

from .. import kernels
from . import _aten, _dispatch, _stats, reference
from ._layout import Layout, layout_of


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
        backend: ``"cpu"`` (the fastest measured path on any device), ``"reference"`` (the readable oracle) or
            ``"triton"`` (normkit's GPU kernels); ``$NORMKIT_BACKEND`` overrides the default, which is
            ``"triton"`` for CUDA tensors the kernels take and ``"cpu"`` otherwise. A forced ``"triton"`` falls
            back to ``"reference"`` for what the kernels do not take (float64, ...; see ``docs/kernels.md``).

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
    channel = reference.validate_batch_norm(input, running_mean, running_var, weight, bias, training, momentum,
                                            eps, running_var_mode, channel_dim, nonfinite)
    backend = _dispatch.backend_for(input, backend)
    if backend == "reference":
        return reference.batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                                    running_var_mode=running_var_mode, channel_dim=channel, nonfinite=nonfinite)
    if input.numel() == 0:
        return _empty_output(input, weight, bias)
    layout = layout_of(input, channel)
    if backend == "triton":
        if training:
            output, mean, var = kernels.batch_norm_train(input, weight, bias, eps, channel_dim=channel)
        else:
            output = kernels.batch_norm_eval(input, running_mean, running_var, weight, bias, eps,
                                             channel_dim=channel)
    elif training and running_var_mode == "unbiased" and _dispatch.aten_in_place(input, layout):
        # ATen's kernels win both passes on this layout (BENCHMARKS.md) and its running update is torch's rule:
        # call its differentiable op on the real buffers (its backward is ATen's own, double backward included).
        xn = _aten.native_view(input, layout)
        yn = _aten.train_forward_in_place(xn, weight, bias, running_mean, running_var, momentum, eps, nonfinite)
        return _aten.native_restore(yn, input, layout)
    elif _dispatch.aten_end_to_end(layout, training):
        xn = _aten.native_view(input, layout)
        if training:
            yn, mean, var = _aten.train_forward(xn, layout.kind, weight, bias, eps)
        else:
            yn = _aten.normalize(xn, layout.kind, running_mean, running_var, weight, bias, eps)
        output = _aten.native_restore(yn, input, layout)
    elif _needs_grad(input, weight, bias):
        output, mean, var = _BatchNorm.apply(input, weight, bias, running_mean, running_var, training, eps, layout)
    else:
        output, mean, var = _forward(input, weight, bias, running_mean, running_var, training, eps, layout)
    if training:
        if nonfinite == "raise":
            _stats.require_finite_statistics(mean, var)
        with torch.no_grad():
            _stats.update_running_stats(running_mean, running_var, mean, var, layout.count, momentum,
                                        running_var_mode, nonfinite)
    return output


def _needs_grad(input, weight, bias) -> bool:
    return torch.is_grad_enabled() and (input.requires_grad or any(
        t is not None and t.requires_grad for t in (weight, bias)))


def _forward(input, weight, bias, running_mean, running_var, training, eps, layout):
    """The forward passes without autograd: ``(output, mean, biased var)``."""
    xc = layout.view(input)
    if training:
        yc, mean, var = _dispatch.train_forward(xc, layout.kind, weight, bias, eps)
    else:
        mean, var = running_mean, running_var
        yc = _dispatch.normalize(xc, layout.kind, mean, var, weight, bias, eps)
    return layout.restore(yc), mean, var


def _empty_output(input, weight, bias):
    """torch's result for an empty batch: an empty tensor that still depends on the affine parameters."""
    output = input.clone()
    if weight is not None:
        output = output * weight.view(-1)[:1].to(input.dtype).sum()
    if bias is not None:
        output = output + bias.view(-1)[:1].to(input.dtype).sum()
    return output


class _BatchNorm(torch.autograd.Function):
    """Forward through the dispatched passes; backward in closed form (differentiable under ``create_graph``)."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, training: bool, eps: float, layout: Layout):
        if not training:  # saved for backward: later updates of the buffers must not change this gradient
            acc = _stats.accumulation_dtype(input.dtype)
            running_mean, running_var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
        output, mean, var = _forward(input, weight, bias, running_mean, running_var, training, eps, layout)
        ctx.save_for_backward(input, weight, mean, var)
        ctx.training, ctx.eps, ctx.layout = training, eps, layout
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, mean, var = ctx.saved_tensors
        layout, training, eps = ctx.layout, ctx.training, ctx.eps
        grad_affine = weight is not None and (ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
        if torch.is_grad_enabled():  # create_graph=True: express the gradient through differentiable ops
            if training:
                mean, var = reference.batch_moments(input, layout.channel)
            grad_input, grad_weight, grad_bias = reference.batch_norm_backward(
                grad_output, input, weight, mean, torch.rsqrt(var + eps), training, layout.channel)
        else:
            dxc, grad_weight, grad_bias = _dispatch.backward(layout.view(grad_output), layout.view(input),
                                                             layout.kind, weight, mean, var, eps, training,
                                                             grad_affine)
            grad_input = layout.restore(dxc)
        return (
            grad_input if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None,
            grad_bias if ctx.needs_input_grad[2] else None,
            None, None, None, None, None,
        )
