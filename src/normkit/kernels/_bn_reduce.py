"""Split per-channel reductions of batch norm (Triton): per-tile partials, then one merge.

A channel's ``N * HW`` values are cut into tiles; each program reduces one tile of one channel (``planes``) or of a
block of channels (``rows``) and writes its partials to a small ``(k, tiles, C)`` float32 workspace. Forward
partials are ``(count, mean - K, M2)``, merged by Chan et al.'s formula (exact for any split, no cancellation),
where the shift ``K`` is the channel's first value, so a large mean costs no precision in float32;
backward partials are the plain sums of ``dz`` and ``dz * x_hat``. Canonical layouts (see
``normkit.functional._layout``): ``planes`` is a contiguous ``(P, C, S)`` tensor, ``rows`` a contiguous ``(M, C)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _bn_tiling as tiling
from ._activation import activation_grad

_PLANE_CONFIGS = tiling.configs((1024, 2048, 4096), (4, 8), interpret_block=64)
_ROW_CONFIGS = tiling.configs((1024, 2048, 4096), (4, 8), interpret_block=64)


# Tile shapes from the autotuned element count BLOCK: the contiguous axis first, the rest across planes (rows).
_plane_blocks = {
    "BLOCK_S": lambda a: tiling.inner_block(a["span"], a["BLOCK"]),
    "BLOCK_P": lambda a: max(1, a["BLOCK"] // tiling.inner_block(a["span"], a["BLOCK"])),
}
_row_blocks = {"BLOCK_M": lambda a: max(1, a["BLOCK"] // a["BLOCK_C"])}


@triton.autotune(configs=_PLANE_CONFIGS, key=["C", "S", "per_tile", "span"])
@triton.heuristics(_plane_blocks)
@triton.jit
def moments_planes(x_ptr, part_ptr, P, C, S, per_tile, span, tiles_s, tiles,
                   BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """Partial ``(count, mean, M2)`` of channel ``program_id(0)`` over tile ``program_id(1)``.

    Every lane of the ``BLOCK_P x BLOCK_S`` tile runs its own Welford recurrence over the chunks (registers only,
    no synchronisation in the loop); one Chan reduction across the lanes at the end.
    """
    c = tl.program_id(0)
    t = tl.program_id(1)
    p_lo = (t // tiles_s) * per_tile
    p_hi = tl.minimum(p_lo + per_tile, P)
    s_lo = (t % tiles_s) * span
    s_hi = tl.minimum(s_lo + span, S)
    shift = tl.load(x_ptr + c * S).to(tl.float32)  # the channel's first value: Welford runs on x - shift
    cnt = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)
    mean = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)
    m2 = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (p[:, None] < p_hi) & (s[None, :] < s_hi)
            x = tl.load(x_ptr + (p[:, None] * C + c) * S + s[None, :], mask=mask, other=0.0).to(tl.float32) - shift
            # one Welford step per lane (written out: the interpreter pays milliseconds per helper call)
            cnt += mask.to(tl.float32)
            delta = tl.where(mask, x - mean, 0.0)
            mean += delta / tl.maximum(cnt, 1.0)
            m2 += delta * tl.where(mask, x - mean, 0.0)
    n = tl.sum(cnt)
    tile_mean = tl.sum(cnt * mean) / tl.maximum(n, 1.0)
    d = mean - tile_mean
    i = t * C + c
    tl.store(part_ptr + i, n)
    tl.store(part_ptr + tiles * C + i, tile_mean)
    tl.store(part_ptr + 2 * tiles * C + i, tl.sum(m2 + cnt * d * d))


@triton.autotune(configs=_ROW_CONFIGS, key=["C", "per_tile", "BLOCK_C"])
@triton.heuristics(_row_blocks)
@triton.jit
def moments_rows(x_ptr, part_ptr, M, C, per_tile, tiles,
                 BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Partial ``(count, mean, M2)`` of channel block ``program_id(0)`` over row tile ``program_id(1)``: per-lane
    Welford over the chunks, then one Chan reduction along the rows of the tile."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    t = tl.program_id(1)
    r_lo = t * per_tile
    r_hi = tl.minimum(r_lo + per_tile, M)
    shift = tl.load(x_ptr + c, mask=c_in, other=0.0).to(tl.float32)[None, :]  # row 0: Welford runs on x - shift
    cnt = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    mean = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    m2 = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        mask = (r[:, None] < r_hi) & c_in[None, :]
        x = tl.load(x_ptr + r[:, None] * C + c[None, :], mask=mask, other=0.0).to(tl.float32) - shift
        cnt += mask.to(tl.float32)  # one Welford step per lane, as in moments_planes
        delta = tl.where(mask, x - mean, 0.0)
        mean += delta / tl.maximum(cnt, 1.0)
        m2 += delta * tl.where(mask, x - mean, 0.0)
    n = tl.sum(cnt, axis=0)
    tile_mean = tl.sum(cnt * mean, axis=0) / tl.maximum(n, 1.0)
    d = mean - tile_mean[None, :]
    i = t * C + c
    tl.store(part_ptr + i, n, mask=c_in)
    tl.store(part_ptr + tiles * C + i, tile_mean, mask=c_in)
    tl.store(part_ptr + 2 * tiles * C + i, tl.sum(m2 + cnt * d * d, axis=0), mask=c_in)


@triton.jit
def merge_moments(part_ptr, x_ptr, mean_ptr, var_ptr, tiles, C, shift_stride,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan-merge the ``(count, mean - K, M2)`` partials of every tile: per-channel mean and biased variance
    (``K``, the channel's first value, sits at ``x_ptr + c * shift_stride``)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    n = tl.zeros((BLOCK_C,), tl.float32)
    mean = tl.zeros((BLOCK_C,), tl.float32)
    m2 = tl.zeros((BLOCK_C,), tl.float32)
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t[:, None] < tiles) & c_in[None, :]
        i = t[:, None] * C + c[None, :]
        cn = tl.load(part_ptr + i, mask=mask, other=0.0)
        cmean = tl.load(part_ptr + tiles * C + i, mask=mask, other=0.0)
        cm2 = tl.load(part_ptr + 2 * tiles * C + i, mask=mask, other=0.0)
        bn = tl.sum(cn, axis=0)
        bmean = tl.sum(cn * cmean, axis=0) / tl.maximum(bn, 1.0)
        d = tl.where(mask, cmean - bmean[None, :], 0.0)
        frac = bn / tl.maximum(n + bn, 1.0)  # Chan's merge of this block of tiles into the running moments
        delta = bmean - mean
        m2 += tl.sum(cm2 + cn * d * d, axis=0) + delta * delta * n * frac
        mean += delta * frac
        n += bn
    tl.store(mean_ptr + c, mean + tl.load(x_ptr + c * shift_stride, mask=c_in, other=0.0).to(tl.float32),
             mask=c_in)
    tl.store(var_ptr + c, m2 / tl.maximum(n, 1.0), mask=c_in)  # M2 >= 0 by construction; NaN stays NaN


@triton.jit
def _dz(dy, x, r, mean, rstd, w, b, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """``(dz, x_hat)``: the gradient at the pre-activation (recomputed from the statistics) and ``x_hat``."""
    x_hat = (x - mean) * rstd
    if ACT != 0:
        z = x_hat * w + b
        if HAS_RES:
            z += r
        dy = activation_grad(dy, z, ACT)
    return dy, x_hat


@triton.autotune(configs=_PLANE_CONFIGS, key=["C", "S", "per_tile", "span", "ACT", "HAS_RES", "WRITE_DZ"])
@triton.heuristics(_plane_blocks)
@triton.jit
def grad_sums_planes(dy_ptr, x_ptr, r_ptr, dz_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, part_ptr,
                     P, C, S, per_tile, span, tiles_s, tiles,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DZ: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr):
    """Partial ``sum(dz)`` and ``sum(dz * x_hat)`` of channel ``program_id(0)`` over tile ``program_id(1)``;
    with ``WRITE_DZ`` also stores ``dz`` (the residual's gradient) in the input dtype."""
    c = tl.program_id(0)
    t = tl.program_id(1)
    p_lo = (t // tiles_s) * per_tile
    p_hi = tl.minimum(p_lo + per_tile, P)
    s_lo = (t % tiles_s) * span
    s_hi = tl.minimum(s_lo + span, S)
    mean = tl.load(mean_ptr + c)
    rstd = tl.load(rstd_ptr + c)
    w = tl.load(w_ptr + c).to(tl.float32)
    b = tl.load(b_ptr + c).to(tl.float32)
    sum_dz = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)
    sum_dzx = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)
    for p0 in range(p_lo, p_hi, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (p[:, None] < p_hi) & (s[None, :] < s_hi)
            i = (p[:, None] * C + c) * S + s[None, :]
            dy = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
            r = 0.0
            if HAS_RES:
                r = tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
            dz, x_hat = _dz(dy, x, r, mean, rstd, w, b, ACT, HAS_RES)
            if WRITE_DZ:
                tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            sum_dz += dz
            sum_dzx += tl.where(mask, dz * x_hat, 0.0)
    i = t * C + c
    tl.store(part_ptr + i, tl.sum(sum_dz))
    tl.store(part_ptr + tiles * C + i, tl.sum(sum_dzx))


@triton.autotune(configs=_ROW_CONFIGS, key=["C", "per_tile", "BLOCK_C", "ACT", "HAS_RES", "WRITE_DZ"])
@triton.heuristics(_row_blocks)
@triton.jit
def grad_sums_rows(dy_ptr, x_ptr, r_ptr, dz_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, part_ptr, M, C, per_tile, tiles,
                   ACT: tl.constexpr, HAS_RES: tl.constexpr, WRITE_DZ: tl.constexpr,
                   BLOCK: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr):
    """Partial ``sum(dz)`` and ``sum(dz * x_hat)`` of channel block ``program_id(0)`` over row tile
    ``program_id(1)``; with ``WRITE_DZ`` also stores ``dz``."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    t = tl.program_id(1)
    r_lo = t * per_tile
    r_hi = tl.minimum(r_lo + per_tile, M)
    mean = tl.load(mean_ptr + c, mask=c_in, other=0.0)[None, :]
    rstd = tl.load(rstd_ptr + c, mask=c_in, other=0.0)[None, :]
    w = tl.load(w_ptr + c, mask=c_in, other=0.0).to(tl.float32)[None, :]
    b = tl.load(b_ptr + c, mask=c_in, other=0.0).to(tl.float32)[None, :]
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dzx = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < r_hi) & c_in[None, :]
        i = rows[:, None] * C + c[None, :]
        dy = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        r = 0.0
        if HAS_RES:
            r = tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
        dz, x_hat = _dz(dy, x, r, mean, rstd, w, b, ACT, HAS_RES)
        if WRITE_DZ:
            tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        sum_dz += tl.sum(dz, axis=0)
        sum_dzx += tl.sum(tl.where(mask, dz * x_hat, 0.0), axis=0)
    i = t * C + c
    tl.store(part_ptr + i, sum_dz, mask=c_in)
    tl.store(part_ptr + tiles * C + i, sum_dzx, mask=c_in)
