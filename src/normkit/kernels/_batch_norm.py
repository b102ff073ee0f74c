"""Batch norm on Triton kernels: autograd functions for training (batch statistics) and evaluation (running ones).

Both compute ``y = act(bn(x) + residual)`` with ``act`` in ``None | "relu" | "silu"`` and save only the input, the
affine parameters, the residual (with an activation) and the per-channel float32 statistics: the backward
recomputes the activation's derivative. Under ``create_graph=True`` the backward runs
:func:`normkit.functional._fused.closed_form_backward` instead, so double backward works.
"""

from __future__ import annotations

import torch

from ..functional import _fused
from ..functional._layout import Layout, layout_of
from . import _bn_launch as launch
from ._support import supports

__all__ = ["batch_norm_eval", "batch_norm_train", "supports"]


def _require_supported(x: torch.Tensor, activation: str | None, residual: torch.Tensor | None) -> None:
    reason = supports(x, activation)
    if reason is not None:
        raise ValueError(f"normkit.kernels: this call is not supported ({reason}); use "
                         "normkit.functional.batch_norm, which falls back to the reference path.")
    if x.numel() == 0:
        raise ValueError(f"normkit.kernels: got an empty input {tuple(x.shape)}; use normkit.functional.batch_norm, "
                         "which handles empty batches.")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype
                                 or residual.device != x.device):
        raise ValueError(f"normkit.kernels: residual must have the input's shape, dtype and device "
                         f"({tuple(x.shape)}, {x.dtype}, {x.device}), got ({tuple(residual.shape)}, "
                         f"{residual.dtype}, {residual.device}).")


def _affine(weight, bias, channels: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous ``(C,)`` weight and bias; identity ones for ``None``."""
    w = weight.detach().reshape(-1).contiguous() if weight is not None else torch.ones(channels, device=device)
    b = bias.detach().reshape(-1).contiguous() if bias is not None else torch.zeros(channels, device=device)
    return w, b


def _backward(ctx, grad_output):
    """Shared backward of both functions: ``(dx, dweight, dbias, dresidual)``, each ``None`` unless needed."""
    x, weight, bias, residual, mean, var = ctx.saved_tensors
    need_x, need_w, need_b, need_r = ctx.need
    layout, act, training = ctx.layout, ctx.act, ctx.training
    if torch.is_grad_enabled():  # create_graph=True: the closed form in differentiable torch ops
        dx, dw, db, dr = _fused.closed_form_backward(grad_output, x, weight, bias, residual, mean, var, ctx.eps,
                                                     training, layout.channel, act)
    else:
        w, b = _affine(weight, bias, layout.channels, x.device)
        rstd = torch.rsqrt(var + ctx.eps)
        rc = layout.view(residual) if residual is not None else None
        dxc, dw, db, dzc = launch.backward(layout.view(grad_output), layout.view(x), layout.kind, w, b, mean, rstd,
                                           rc, act, training, layout.count, need_x, need_w or need_b,
                                           need_r and ctx.has_residual)
        dx = layout.restore(dxc) if dxc is not None else None
        dr = layout.restore(dzc) if dzc is not None else None
        dw = dw.to(weight.dtype) if dw is not None and weight is not None else None
        db = db.to(bias.dtype) if db is not None and bias is not None else None
    if ctx.has_residual and act is None:
        dr = grad_output  # without an activation the residual's gradient is dy itself
    return (dx if need_x else None, dw if need_w else None, db if need_b else None,
            dr if need_r and ctx.has_residual else None)


def _output_like(x: torch.Tensor) -> torch.Tensor:
    """The output: a new tensor (never a view, so in-place ops after the layer work) in ``x``'s memory format, whose
    canonical view shares its storage."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    channels_last = cl is not None and not x.is_contiguous() and x.is_contiguous(memory_format=cl)
    return torch.empty_like(x, memory_format=cl if channels_last else torch.contiguous_format)


def _save(ctx, x, weight, bias, residual, mean, var, layout: Layout, eps, act, training, need):
    ctx.save_for_backward(x, weight, bias, residual if act is not None else None, mean, var)
    ctx.layout, ctx.eps, ctx.act, ctx.training = layout, eps, act, training
    ctx.has_residual, ctx.need = residual is not None, need


class _TrainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps: float, channel: int, act: str | None):
        layout = layout_of(x, channel)
        xc = layout.view(x)
        mean, var = launch.moments(xc, layout.kind)
        w, b = _affine(weight, bias, layout.channels, x.device)
        rc = layout.view(residual) if residual is not None else None
        y = _output_like(x)
        launch.normalize(xc, layout.kind, mean, var, w, b, eps, rc, act, layout.view(y))
        _save(ctx, x, weight, bias, residual, mean, var, layout, eps, act, True, ctx.needs_input_grad[:4])
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        return (*_backward(ctx, grad_output), None, None, None)


