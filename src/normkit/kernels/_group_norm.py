"""GroupNorm (+ fused SiLU/ReLU) on Triton: launch plans, forward, backward and the autograd Function.

Torch-only at import time: the kernels (``_group_norm_triton``) load on the first launch. Public entry points are
:func:`normkit.kernels.group_norm` and :func:`normkit.kernels.supports_group_norm`.

Plan: a group of ``K = C / G`` channels and ``S`` positions is walked in ``BLOCK_C x BLOCK_S`` tiles of about
``TILE`` values (the contiguous dimension innermost). Groups of at most ``SPLIT_THRESHOLD`` values run one program
each (statistics and output in one kernel: the second read comes from L2); larger ones are split over the positions
into ``SPLITS`` programs that write partial (count, mean, M2) triples, merged with Chan's formula by the programs
that then normalize. The backward mirrors it: partial group sums and per-channel partials of ``dz * xhat`` and
``dz``, reduced over samples (and splits) into the weight and bias gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._options import COMPILE_OPTIONS
from ._support import interpreting, refusal

ACTIVATIONS = (None, "silu", "relu")
_INTERPRET = interpreting()
# Values per tile (GPU: 8 KiB of fp32 per loop step), and the group size past which a group is split over several
# programs. Chosen from first principles, not yet measured on a GPU (see docs/kernels-rownorm.md). The interpreter
# gets small tiles so that tiny test shapes take several tiles per group.
TILE = 64 if _INTERPRET else 2048
SPLIT_THRESHOLD = 16384
# A split launch aims for this many programs per streaming multiprocessor.
PROGRAMS_PER_SM = 4
_MAX_SPAN = 2**31 - 1  # in-sample offsets are int32


@dataclass(frozen=True)
class Plan:
    """Launch shape of one call: tile ``block_c x block_s``; ``splits`` programs per group, ``chunk_s`` positions
    each (``splits == 1``: the fused one-program-per-group kernels)."""

    block_c: int
    block_s: int
    splits: int
    chunk_s: int


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def plan(n: int, groups: int, k: int, s: int, channels_inner: bool, *, tile: int | None = None,
         split_threshold: int | None = None, programs: int = 1) -> Plan:
    """The tile and split of a group of ``k`` channels by ``s`` positions (``programs``: the launch's target)."""
    tile = TILE if tile is None else tile
    threshold = SPLIT_THRESHOLD if split_threshold is None else split_threshold
    if channels_inner:
        block_c = min(_pow2(k), tile)
        block_s = max(1, min(_pow2(s), tile // block_c))
    else:
        block_s = min(_pow2(s), tile)
        block_c = max(1, min(_pow2(k), tile // block_s))
    s_tiles = -(-s // block_s)
    if k * s <= threshold or s_tiles == 1:
        return Plan(block_c, block_s, 1, s)
    want = max(-(-k * s // threshold), -(-programs // (n * groups)))
    per_split = -(-s_tiles // min(want, s_tiles))
    return Plan(block_c, block_s, -(-s_tiles // per_split), per_split * block_s)


def supports(x: torch.Tensor, num_groups: int, activation: str | None = None) -> str | None:
    """``None`` when the kernels take this call, else why not (the caller then falls back to ATen)."""
    reason = refusal(x)
    if reason is not None:
        return reason
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} is not fused (None, 'silu', 'relu')"
    if x.dim() < 2 or not isinstance(num_groups, int) or num_groups <= 0 or x.shape[1] % num_groups:
        return "input is not (N, C, *) with num_groups dividing C"
    if x.numel() == 0:
        return "empty input"
    if x[0].numel() > _MAX_SPAN:
        return "a sample has more than 2**31 - 1 values"
    return None


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when contiguous or channels_last(_3d), else a contiguous copy (strides the kernel can walk)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
            x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return x
    return x.contiguous()


def _ncs(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1)


def _launch_plan(x3: torch.Tensor, groups: int, tile, split_threshold) -> Plan:
    from ._tuning import streaming_processors  # imports triton: only once a kernel launches

    n, c, s = x3.shape
    channels_inner = x3.stride(1) == 1 and c > 1
    programs = PROGRAMS_PER_SM * streaming_processors(x3.device)
    return plan(n, groups, c // groups, s, channels_inner, tile=tile, split_threshold=split_threshold,
                programs=programs)


def _codes(activation):
    from ._activation import CODES

    return CODES[activation]


def forward(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, activation=None, *,
            tile: int | None = None, split_threshold: int | None = None):
    """``(y, mean, rstd)``: ``y`` like ``x`` (dtype and memory format), float32 statistics of shape ``(N, G)``."""
    from . import _group_norm_triton as kernels

    x = _dense(x)
    x3 = _ncs(x)
    n, c, s = x3.shape
    k = c // num_groups
    p = _launch_plan(x3, num_groups, tile, split_threshold)
    y = torch.empty_like(x)
    mean = torch.empty((n, num_groups), device=x.device, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    w = x if weight is None else weight.reshape(-1).contiguous()
    b = x if bias is None else bias.reshape(-1).contiguous()
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=_codes(activation),
                 BLOCK_C=p.block_c, BLOCK_S=p.block_s)
    strides = (x3.stride(0), x3.stride(1), x3.stride(2))
    if p.splits == 1:
        kernels.gn_fwd_fused[(n * num_groups,)](x3, y, w, b, mean, rstd, num_groups, k, s, *strides, eps, **flags,
                                                **COMPILE_OPTIONS)
    else:
        part = torch.empty((n * num_groups, p.splits, 3), device=x.device, dtype=torch.float32)
        grid = (n * num_groups, p.splits)
        kernels.gn_fwd_partial[grid](x3, part, num_groups, k, s, *strides, p.chunk_s, p.splits,
                                     BLOCK_C=p.block_c, BLOCK_S=p.block_s, **COMPILE_OPTIONS)
        kernels.gn_fwd_apply[grid](x3, y, w, b, part, mean, rstd, num_groups, k, s, *strides, eps, p.chunk_s,
                                   p.splits, BLOCK_P=_pow2(p.splits), **flags, **COMPILE_OPTIONS)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight, bias, mean, rstd, activation=None, *,
             tile: int | None = None, split_threshold: int | None = None):
    """``(dx, dweight, dbias)`` from the forward's float32 statistics; ``None`` for an absent parameter."""
    from . import _group_norm_triton as kernels

    x = _dense(x)
    x3 = _ncs(x)
    dy3 = _ncs(dy)
    n, c, s = x3.shape
    k = c // num_groups
    p = _launch_plan(x3, num_groups, tile, split_threshold)
    dx = torch.empty_like(x)
    w = x if weight is None else weight.reshape(-1).contiguous()
    b = x if bias is None else bias.reshape(-1).contiguous()
    dwp = torch.empty((n * p.splits, c), device=x.device, dtype=torch.float32)
    dbp = torch.empty_like(dwp) if bias is not None else dwp
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=_codes(activation),
                 BLOCK_C=p.block_c, BLOCK_S=p.block_s)
    strides = (x3.stride(0), x3.stride(1), x3.stride(2), dy3.stride(0), dy3.stride(1), dy3.stride(2))
    if p.splits == 1:
        kernels.gn_bwd_fused[(n * num_groups,)](x3, dy3, dx, w, b, mean, rstd, dwp, dbp, num_groups, k, s, c,
                                                *strides, **flags, **COMPILE_OPTIONS)
    else:
        part = torch.empty((n * num_groups, p.splits, 2), device=x.device, dtype=torch.float32)
        grid = (n * num_groups, p.splits)
        kernels.gn_bwd_partial[grid](x3, dy3, w, b, mean, rstd, part, dwp, dbp, num_groups, k, s, c, *strides,
                                     p.chunk_s, p.splits, **flags, **COMPILE_OPTIONS)
        kernels.gn_bwd_apply[grid](x3, dy3, dx, w, b, mean, rstd, part, num_groups, k, s, *strides, p.chunk_s,
                                   p.splits, BLOCK_P=_pow2(p.splits), **flags, **COMPILE_OPTIONS)
    dweight = None if weight is None else dwp.sum(0).reshape(weight.shape).to(weight.dtype)
    dbias = None if bias is None else dbp.sum(0).reshape(bias.shape).to(bias.dtype)
    return dx, dweight, dbias


def differentiable(x, num_groups, weight, bias, eps, activation):
    """The same function through differentiable torch ops (the oracle): used for double backward."""
    from ..functional.reference import group_norm as reference_group_norm

    return reference_group_norm(x, num_groups, weight, bias, eps, activation=activation)


class GroupNormFunction(torch.autograd.Function):
    """GroupNorm (+ activation) through the kernels; under ``create_graph`` the backward differentiates
    :func:`differentiable` instead, so higher-order gradients exist."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, activation):
        y, mean, rstd = forward(x, num_groups, weight, bias, eps, activation)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.eps, ctx.activation = num_groups, eps, activation
        return y

    @staticmethod
    def backward(ctx, grad_output):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        needs = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # create_graph=True: gradients that are themselves differentiable
            inputs = [t for t, need in zip((x, weight, bias), needs, strict=True) if need]
            y = differentiable(x, ctx.num_groups, weight, bias, ctx.eps, ctx.activation)
            grads = iter(torch.autograd.grad(y, inputs, grad_output, create_graph=True))
            return (*(next(grads) if need else None for need in needs), None, None, None)
        dx, dw, db = backward(grad_output, x, ctx.num_groups, weight, bias, mean, rstd, ctx.activation)
        return (dx if needs[0] else None, dw if needs[1] else None, db if needs[2] else None, None, None, None)


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *, activation=None):
    """Differentiable GroupNorm (+ activation) on the kernels; see :func:`normkit.kernels.group_norm`."""
    return GroupNormFunction.apply(x, weight, bias, num_groups, eps, activation)
