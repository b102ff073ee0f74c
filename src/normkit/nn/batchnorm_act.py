"""``BatchNormAct1d/2d/3d``: batch norm, an optional residual and an activation with one fused backward."""

from __future__ import annotations

import torch

from .. import kernels
from ..functional import _dispatch, _stats, reference
from ..functional._fused import closed_form_backward
from ..functional._layout import Layout, layout_of
from ..functional.batch_norm import _forward
from ..functional.reference import activate as _activate
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d

ACTIVATIONS = ("relu", "silu", "gelu", None)


class _BatchNormAct(torch.autograd.Function):
    """``act(bn(x) + residual)`` forward through the dispatched BN passes; one closed-form backward.

    Nothing beyond the inputs and the per-channel statistics is saved: the backward recomputes the pre-activation
    ``x_hat * gamma + beta + residual`` from them, multiplies the incoming gradient by the activation's derivative
    there, and runs the batch-norm closed form on that (the residual's gradient is the same product).
    """

    @staticmethod
    def forward(ctx, input, weight, bias, residual, running_mean, running_var, training: bool, eps: float,
                layout: Layout, act: str | None):
        if not training:  # saved for backward: later updates of the buffers must not change this gradient
            acc = _stats.accumulation_dtype(input.dtype)
            running_mean, running_var = running_mean.to(acc, copy=True), running_var.to(acc, copy=True)
        z, mean, var = _forward(input, weight, bias, running_mean, running_var, training, eps, layout)
        if residual is not None:
            z = z.add_(residual)
        output = _activate(z, act)
        ctx.save_for_backward(input, weight, bias, residual, mean, var)
        ctx.training, ctx.eps, ctx.channel, ctx.act, ctx.layout = training, eps, layout.channel, act, layout
        ctx.mark_non_differentiable(mean, var)
        return output, mean, var

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_var):
        input, weight, bias, residual, mean, var = ctx.saved_tensors
        need = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: the same closed form in differentiable ops
            grad_input, grad_weight, grad_bias, grad_residual = _differentiable_backward(
                ctx, grad_output, input, weight, bias, residual, mean, var)
        else:
            layout, eps = ctx.layout, ctx.eps
            xc = layout.view(input)
            dz = grad_output
            if ctx.act is not None:  # the activation's derivative at the recomputed pre-activation
                z = layout.restore(_dispatch.normalize(xc, layout.kind, mean, var, weight, bias, eps))
                if residual is not None:
                    z = z.add_(residual)
                dz = _ACTIVATION_BACKWARD[ctx.act](grad_output, z)
            grad_affine = weight is not None and (need[1] or need[2])
            dxc, grad_weight, grad_bias = _dispatch.backward(layout.view(dz), xc, layout.kind, weight, mean, var,
                                                             eps, ctx.training, grad_affine)
            grad_input = layout.restore(dxc)
            grad_residual = dz if residual is not None and need[3] else None
        return (grad_input if need[0] else None, grad_weight if need[1] else None,
                grad_bias if need[2] else None, grad_residual if need[3] else None,
                None, None, None, None, None, None)


_ACTIVATION_BACKWARD = {
    "relu": lambda grad, z: torch.ops.aten.threshold_backward(grad, z, 0),
    "silu": torch.ops.aten.silu_backward,
    "gelu": lambda grad, z: torch.ops.aten.gelu_backward(grad, z, approximate="none"),
}


def _differentiable_backward(ctx, grad_output, input, weight, bias, residual, mean, var):
    """The fused closed form in plain torch ops (for double backward): ``(dx, dweight, dbias, dresidual)``."""
    return closed_form_backward(grad_output, input, weight, bias, residual, mean, var, ctx.eps, ctx.training,
                                ctx.channel, ctx.act)