class _EvalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, residual, eps: float, channel: int,
                act: str | None):
        layout = layout_of(x, channel)
        # float32 copies: a later update of the buffers must not change this call's gradient
        mean = running_mean.detach().reshape(-1).to(torch.float32, copy=True)
        var = running_var.detach().reshape(-1).to(torch.float32, copy=True)
        w, b = _affine(weight, bias, layout.channels, x.device)
        rc = layout.view(residual) if residual is not None else None
        y = _output_like(x)
        launch.normalize(layout.view(x), layout.kind, mean, var, w, b, eps, rc, act, layout.view(y))
        need = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:6])
        _save(ctx, x, weight, bias, residual, mean, var, layout, eps, act, False, need)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        dx, dw, db, dr = _backward(ctx, grad_output)
        return dx, None, None, dw, db, dr, None, None, None


def batch_norm_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                     channel_dim: int = 1, activation: str | None = None, residual: torch.Tensor | None = None):
    r"""Training batch norm on the Triton kernels: ``(y, mean, biased_var)``, ``y`` differentiable.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mu_B}{\sqrt{\sigma_B^2 + \epsilon}}\,\gamma + \beta + r\Big)

    The batch mean and biased variance come from a split reduction (per-tile ``(count, mean, M2)`` partials merged
    by Chan's formula) in float32; they are returned for the running update and are not differentiable.

    Args:
        x: ``(N, C, *)`` (or channels at ``channel_dim``), float32/float16/bfloat16, on CUDA (or CPU under
            ``TRITON_INTERPRET=1``).
        weight, bias: ``(C,)`` or ``None``.
        eps: added to the variance inside the square root.
        channel_dim: the channel dimension. Default: ``1``.
        activation: ``None`` (default), ``"relu"`` or ``"silu"``.
        residual: ``None`` or a tensor of ``x``'s shape and dtype added before the activation.

    Shape:
        - ``y``: as ``x`` (same dtype; channels_last stays channels_last). ``mean``, ``biased_var``: ``(C,)``
          float32.

    Examples (on a GPU)::

        y, mean, var = normkit.kernels.batch_norm_train(x.cuda(), w, b, 1e-5, activation="relu")
    """
    _require_supported(x, activation, residual)
    channel = channel_dim % x.dim()
    return _TrainFunction.apply(x, weight, bias, residual, eps, channel, activation)


def batch_norm_eval(x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *, channel_dim: int = 1,
                    activation: str | None = None, residual: torch.Tensor | None = None) -> torch.Tensor:
    r"""Evaluation batch norm on the Triton kernels (running statistics), differentiable in ``x``, the affine
    parameters and the residual.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \hat\mu}{\sqrt{\hat\sigma^2 + \epsilon}}\,\gamma + \beta + r\Big)

    Args:
        x, weight, bias, eps, channel_dim, activation, residual: as :func:`batch_norm_train`.
        running_mean, running_var: ``(C,)`` statistics that normalize (copied to float32; not differentiated).

    Shape:
        - ``y``: as ``x``.

    Examples (on a GPU)::

        y = normkit.kernels.batch_norm_eval(x.cuda(), rm, rv, w, b, 1e-5, residual=shortcut)
    """
    _require_supported(x, activation, residual)
    channel = channel_dim % x.dim()
    return _EvalFunction.apply(x, running_mean, running_var, weight, bias, residual, eps, channel, activation)
