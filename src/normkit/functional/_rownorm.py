"""Shared machinery of the per-sample norms (group, layer, instance): statistics over a set of trailing dims of a
"grouped" view, the closed-form backward, and the per-op choice between normkit's composition and ATen's kernel.

Every op is expressed on a view ``xg`` of its input in which the statistics are taken over ``dims`` (with keepdim):

- ``group_norm``: ``x.view(N, G, C // G, *spatial)``, dims ``(2, ...)``;
- ``instance_norm``: ``x`` itself, dims ``(2, ...)``;
- ``layer_norm``: ``x`` itself, dims = the last ``len(normalized_shape)``.

A view of a channels_last tensor keeps its strides and elementwise ops follow them, so the output of the composition
has the input's memory format.

Backends: ``group_norm`` and ``layer_norm`` run normkit's Triton kernels (``normkit.kernels``) when
:func:`~normkit.functional._dispatch.backend_for` says ``"triton"``: by default for CUDA tensors the kernels take,
or when forced. Calls the kernels do not take (float64, parameters on another device, empty inputs, ...) run the
ATen path below (``fallback="cpu"``).
``instance_norm`` has no kernel of its own: under ``"triton"`` it runs the ATen path. See docs/kernels-rownorm.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._dispatch import backend_for
from ._stats import accumulation_dtype

# Which implementation runs each (op, pass): "compose" (the torch composition below) or "aten" (ATen's fused
# kernel for that pass). Measured side by side with `python benchmarks/bench_norms.py --passes` on the shared 2-core
# CI machine: ATen's fused per-sample kernels win every shape measured there (the composition reads the input 3-4
# times); the composition remains the readable, double-differentiable path (create_graph) and the fallback for
# inputs ATen does not take.
PLAN: dict[tuple[str, str], str] = {
    ("group_norm", "forward"): "aten",
    ("group_norm", "backward"): "aten",
    ("instance_norm", "forward"): "aten",
    ("instance_norm", "backward"): "aten",
    ("layer_norm", "forward"): "aten",
    ("layer_norm", "backward"): "aten",
}
IMPLEMENTATIONS = ("compose", "aten")


@dataclass(frozen=True)
class Spec:
    """How one call maps onto the grouped view: ``op``, the view shape, reduced dims, affine view shape."""

    op: str
    view: tuple[int, ...]
    dims: tuple[int, ...]
    affine_view: tuple[int, ...]
    affine_shape: tuple[int, ...]
    groups: int = 0  # group_norm / instance_norm: groups handed to ATen's group-norm kernel

    @property
    def affine_sum_dims(self) -> tuple[int, ...]:
        return tuple(d for d, size in enumerate(self.affine_view) if size == 1)

    @property
    def count(self) -> int:
        return math.prod(self.view[d] for d in self.dims)


def moments(xg: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-pass ``(mean, biased var)`` over ``dims`` (keepdim), in at least float32: never ``E[x^2] - E[x]^2``.

    The corrected two-pass algorithm (Chan, Golub & LeVeque, 1983): the mean of the centered values corrects the
    rounding of the first mean, which matters when the mean is large against the spread."""
    xf = xg.to(accumulation_dtype(xg.dtype))
    shift = xf.mean(dims, keepdim=True)
    centered = xf - shift
    correction = centered.mean(dims, keepdim=True)
    centered = centered - correction
    return shift + correction, (centered * centered).mean(dims, keepdim=True)


def _affine(t, spec: Spec, dtype):
    return None if t is None else t.reshape(spec.affine_view).to(dtype)


def normalize(xg, spec: Spec, mean, rstd, weight, bias):
    """``(x - mean) * rstd * weight + bias`` in the accumulation dtype, returned in the input's dtype."""
    acc = mean.dtype
    y = (xg.to(acc) - mean) * rstd
    if weight is not None:
        y = y * _affine(weight, spec, acc)
    if bias is not None:
        y = y + _affine(bias, spec, acc)
    return y.to(xg.dtype)


def compose_forward(xg, spec: Spec, weight, bias, eps):
    """``(yg, mean, rstd)`` through the torch composition (statistics in keepdim shape, accumulation dtype)."""
    mean, var = moments(xg, spec.dims)
    rstd = torch.rsqrt(var + eps)
    return normalize(xg, spec, mean, rstd, weight, bias), mean, rstd