class _BatchNormActMixin:
    """Forward of the fused layers; everything else (options, buffers, state_dict) is the plain BatchNorm's."""

    @staticmethod
    def _check_act(act) -> None:
        if act not in ACTIVATIONS:
            raise ValueError(
                f"act must be one of 'relu', 'silu', 'gelu' or None, got {act!r}. For another activation use a "
                "plain BatchNorm followed by the activation module."
            )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act={self.act!r}"

    def _check_residual(self, input: torch.Tensor, residual) -> None:
        if residual is None:
            return
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{type(self).__name__}: residual must be a torch.Tensor or None, got "
                            f"{type(residual).__name__}.")
        if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:
            raise ValueError(
                f"{type(self).__name__}: residual must have the input's shape, dtype and device "
                f"({tuple(input.shape)}, {input.dtype}, {input.device}), got ({tuple(residual.shape)}, "
                f"{residual.dtype}, {residual.device}). Project the shortcut (e.g. a 1x1 convolution) or convert "
                "it first; nothing was changed."
            )

    def _kernel_forward(self, input, residual, running_mean, running_var, uses_batch_stats):
        """``(output, mean, var)`` from :mod:`normkit.kernels` (statistics ``None`` with running ones)."""
        if uses_batch_stats:
            return kernels.batch_norm_train(input, self.weight, self.bias, self.eps, activation=self.act,
                                            residual=residual)
        output = kernels.batch_norm_eval(input, running_mean, running_var, self.weight, self.bias, self.eps,
                                         activation=self.act, residual=residual)
        return output, None, None

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        self._check_input_dim(input)
        self._check_residual(input, residual)
        running_mean, running_var, uses_batch_stats = self._buffers_for_call()
        momentum = self._ema_factor()
        channel = reference.validate_batch_norm(input, running_mean, running_var, self.weight, self.bias,
                                                uses_batch_stats, momentum, self.eps, self.running_var_mode, 1,
                                                self.nonfinite)
        if input.numel() == 0:  # nothing to fuse: the plain composition gives torch's empty-batch result
            z = super().forward(input)
            return _activate(z + residual if residual is not None else z, self.act)
        layout = layout_of(input, channel)
        if _dispatch.backend_for(input, refusal=lambda: kernels.supports(input, self.act)) == "triton":  # fused
            output, mean, var = self._kernel_forward(input, residual, running_mean, running_var, uses_batch_stats)
        else:
            output, mean, var = _BatchNormAct.apply(input, self.weight, self.bias, residual, running_mean,
                                                    running_var, uses_batch_stats, self.eps, layout, self.act)
        if uses_batch_stats:
            if self.nonfinite == "raise":
                _stats.require_finite_statistics(mean, var)
            with torch.no_grad():
                _stats.update_running_stats(running_mean, running_var, mean, var, layout.count, momentum,
                                            self.running_var_mode, self.nonfinite)
        if self._tracks_this_call():  # only after a call that succeeded: a failed call changes nothing
            self.num_batches_tracked.add_(1)
        return output


_DOC = r"""Batch normalization, an optional residual and an activation in one layer with one fused backward.

    .. math::
        y = \mathrm{act}\Big(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta
        + \mathrm{residual}\Big)

    A subclass of :class:`normkit.{bn}` (same arguments, buffers, parameters and state_dict, so weights of a plain
    batch norm load as they are). The backward saves only the input, the residual and the per-channel statistics:
    it recomputes the activation's derivative and applies the batch-norm closed form once.
    ``normkit.tools.sync`` does not convert this layer (it raises rather than drop the activation).

    Args:
        num_features, eps, momentum, affine, track_running_stats, device, dtype, bias, running_var, nonfinite:
            as :class:`normkit.{bn}` (defaults ``1e-5``, ``0.1``, ``True``, ``True``, ``None``, ``None``,
            ``True``, ``"unbiased"``, ``"skip"``).
        act: ``"relu"`` (default), ``"silu"``, ``"gelu"`` (exact, erf) or ``None`` (identity).

    Shape:
        - Input: ``{shape}``; ``residual``: ``None`` or the input's shape, dtype and device. Output: same as input.

    Examples::

        >>> import torch
        >>> from normkit.nn.batchnorm_act import {name}
        >>> layer = {name}(4, act="relu")
        >>> x = torch.randn({example})
        >>> y = layer(x, residual=torch.zeros_like(x))
        >>> y.shape, bool((y >= 0).all())
        (torch.Size([{example}]), True)
"""


def _make(base: type, name: str, shape: str, example: str) -> type:
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, device=None, dtype=None, *, bias: bool = True,
                 act: str | None = "relu", running_var: str = "unbiased", nonfinite: str = "skip") -> None:
        _BatchNormActMixin._check_act(act)  # before anything is allocated
        base.__init__(self, num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias,
                      running_var=running_var, nonfinite=nonfinite)
        self.act = act

    cls = type(name, (_BatchNormActMixin, base), {"__init__": __init__, "__module__": __name__})
    doc = _DOC
    for key, value in (("{bn}", base.__name__), ("{name}", name), ("{shape}", shape), ("{example}", example)):
        doc = doc.replace(key, value)
    cls.__doc__ = doc
    return cls


BatchNormAct1d = _make(BatchNorm1d, "BatchNormAct1d", "(N, C) or (N, C, L)", "8, 4")
BatchNormAct2d = _make(BatchNorm2d, "BatchNormAct2d", "(N, C, H, W)", "8, 4, 5, 5")
BatchNormAct3d = _make(BatchNorm3d, "BatchNormAct3d", "(N, C, D, H, W)", "8, 4, 3, 3, 3")

__all__ = ["BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d"]
