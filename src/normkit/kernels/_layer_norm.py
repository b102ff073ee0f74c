"""LayerNorm on Triton: launch plans, forward, backward and the autograd Function.

Torch-only at import time: the kernels (``_layer_norm_triton``) load on the first launch. Public entry points are
:func:`normkit.kernels.layer_norm` and :func:`normkit.kernels.supports_layer_norm`.

The input is an ``(M, D)`` matrix of rows (``D`` = the product of ``normalized_shape``). Rows of at most
``MAX_BLOCK`` values are held whole in registers, ``ROWS`` of them per program when they are short; longer rows are
walked in ``TILED_BLOCK`` tiles. The backward holds about three times the forward's values per element, so its own
plan holds rows of at most ``BWD_MAX_BLOCK`` values and walks longer ones in ``BWD_TILED_BLOCK`` tiles (the limits
where sm_90 compiles of the table's configs stop spilling registers). The backward runs ``PROGRAMS_PER_SM``
programs per SM, each over a contiguous range of rows, and reduces their partial weight/bias sums with one ``sum``
over programs. Both grids are one-dimensional (:func:`grids`: x takes up to 2**31 - 1 programs); ``num_warps``
comes from ``_tuning``'s config table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._support import interpreting, refusal

_INTERPRET = interpreting()
# Longest row held whole in registers and the tile of longer rows, forward and backward (GPU: no register spills
# in sm_90 compiles with the config table's warps, Triton 3.9), and the values a short-row tile aims for. Not yet
# measured on a GPU (docs/kernels-rownorm.md). The interpreter gets small blocks so that tiny test shapes take the
# tiled path too.
GPU_LIMITS = dict(max_block=16384, tiled_block=8192, bwd_max_block=8192, bwd_tiled_block=4096, row_tile=4096)
INTERPRETER_LIMITS = dict(max_block=64, tiled_block=32, bwd_max_block=64, bwd_tiled_block=32, row_tile=64)
LIMITS = INTERPRETER_LIMITS if _INTERPRET else GPU_LIMITS
MAX_BLOCK, TILED_BLOCK, ROW_TILE = LIMITS["max_block"], LIMITS["tiled_block"], LIMITS["row_tile"]
BWD_MAX_BLOCK, BWD_TILED_BLOCK = LIMITS["bwd_max_block"], LIMITS["bwd_tiled_block"]
PROGRAMS_PER_SM = 2
INTERPRET_PROGRAMS = 2  # the backward's programs under the interpreter: several rows per program
_MAX_VALUES = 2**31 - 1  # row indices (and the backward's per-row scratch offsets) are int32


@dataclass(frozen=True)
class Plan:
    """``rows`` rows of ``block_d`` columns per tile; ``single``: a row fits one tile."""

    rows: int
    block_d: int
    single: bool


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan(d: int, *, backward: bool = False, limits: dict | None = None, max_block: int | None = None,
         row_tile: int | None = None) -> Plan:
    """The tile of rows of ``d`` values (a pure function of ``d``).

    Args:
        d: values per row.
        backward: the backward's plan (smaller register limits).
        limits: :data:`GPU_LIMITS` or :data:`INTERPRETER_LIMITS`. Default: this process's (:data:`LIMITS`).
        max_block: overrides the longest row held whole (forward or backward); the tile of longer rows is at most
            this too (tests).
        row_tile: overrides the values a tile of short rows aims for.
    """
    limits = LIMITS if limits is None else limits
    prefix = "bwd_" if backward else ""
    tiled = limits[prefix + "tiled_block"]
    if max_block is None:
        max_block = limits[prefix + "max_block"]
    else:
        tiled = min(tiled, max_block)
    row_tile = limits["row_tile"] if row_tile is None else row_tile
    if _pow2(d) > max_block:
        return Plan(1, tiled, False)
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
    if x.numel() > _MAX_VALUES:
        return f"{x.numel()} values (the kernels index rows with 32 bits: at most 2**31 - 1)"
    return None


def _rows(x: torch.Tensor, d: int) -> torch.Tensor:
    return x.contiguous().view(-1, d)


def backward_programs(m: int, p: Plan, programs: int) -> tuple[int, int]:
    """``(programs, rows per program)`` of the backward: at most ``programs``, each a contiguous range of rows
    (whole ``p.rows`` tiles of it), none empty.

    Args:
        m: rows.
        p: the :func:`plan`.
        programs: the programs the launch aims for.
    """
    count = max(1, min(programs, -(-m // p.rows)))
    per_program = -(-m // count)
    return -(-m // per_program), per_program


def grids(m: int, d: int, programs: int, **limits) -> tuple[tuple[int], tuple[int]]:
    """The forward's and the backward's launch grids (one dimension each, so CUDA's x limit alone applies).

    Args:
        m, d: rows and values per row.
        programs: the programs the backward aims for.
        limits: ``limits`` / ``max_block`` / ``row_tile`` for :func:`plan`.
    """
    return (-(-m // plan(d, **limits).rows),), (backward_programs(m, plan(d, backward=True, **limits), programs)[0],)


def target_programs(device: torch.device) -> int:
    """Programs the backward aims for: ``PROGRAMS_PER_SM`` per SM (``INTERPRET_PROGRAMS`` on the interpreter)."""
    if interpreting() or device.type != "cuda":
        return INTERPRET_PROGRAMS
    from ._tuning import streaming_processors

    return PROGRAMS_PER_SM * streaming_processors(device)


def _launch(kernel, family: str, grid: tuple[int], x2: torch.Tensor, p: Plan, args: tuple, meta: dict) -> None:
    """One launch of ``kernel`` with the config table's (or the tuner's) choice for the plan's tile."""
    from ._tuning import launch

    def key() -> str:  # the shape class a tuned config is cached under
        flags = ",".join(f"{name}={value}" for name, value in sorted(meta.items()))
        return f"{kernel.__name__}|{x2.dtype}|D={x2.shape[1]}|{flags}"

    launch(kernel, grid, args, meta, family=family, values=p.rows * p.block_d, key=key, device=x2.device)