def closed_form_backward(dyg, xg, spec: Spec, weight, mean, rstd, input_stats: bool):
    r"""``(grad_input, grad_weight, grad_bias)`` of the per-sample norm, through differentiable torch ops.

    With :math:`\hat x = (x - \mu)\,\sigma^{-1}` and :math:`g = \partial y \cdot \gamma`, the input gradient is
    :math:`\sigma^{-1}(g - \overline{g} - \hat x\,\overline{g \hat x})` (means over the normalized set) when the
    statistics come from the input, and :math:`\sigma^{-1} g` when they are fixed (running statistics).
    """
    acc = accumulation_dtype(xg.dtype)
    mean, rstd = mean.to(acc), rstd.to(acc)  # ATen's statistics of a half/bf16 call come in that dtype
    dy = dyg.to(acc)
    xhat = (xg.to(acc) - mean) * rstd
    g = dy if weight is None else dy * _affine(weight, spec, acc)
    if input_stats:
        dx = rstd * (g - g.mean(spec.dims, keepdim=True) - xhat * (g * xhat).mean(spec.dims, keepdim=True))
    else:
        dx = g * rstd
    sum_dims = spec.affine_sum_dims
    grad_weight = None if weight is None else (dy * xhat).sum(sum_dims).reshape(spec.affine_shape).to(weight.dtype)
    grad_bias = dy.sum(sum_dims).reshape(spec.affine_shape)
    return dx.to(xg.dtype), grad_weight, grad_bias


# ---- ATen's fused kernels, on the same grouped view (stats converted to/from the keepdim shape) ----

def aten_supported(x: torch.Tensor, spec: Spec, weight, bias) -> bool:
    """ATen's kernels need parameters of the input's dtype, or float32 ones for a half/bf16 input on CPU."""
    for t in (weight, bias):
        if t is not None and t.dtype != x.dtype and not (x.dtype in (torch.float16, torch.bfloat16)
                                                         and t.dtype == torch.float32 and x.device.type == "cpu"):
            return False
    return x.numel() > 0


def _stats_shape(spec: Spec) -> tuple[int, ...]:
    return tuple(1 if d in spec.dims else size for d, size in enumerate(spec.view))


def aten_forward(x: torch.Tensor, spec: Spec, weight, bias, eps):
    """``(y, mean, rstd)`` with ``y`` in the input's shape and the statistics in the keepdim shape of the view."""
    if spec.op == "layer_norm":
        y, mean, rstd = torch.native_layer_norm(x, list(spec.affine_shape), _flat(weight, spec), _flat(bias, spec),
                                                eps)
    else:
        n, c = x.shape[0], x.shape[1]
        y, mean, rstd = torch.native_group_norm(x, _flat(weight, spec), _flat(bias, spec), n, c,
                                                x[0, 0].numel(), spec.groups, eps)
    return y, mean.reshape(_stats_shape(spec)), rstd.reshape(_stats_shape(spec))


def _flat(t, spec: Spec):
    if t is None:
        return None
    return t.reshape(spec.affine_shape) if spec.op == "layer_norm" else t.reshape(-1)


def aten_backward(dy: torch.Tensor, x: torch.Tensor, spec: Spec, weight, bias, mean, rstd, mask):
    """ATen's fused backward; ``mask`` says which of ``(input, weight, bias)`` need a gradient."""
    # the statistics in the dtype ATen's forward gives them: the parameters' (float32 under CPU mixed precision)
    stat_dtype = next((t.dtype for t in (weight, bias) if t is not None), x.dtype)
    mean, rstd = mean.to(stat_dtype), rstd.to(stat_dtype)
    if spec.op == "layer_norm":
        lead = x.shape[: x.dim() - len(spec.affine_shape)]
        dx, dw, db = torch.ops.aten.native_layer_norm_backward(
            dy, x, list(spec.affine_shape), mean.reshape(*lead, *[1] * len(spec.affine_shape)),
            rstd.reshape(*lead, *[1] * len(spec.affine_shape)), _flat(weight, spec), _flat(bias, spec), mask)
    else:
        n, c = x.shape[0], x.shape[1]
        dx, dw, db = torch.ops.aten.native_group_norm_backward(
            dy, x, mean.reshape(n, spec.groups), rstd.reshape(n, spec.groups), _flat(weight, spec), n, c,
            x[0, 0].numel(), spec.groups, mask)
    if dw is not None and weight is not None:
        dw = dw.reshape(spec.affine_shape)
    if db is not None:
        db = db.reshape(spec.affine_shape)
    return dx, dw, db


