"""GroupNorm (+ fused SiLU/ReLU) on Triton: launch plans, forward, backward and the autograd Function.

Torch-only at import time: the kernels (``_group_norm_triton``) load on the first launch. Public entry points are
:func:`normkit.kernels.group_norm` and :func:`normkit.kernels.supports_group_norm`.

Plan: a group of ``K = C / G`` channels and ``S`` positions is walked in ``BLOCK_C x BLOCK_S`` tiles of about
``TILE`` values (the contiguous dimension innermost). Groups of at most ``SPLIT_THRESHOLD`` values run one program
each (statistics and output in one kernel: the second read comes from L2). Larger ones are split along channels
*and* positions into ``splits_c x splits_s`` chunks of whole tiles, enough for the launch to reach about
``PROGRAMS_PER_SM`` programs per SM (each chunk at most ``SPLIT_THRESHOLD`` values, at most ``MAX_SPLITS`` chunks
per group; tiles shrink to ``MIN_TILE`` values when a group has too few). The outer (non-contiguous) dimension is
split first, so each program reads contiguous spans. Each chunk's program writes a partial (count, mean, M2) triple,
merged with Chan's formula by the programs that then normalize. The backward mirrors it: partial group sums and
per-channel partials of ``dz * xhat`` and ``dz``, reduced over samples and position splits into the weight and bias
gradients. Every grid is one-dimensional (x: up to 2**31 - 1 programs; CUDA's y and z stop at 65,535).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._support import interpreting, refusal

ACTIVATIONS = (None, "silu", "relu")
_INTERPRET = interpreting()
# Values per tile (GPU: 8 KiB of fp32 per loop step), the smallest tile a split may shrink to, and the group size
# past which a group is split over several programs. Chosen from first principles, not yet measured on a GPU (see
# docs/kernels-rownorm.md). The interpreter gets small tiles and threshold so that tiny test shapes take several
# tiles per group and the split kernels.
GPU_LIMITS = dict(tile=2048, min_tile=512, split_threshold=16384)
INTERPRETER_LIMITS = dict(tile=64, min_tile=8, split_threshold=256)
_LIMITS = INTERPRETER_LIMITS if _INTERPRET else GPU_LIMITS
TILE, MIN_TILE, SPLIT_THRESHOLD = _LIMITS["tile"], _LIMITS["min_tile"], _LIMITS["split_threshold"]
MAX_SPLITS = 256  # chunks per group: the apply kernels merge all partials of their group in registers
# A split launch aims for this many programs per streaming multiprocessor (the interpreter: a fixed target).
PROGRAMS_PER_SM = 8
INTERPRET_PROGRAMS = 8
_MAX_SPAN = 2**31 - 1  # in-sample offsets are int32


@dataclass(frozen=True)
class Plan:
    """Launch shape of one call: tiles of ``block_c x block_s``; each group cut into ``splits_c x splits_s``
    chunks of ``chunk_c`` channels by ``chunk_s`` positions (``splits == 1``: the fused one-program-per-group
    kernels, one chunk of the whole group)."""

    block_c: int
    block_s: int
    splits_c: int
    splits_s: int
    chunk_c: int
    chunk_s: int

    @property
    def splits(self) -> int:
        """Programs per group."""
        return self.splits_c * self.splits_s

    @property
    def tile(self) -> int:
        """Values per tile (one loop step of a program)."""
        return self.block_c * self.block_s


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _tile(k: int, s: int, channels_inner: bool, tile: int) -> tuple[int, int]:
    """``(block_c, block_s)``: the contiguous dimension's block first, the other fills the tile."""
    if channels_inner:
        block_c = min(_pow2(k), tile)
        return block_c, max(1, min(_pow2(s), tile // block_c))
    block_s = min(_pow2(s), tile)
    return max(1, min(_pow2(k), tile // block_s)), block_s


def _shrink(block_c: int, block_s: int, k: int, s: int, channels_inner: bool, want: int,
            min_tile: int) -> tuple[int, int]:
    """Halves the tile while the group has at most half of ``want`` tiles (so the halving raises the number of
    chunks) and the tile stays ``>= min_tile`` values: the outer block first, the contiguous one once the outer is
    a single row."""
    while 2 * _cdiv(k, block_c) * _cdiv(s, block_s) <= want and block_c * block_s >= 2 * min_tile:
        outer_s = channels_inner  # channels_last: positions are the outer dimension
        if (block_s if outer_s else block_c) > 1:
            block_s, block_c = (block_s // 2, block_c) if outer_s else (block_s, block_c // 2)
        else:
            block_s, block_c = (block_s, block_c // 2) if outer_s else (block_s // 2, block_c)
    return block_c, block_s


def _even(tiles: int, want: int) -> tuple[int, int]:
    """``(parts, tiles per part)``: ``tiles`` cut into at most ``want`` parts of equal tile counts, none empty."""
    per = _cdiv(tiles, max(1, min(tiles, want)))
    return _cdiv(tiles, per), per


def plan(n: int, groups: int, k: int, s: int, channels_inner: bool, *, tile: int | None = None,
         split_threshold: int | None = None, programs: int = 1, min_tile: int | None = None) -> Plan:
    """The tiles and chunks of the groups of an ``(n, groups * k, s)`` input (a pure function of the shape).

    Args:
        n, groups, k, s: samples, groups, channels per group, positions.
        channels_inner: channels are the contiguous dimension (channels_last).
        tile: values per tile. Default: :data:`TILE`.
        split_threshold: largest group run by one program. Default: :data:`SPLIT_THRESHOLD`.
        programs: the programs a split launch aims for (all groups together).
        min_tile: smallest tile a split may shrink to. Default: :data:`MIN_TILE`.
    """
    tile = TILE if tile is None else tile
    threshold = SPLIT_THRESHOLD if split_threshold is None else split_threshold
    block_c, block_s = _tile(k, s, channels_inner, tile)
    if k * s <= threshold:
        return Plan(block_c, block_s, 1, 1, k, s)
    want = min(MAX_SPLITS, max(_cdiv(k * s, threshold), _cdiv(programs, n * groups)))
    block_c, block_s = _shrink(block_c, block_s, k, s, channels_inner, want,
                               MIN_TILE if min_tile is None else min_tile)
    c_tiles, s_tiles = _cdiv(k, block_c), _cdiv(s, block_s)
    if channels_inner:  # positions are the outer dimension: split them first
        splits_s, per_s = _even(s_tiles, want)
        splits_c, per_c = _even(c_tiles, want // splits_s)
    else:
        splits_c, per_c = _even(c_tiles, want)
        splits_s, per_s = _even(s_tiles, want // splits_c)
    if splits_c * splits_s == 1:
        return Plan(block_c, block_s, 1, 1, k, s)
    return Plan(block_c, block_s, splits_c, splits_s, min(k, per_c * block_c), min(s, per_s * block_s))


def grid(n: int, groups: int, p: Plan) -> tuple[int]:
    """The launch grid of every GroupNorm kernel of a plan: one dimension, ``n * groups * splits`` programs
    (program ``(n * groups + g) * splits + j`` handles chunk ``j`` of group ``g`` of sample ``n``).

    Args:
        n, groups: samples and groups.
        p: the :func:`plan`.
    """
    return (n * groups * p.splits,)


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
        return "a sample has more than 2**31 - 1 values (the kernels index within a sample with 32 bits)"
    return None


def _dense(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when contiguous or channels_last(_3d), else a contiguous copy (strides the kernel can walk)."""
    if x.is_contiguous() or (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)) or (
            x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d)):
        return x
    return x.contiguous()


def _ncs(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1)


def target_programs(device: torch.device) -> int:
    """Programs a split launch aims for: ``PROGRAMS_PER_SM`` per SM (a fixed small number on the interpreter)."""
    if interpreting() or device.type != "cuda":
        return INTERPRET_PROGRAMS
    from ._tuning import streaming_processors

    return PROGRAMS_PER_SM * streaming_processors(device)


def _launch_plan(x3: torch.Tensor, groups: int, tile, split_threshold) -> Plan:
    n, c, s = x3.shape
    channels_inner = x3.stride(1) == 1 and c > 1
    return plan(n, groups, c // groups, s, channels_inner, tile=tile, split_threshold=split_threshold,
                programs=target_programs(x3.device))


def _codes(activation):
    from ._activation import CODES

    return CODES[activation]


def _launch(kernel, family: str, x3: torch.Tensor, k: int, p: Plan, args: tuple, meta: dict) -> None:
    """One launch of ``kernel`` over :func:`grid` with the config table's (or the tuner's) choice for the tile."""
    from ._tuning import launch

    n, c, s = x3.shape

    def key() -> str:  # the shape class a tuned config is cached under
        flags = ",".join(f"{name}={value}" for name, value in sorted(meta.items()))
        return (f"{kernel.__name__}|{x3.dtype}|K={k}|S={s}|cl={int(x3.stride(1) == 1)}|{flags}|"
                f"splits={p.splits_c}x{p.splits_s}")

    launch(kernel, grid(n, c // k, p), args, meta, family=family, values=p.tile, key=key, device=x3.device)


def forward(x: torch.Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5, activation=None, *,
            tile: int | None = None, split_threshold: int | None = None):
    """GroupNorm's forward on the kernels (no autograd).

    Args:
        x: ``(N, C, *)`` input; NCHW, channels_last(_3d) or anything (copied contiguous).
        num_groups: groups, dividing ``C``.
        weight, bias: ``(C,)`` or ``None``.
        eps: added to the variance.
        activation: ``None``, ``"silu"`` or ``"relu"``.
        tile, split_threshold: override the plan's (tests).

    Shape:
        - Output: ``(y, mean, rstd)``: ``y`` like ``x`` (dtype and memory format), float32 ``(N, G)`` statistics.
    """
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
        _launch(kernels.gn_fwd_fused, "gn_fwd", x3, k, p,
                (x3, y, w, b, mean, rstd, num_groups, k, s, *strides, eps), flags)
        return y, mean, rstd
    part = torch.empty((n * num_groups * p.splits, 3), device=x.device, dtype=torch.float32)
    chunks = (p.chunk_c, p.chunk_s, p.splits_s, p.splits)
    _launch(kernels.gn_fwd_partial, "gn_fwd", x3, k, p, (x3, part, num_groups, k, s, *strides, *chunks),
            dict(BLOCK_C=p.block_c, BLOCK_S=p.block_s))
    _launch(kernels.gn_fwd_apply, "gn_fwd", x3, k, p,
            (x3, y, w, b, part, mean, rstd, num_groups, k, s, *strides, eps, *chunks),
            dict(flags, BLOCK_P=_pow2(p.splits)))
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, num_groups: int, weight, bias, mean, rstd, activation=None, *,
             tile: int | None = None, split_threshold: int | None = None):
    """GroupNorm's backward on the kernels, from the forward's float32 statistics.

    Args:
        dy: gradient of the output (any strides).
        x, num_groups, weight, bias, activation: as given to :func:`forward`.
        mean, rstd: :func:`forward`'s statistics.
        tile, split_threshold: override the plan's (tests; the same as the forward's or not).

    Shape:
        - Output: ``(dx, dweight, dbias)``: ``dx`` like ``x``; ``None`` for an absent parameter.
    """
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
    dwp = torch.empty((n * p.splits_s, c), device=x.device, dtype=torch.float32)  # rows: (sample, position split)
    dbp = torch.empty_like(dwp) if bias is not None else dwp
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, ACT=_codes(activation),
                 BLOCK_C=p.block_c, BLOCK_S=p.block_s)
    strides = (x3.stride(0), x3.stride(1), x3.stride(2), dy3.stride(0), dy3.stride(1), dy3.stride(2))
    if p.splits == 1:
        _launch(kernels.gn_bwd_fused, "gn_bwd", x3, k, p,
                (x3, dy3, dx, w, b, mean, rstd, dwp, dbp, num_groups, k, s, c, *strides), flags)
    else:
        part = torch.empty((n * num_groups * p.splits, 2), device=x.device, dtype=torch.float32)
        chunks = (p.chunk_c, p.chunk_s, p.splits_s, p.splits)
        _launch(kernels.gn_bwd_partial, "gn_bwd", x3, k, p,
                (x3, dy3, w, b, mean, rstd, part, dwp, dbp, num_groups, k, s, c, *strides, *chunks), flags)
        _launch(kernels.gn_bwd_apply, "gn_bwd", x3, k, p,
                (x3, dy3, dx, w, b, mean, rstd, part, num_groups, k, s, *strides, *chunks),
                dict(flags, BLOCK_P=_pow2(p.splits)))
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