def forward(x: torch.Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5, *,
            max_block: int | None = None, row_tile: int | None = None):
    """LayerNorm's forward on the kernels (no autograd).

    Args:
        x: input; made contiguous.
        normalized_shape: trailing shape normalized over.
        weight, bias: of ``normalized_shape``, or ``None``.
        eps: added to the variance.
        max_block, row_tile: override the plan's (tests).

    Shape:
        - Output: ``(y, mean, rstd)``: ``y`` of ``x``'s shape and dtype (contiguous), float32 ``(M,)`` statistics.
    """
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
    meta = dict(HAS_W=weight is not None, HAS_B=bias is not None, ROWS=p.rows, BLOCK_D=p.block_d, SINGLE=p.single)
    _launch(kernels.ln_fwd, "ln_fwd", (-(-m // p.rows),), x2, p, (x2, y, w, b, mean, rstd, m, d, eps), meta)
    return y.view(x.shape), mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, normalized_shape, weight, bias, mean, rstd, *,
             max_block: int | None = None, row_tile: int | None = None, programs: int | None = None):
    """LayerNorm's backward on the kernels, from the forward's float32 statistics.

    Args:
        dy: gradient of the output (any strides).
        x, normalized_shape, weight, bias: as given to :func:`forward`.
        mean, rstd: :func:`forward`'s statistics.
        max_block, row_tile: override the plan's (tests).
        programs: the backward's target programs. Default: :func:`target_programs`.

    Shape:
        - Output: ``(dx, dweight, dbias)``: ``dx`` of ``x``'s shape; ``None`` for an absent parameter.
    """
    from . import _layer_norm_triton as kernels

    d = math.prod((normalized_shape,) if isinstance(normalized_shape, int) else normalized_shape)
    x2 = _rows(x, d)
    dy2 = dy.reshape(-1, d)
    m = x2.shape[0]
    p = plan(d, backward=True, max_block=max_block, row_tile=row_tile)
    count, per_program = backward_programs(m, p, target_programs(x.device) if programs is None else programs)
    dx = torch.empty_like(x2)
    dwp = torch.empty((count, d), device=x.device, dtype=torch.float32)
    dbp = torch.empty_like(dwp)
    sums = dwp if p.single else torch.empty((m, 2), device=x.device, dtype=torch.float32)
    w = x2 if weight is None else weight.reshape(-1).contiguous()
    meta = dict(HAS_W=weight is not None, ROWS=p.rows, BLOCK_D=p.block_d, SINGLE=p.single)
    _launch(kernels.ln_bwd, "ln_bwd", (count,), x2, p,
            (x2, dy2, dx, w, mean, rstd, dwp, dbp, sums, m, d, per_program, dy2.stride(0), dy2.stride(1)), meta)
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