def keep_format(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` in ``x``'s memory format (a no-op when it already is)."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last)
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return y.contiguous(memory_format=torch.channels_last_3d)
    return y


class RowNorm(torch.autograd.Function):
    """Forward through the planned implementation; backward in closed form (differentiable under create_graph)
    or through ATen's fused backward when the plan says it is faster."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec: Spec, eps: float, fixed_mean, fixed_rstd, use_aten_fwd, use_aten_bwd):
        if fixed_mean is not None:  # statistics given (instance_norm with running statistics)
            mean, rstd = fixed_mean, fixed_rstd
            y = normalize(x.view(spec.view), spec, mean, rstd, weight, bias).view(x.shape)
        elif use_aten_fwd:
            y, mean, rstd = aten_forward(x, spec, weight, bias, eps)
        else:
            yg, mean, rstd = compose_forward(x.view(spec.view), spec, weight, bias, eps)
            y = yg.view(x.shape)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.spec, ctx.eps, ctx.input_stats = spec, eps, fixed_mean is None
        ctx.use_aten_bwd = use_aten_bwd and ctx.input_stats
        if isinstance(ctx, _Ctx):
            return keep_format(y, x), mean, rstd
        ctx.mark_non_differentiable(mean, rstd)
        return keep_format(y, x), mean, rstd

    @staticmethod
    def backward(ctx, grad_output, _grad_mean, _grad_rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        spec = ctx.spec
        mask = [ctx.needs_input_grad[0], weight is not None and ctx.needs_input_grad[1],
                bias is not None and ctx.needs_input_grad[2]]
        if not torch.is_grad_enabled() and ctx.use_aten_bwd and aten_supported(x, spec, weight, bias):
            dx, dw, db = aten_backward(grad_output.contiguous(memory_format=_format_of(x)), x, spec, weight, bias,
                                       mean, rstd, mask)
        else:
            xg = x.view(spec.view)
            if torch.is_grad_enabled() and ctx.input_stats:  # create_graph: statistics as functions of x
                mean, var = moments(xg, spec.dims)
                rstd = torch.rsqrt(var + ctx.eps)
            dxg, dw, db = closed_form_backward(grad_output.reshape(spec.view), xg, spec, weight, mean, rstd,
                                               ctx.input_stats)
            dx = keep_format(dxg.reshape(x.shape), x)
            if db is not None and bias is not None:
                db = db.to(bias.dtype)
        return (dx if mask[0] else None, dw if mask[1] else None, db if mask[2] else None,
                None, None, None, None, None, None)


def _format_of(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d) and not x.is_contiguous():
        return torch.channels_last_3d
    return torch.contiguous_format


def params_refusal(x: torch.Tensor, *params: torch.Tensor | None) -> str | None:
    """Why the row-norm kernels cannot take this call's parameters (on another device than ``x``), or ``None``."""
    if any(t is not None and t.device != x.device for t in params):
        return "parameters on another device than the input"
    return None


def needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def run(x, weight, bias, spec: Spec, eps, fixed_mean=None, fixed_rstd=None, backend: str | None = None):
    """Dispatch one call: ``(output, mean, rstd)``; ``backend="reference"`` forces the composition, otherwise
    PLAN decides per pass (``"triton"`` reaching here, as for ``instance_norm``, runs the ATen path too)."""
    backend = backend_for(x, backend)
    aten_ok = backend != "reference" and fixed_mean is None and aten_supported(x, spec, weight, bias)
    use_aten_fwd = aten_ok and PLAN[(spec.op, "forward")] == "aten"
    use_aten_bwd = aten_ok and PLAN[(spec.op, "backward")] == "aten"
    if not needs_grad(x, weight, bias):
        with torch.no_grad():
            return RowNorm.forward(_Ctx(), x, weight, bias, spec, eps, fixed_mean, fixed_rstd, use_aten_fwd, False)
    return RowNorm.apply(x, weight, bias, spec, eps, fixed_mean, fixed_rstd, use_aten_fwd, use_aten_bwd)


class _Ctx:
    """A stand-in autograd context for calls that need no gradient."""

    needs_input_grad = (False, False, False)

    def save_for_backward(self, *tensors):
        pass
