"""LayerNorm on Triton: launch plans, forward, backward and the autograd Function.

Torch-only at import time: the kernels (``_layer_norm_triton``) load on the first launch. Public entry points are
:func:`normkit.kernels.layer_norm` and :func:`normkit.kernels.supports_layer_norm`.

The input is an ``(M, D)`` matrix of rows (``D`` = the product of ``normalized_shape``). Rows of at most
``MAX_BLOCK`` values are held whole in registers, ``ROWS`` of them per program when they are short; longer rows are
walked in ``MAX_BLOCK`` tiles. The backward runs ``PROGRAMS_PER_SM`` programs per SM, each over a contiguous range
of rows, and reduces their partial weight/bias sums with one ``sum`` over programs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._options import COMPILE_OPTIONS
from ._support import interpreting, refusal

_INTERPRET = interpreting()
# Longest row held whole in registers (GPU: 64 KiB of fp32 over up to 16 warps), and the values a short-row tile
# aims for. Chosen from first principles, not yet measured on a GPU (docs/kernels-rownorm.md). The interpreter gets
# small blocks so that tiny test shapes take the tiled path too.
MAX_BLOCK = 64 if _INTERPRET else 16384
ROW_TILE = 64 if _INTERPRET else 4096
PROGRAMS_PER_SM = 2
INTERPRET_PROGRAMS = 2  # the backward's programs under the interpreter: several rows per program


@dataclass(frozen=True)
class Plan:
    """``rows`` rows of ``block_d`` columns per tile; ``single``: a row fits one tile."""

    rows: int
    block_d: int
    single: bool


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan(d: int, *, max_block: int | None = None, row_tile: int | None = None) -> Plan:
    """The tile of rows of ``d`` values."""
    max_block = MAX_BLOCK if max_block is None else max_block
    row_tile = ROW_TILE if row_tile is None else row_tile
    if _pow2(d) > max_block:
        return Plan(1, max_block, False)
    block_d = _pow2(d)
    return Plan(max(1, min(16, row_tile // block_d)), block_d, True)


def supports(x: torch.Tensor, normalized_shape) -> str | None:
    """``None`` when the kernels take this call, else why not (the caller then falls back to ATen)."""
    reason = refusal(x)
    if reason is not None:
        return reason
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if not shape or x.dim() < len(shape) or tuple(x.shape[x.dim() - len(shape):]) != shape:
        return "normalized_shape is not the input's trailing shape"
    if x.numel() == 0:
        return "empty input"
    return None


def _rows(x: torch.Tensor, d: int) -> torch.Tensor:
    return x.contiguous().view(-1, d)


def _programs(m: int, p: Plan, device: torch.device, programs: int | None) -> int:
    if programs is None:
        from ._tuning import streaming_processors

        programs = INTERPRET_PROGRAMS if interpreting() else PROGRAMS_PER_SM * streaming_processors(device)
    return max(1, min(programs, -(-m // p.rows)))


def forward(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5, *,
            max_block: int | None = None, row_tile: int | None = None):
    """``(y, mean, rstd)``: ``y`` of ``x``'s shape and dtype (contiguous), float32 statistics of shape ``(M,)``."""
    from . import _layer_norm_triton as kernels

    d = math.prod((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)
    x2 = _rows(x, d)
    m = x2.shape[0]
    p = plan(d, max_block=max_block, row_tile=row_tile)
    y = torch.empty_like(x2)
    mean = torch.empty(m, device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    w = x2 if weight is None else weight.reshape(-1).contiguous()
    b = x2 if bias is None else bias.reshape(-1).contiguous()
    kernels.ln_fwd[(-(-m // p.rows),)](x2, y, w, b, mean, rstd, m, d, eps, HAS_W=weight is not None,
                                       HAS_B=bias is not None, ROWS=p.rows, BLOCK_D=p.block_d, SINGLE=p.single,
                                       **COMPILE_OPTIONS)
    return y.view(x.shape), mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, normalized_shape, weight, bias, mean, rstd, *,
             max_block: int | None = None, row_tile: int | None = None, programs: int | None = None):
    """``(dx, dweight, dbias)`` from the forward's float32 statistics; ``None`` for an absent parameter."""
    from . import _layer_norm_triton as kernels

    d = math.prod((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)
    x2 = _rows(x, d)
    dy2 = dy.reshape(-1, d)
    m = x2.shape[0]
    p = plan(d, max_block=max_block, row_tile=row_tile)
    grid = _programs(m, p, x.device, programs)
    per_program = -(-m // grid)
    grid = -(-m // per_program)
    dx = torch.empty_like(x2)
    dwp = torch.empty((grid, d), device=x.device, dtype=torch.float32)
    dbp = torch.empty_like(dwp)
    sums = dwp if p.single else torch.empty((m, 2), device=x.device, dtype=torch.float32)
    w = x2 if weight is None else weight.reshape(-1).contiguous()
    kernels.ln_bwd[(grid,)](x2, dy2, dx, w, mean, rstd, dwp, dbp, sums, m, d, per_program, dy2.stride(0),
                            dy2.stride(1), HAS_W=weight is not None, ROWS=p.rows, BLOCK_D=p.block_d,
                            SINGLE=p.single, **COMPILE_OPTIONS)
    dweight = None if weight is None else dwp.sum(0).reshape(weight.shape).to(weight.dtype)
    dbias = None if bias is None else dbp.sum(0).reshape(bias.shape).to(bias.dtype)
    return dx.view(x.shape), dweight, dbias


def differentiable(x, normalized_shape, weight, bias, eps):
    """The same function through differentiable torch ops (the oracle): used for double backward."""
    from ..functional.reference import layer_norm as reference_layer_norm

    return reference_layer_norm(x, normalized_shape, weight, bias, eps)


class LayerNormFunction(torch.autograd.Function):
    """LayerNorm through the kernels; under ``create_graph`` the backward differentiates :func:`differentiable`
    instead, so higher-order gradients exist."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps):
        y, mean, rstd = forward(x, normalized_shape, weight, bias, eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.normalized_shape, ctx.eps = normalized_shape, eps
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            inputs = [t for t, need in zip((x, weight, bias), needs, strict=True) if need]
            y = differentiable(x, ctx.normalized_shape, weight, bias, ctx.eps)
            grads = iter(torch.autograd.grad(y, inputs, grad_output, create_graph=True))
            return (*(next(grads) if need else None for need in needs), None, None)
        dx, dw, db = backward(grad_output, x, ctx.normalized_shape, weight, bias, mean, rstd)
        return dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, None, None


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Differentiable LayerNorm on the kernels; see :func:`normkit.kernels.layer_norm`."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(int(s) for s in normalized_shape)
    return LayerNormFunction.apply(x, weight, bias, shape, eps)
