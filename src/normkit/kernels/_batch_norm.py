"""Batch norm on Triton kernels: autograd functions for training (batch statistics) and evaluation (running ones).

Both compute ``y = act(bn(x) + residual)`` with ``act`` in ``None | "relu" | "silu"`` and save only the input, the
affine parameters, the residual (with an activation) and the per-channel float32 statistics: the backward
recomputes the activation's derivative. Under ``create_graph=True`` the backward runs
:func:`normkit.functional._fused.closed_form_backward` instead, so double backward works.
"""

from __future__ import annotations

import torch

from ..functional import _fused
from . import _bn_launch as launch
from . import _bn_ops as _ops
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


def _flat_param(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.detach().reshape(-1) if t is not None and t.dim() != 1 else t


def train_forward(x, weight, bias, residual, running_mean, running_var, counter, momentum: float, eps: float,
                  bessel: float, skip_nonfinite: bool, channel: int, act: str | None, want_bits: bool = False):
    """``(y, stats, bits)``: the output, the ``(2, C)`` float32 batch mean and biased variance, and (``want_bits``,
    for ReLU) the sign of the pre-activation as a bitmask for the backward, else ``None``; in two launches that
    also move the running statistics and the counter (those given). What the ``normkit::bn_train`` op runs."""
    plan = launch.plan_for(x, channel)
    xc = plan.view(x)
    stats = launch.moments(plan, xc, running_mean, running_var, counter, momentum, bessel, skip_nonfinite)
    y = plan.new_like(x)
    bits = torch.empty(((plan.numel + 7) // 8,), dtype=torch.uint8, device=x.device) if want_bits else None
    launch.normalize(plan, xc, stats[0], stats[1], _flat_param(weight), _flat_param(bias), eps,
                     plan.view(residual) if residual is not None else None, act, y, bits)
    return plan.result(y), stats, bits


def eval_forward(x, running_mean, running_var, weight, bias, residual, eps: float, channel: int, act: str | None):
    """The output normalized by the running statistics, in one launch (``normkit::bn_eval``)."""
    plan = launch.plan_for(x, channel)
    y = plan.new_like(x)
    launch.normalize(plan, plan.view(x), running_mean, running_var, _flat_param(weight), _flat_param(bias), eps,
                     plan.view(residual) if residual is not None else None, act, y)
    return plan.result(y)


def backward(grad_output, x, weight, bias, residual, mean, var, eps: float, channel: int, act: str | None,
             training: bool, need: tuple[bool, bool, bool, bool], bits: torch.Tensor | None = None):
    """``(dx, dweight, dbias, dresidual)`` by the kernels (``None`` where not needed), ``normkit::bn_backward``.
    ``dresidual`` is only computed for an activation (else it is ``grad_output`` itself); ``bits``, the forward's
    ReLU bitmask, is read instead of the residual."""
    plan = launch.plan_for(x, channel)
    dx = plan.new_like(x) if need[0] else None
    dz = plan.new_like(x) if need[3] else None
    dw, db = launch.backward(plan, plan.view(grad_output), plan.view(x), _flat_param(weight), _flat_param(bias),
                             mean, var, eps, plan.view(residual) if residual is not None else None, act, training,
                             need, dx, dz, bits)
    dw = dw.view(weight.shape) if dw is not None and dw.shape != weight.shape else dw
    db = db.view(bias.shape) if db is not None and db.shape != bias.shape else db
    return (plan.result(dx) if dx is not None else None), dw, db, (plan.result(dz) if dz is not None else None)


def _backward(ctx, grad_output):
    """Shared backward of both functions: ``(dx, dweight, dbias, dresidual)``, each ``None`` unless needed."""
    x, weight, bias, residual, mean, var, bits = ctx.saved_tensors
    eps, channel, act, training, has_residual, (need_x, need_w, need_b, need_r) = ctx.config
    if grad_output is None:
        return None, None, None, None
    if torch.is_grad_enabled():  # create_graph=True: the closed form in differentiable torch ops
        dx, dw, db, dr = _fused.closed_form_backward(grad_output, x, weight, bias, residual, mean, var, eps,
                                                     training, channel, act)
    else:
        need = (need_x, need_w, need_b, need_r and has_residual and act is not None)
        dx, dw, db, dr = _ops.backward(grad_output, x, weight, bias, residual, mean, var, eps, channel, act, training,
                                       need, bits)
    if has_residual and act is None:
        dr = grad_output  # without an activation the residual's gradient is dy itself
    return (dx if need_x else None, dw if need_w else None, db if need_b else None,
            dr if need_r and has_residual else None)


def _save(ctx, x, weight, bias, residual, mean, var, eps, channel, act, training, need, bits=None):
    # the residual stays saved next to the bitmask: double backward's closed form recomputes z from it
    ctx.save_for_backward(x, weight, bias, residual if act is not None else None, mean, var, bits)
    ctx.config = (eps, channel, act, training, residual is not None, need)
    ctx.set_materialize_grads(False)


def _needs_graph(x, weight, bias, residual) -> bool:
    """Whether autograd records this call (grad mode on and a tensor that requires grad)."""
    return torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)
                                        or (bias is not None and bias.requires_grad)
                                        or (residual is not None and residual.requires_grad))


def _c_apply(function, *args):
    """The C++ ``apply`` under ``function.apply``, skipping its Python bookkeeping for functorch transforms (about
    9 us a call; only where ``_bn_ops.plain_eager``)."""
    return super(torch.autograd.Function, function).apply(*args)


class _TrainFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, running_mean, running_var, counter, config):
        momentum, eps, bessel, skip_nonfinite, channel, act = config
        want_bits = act == "relu" and residual is not None  # the backward reads 1 bit, not the residual
        y, stats, bits = _ops.train(x, weight, bias, residual, running_mean, running_var, counter, momentum, eps,
                                    bessel, skip_nonfinite, channel, act, want_bits)
        mean, var = stats[0], stats[1]
        _save(ctx, x, weight, bias, residual, mean, var, eps, channel, act, True, ctx.needs_input_grad[:4], bits)
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        return (*_backward(ctx, grad_output), None, None, None, None)


class _EvalFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, residual, config):
        eps, channel, act = config
        y = _ops.evaluate(x, running_mean, running_var, weight, bias, residual, eps, channel, act)
        need = (ctx.needs_input_grad[0], *ctx.needs_input_grad[3:6])
        # the buffers themselves, as torch saves them: torch's running update does not bump their version either
        _save(ctx, x, weight, bias, residual, running_mean, running_var, eps, channel, act, False, need)
        return y

    @staticmethod
    def backward(ctx, grad_output):
        dx, dw, db, dr = _backward(ctx, grad_output)
        return dx, None, None, dw, db, dr, None


def batch_norm_train(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float, *,
                     channel_dim: int = 1, activation: str | None = None, residual: torch.Tensor | None = None,
                     running_mean: torch.Tensor | None = None, running_var: torch.Tensor | None = None,
                     num_batches_tracked: torch.Tensor | None = None, momentum: float = 0.1,
                     running_var_mode: str = "unbiased", nonfinite: str = "skip", checked: bool = False):
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
        running_mean, running_var: ``(C,)`` float32/float16/bfloat16 buffers the statistics kernel moves in place by
            ``(1 - momentum) * running + momentum * batch`` (the unbiased variance unless
            ``running_var_mode="biased"``), or ``None``. Default: ``None``.
        num_batches_tracked: a counter the statistics kernel adds one to, or ``None``. Default: ``None``.
        momentum: the running update's factor. Default: ``0.1``.
        running_var_mode: ``"unbiased"`` (torch) or ``"biased"`` (Keras). Default: ``"unbiased"``.
        nonfinite: ``"skip"`` keeps a channel's running statistics when its batch statistics are not finite,
            ``"propagate"`` lets them through. Default: ``"skip"``.
        checked: the caller has asked :func:`supports` already (normkit's front): skip the check. Default:
            ``False``.

    Shape:
        - ``y``: as ``x`` (same dtype; channels_last stays channels_last). ``mean``, ``biased_var``: ``(C,)``
          float32.

    Examples (on a GPU)::

        y, mean, var = normkit.kernels.batch_norm_train(x.cuda(), w, b, 1e-5, activation="relu")
    """
    if not checked:
        _require_supported(x, activation, residual)
    channel = channel_dim % x.dim()
    count = x.numel() // x.shape[channel]
    bessel = 1.0 if running_var_mode == "biased" else count / (count - 1) if count > 1 else float("nan")
    config = (float(momentum), float(eps), bessel, nonfinite == "skip", channel, activation)
    if not _needs_graph(x, weight, bias, residual):
        y, stats, _ = _ops.train(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, *config,
                                 False)
        return y, stats[0], stats[1]
    if _ops.plain_eager(x):
        return _c_apply(_TrainFunction, x, weight, bias, residual, running_mean, running_var, num_batches_tracked,
                        config)
    return _TrainFunction.apply(x, weight, bias, residual, running_mean, running_var, num_batches_tracked, config)


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
    if not _needs_graph(x, weight, bias, residual):
        return _ops.evaluate(x, running_mean, running_var, weight, bias, residual, float(eps), channel, activation)
    config = (float(eps), channel, activation)
    if _ops.plain_eager(x):
        return _c_apply(_EvalFunction, x, running_mean, running_var, weight, bias, residual, config)
    return _EvalFunction.apply(x, running_mean, running_var, weight, bias, residual, config)
