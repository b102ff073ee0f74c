"""Split per-channel reductions of batch norm (Triton), each finished by the program that arrives last.

A channel's ``N * HW`` values are cut into tiles; each program reduces one tile of one channel (``planes``) or of a
block of channels (``rows``) and writes its partials to a small ``(k, tiles, C)`` float32 workspace, then takes a
ticket from a per-channel (per channel block) counter. The program that draws the last ticket merges every tile's
partials in tile order (so the result does not depend on which program came last: bitwise reproducible), writes
the per-channel results and puts the counter back to zero (the counters live in a persistent zeroed buffer, see
``_bn_launch.locks``). Nothing but these kernels runs: no merge launch, no ATen ops for the running statistics,
the counter or the affine gradients.

Forward partials are ``(count, mean - K, M2)`` from per-lane shifted sums (``sum(x - K)``, ``sum((x - K)^2)``: one
add and one FMA per element, no division, no per-element count), turned into per-lane ``(count, mean, M2)`` and
Chan-merged across lanes and tiles; ``K`` is the channel's first value, so a mean far larger than the spread costs
no precision in float32. Backward partials are the plain sums of ``dz`` and ``dz * x_hat``. Canonical layouts (see
``normkit.functional._layout``): ``planes`` is a contiguous ``(P, C, S)`` tensor, ``rows`` a contiguous ``(M, C)``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._activation import activation_grad


@triton.jit
def _lane_moments(n, s, q):
    """Per-lane ``(mean, M2)`` from the count ``n``, ``sum(x - K)`` and ``sum((x - K)^2)``."""
    mean = s / tl.maximum(n, 1.0)
    return mean, tl.maximum(q - s * mean, 0.0)


@triton.jit
def _last_ticket(lock_ptr, tiles):
    """Whether this program is the last of the ``tiles`` programs sharing the counter at ``lock_ptr``; the last
    one puts it back to zero. The barrier makes every thread's partial stores precede the ticket (release)."""
    tl.debug_barrier()
    ticket = tl.atomic_add(lock_ptr, 1, sem="acq_rel")
    last = ticket == tiles - 1
    if last:
        tl.atomic_xchg(lock_ptr, 0, sem="relaxed")
    return last


@triton.jit
def _merge_moment_tiles(part_ptr, c, c_in, tiles, C, BLOCK_T: tl.constexpr):
    """Chan's merge of every tile's ``(count, mean, M2)`` for the block of channels ``c``: ``BLOCK_T`` tiles at a
    time (a fixed tree within the block, blocks in tile order). Loads bypass L1 (``volatile``): other programs wrote
    these partials."""
    n = tl.zeros_like(c).to(tl.float32)
    mean = tl.zeros_like(n)
    m2 = tl.zeros_like(n)
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t[:, None] < tiles) & c_in[None, :]
        i = t[:, None] * C + c[None, :]
        tn = tl.load(part_ptr + i, mask=ok, other=0.0, volatile=True)
        tmean = tl.load(part_ptr + tiles * C + i, mask=ok, other=0.0, volatile=True)
        tm2 = tl.load(part_ptr + 2 * tiles * C + i, mask=ok, other=0.0, volatile=True)
        bn = tl.sum(tn, axis=0)
        bmean = tl.sum(tn * tmean, axis=0) / tl.maximum(bn, 1.0)
        d = tl.where(ok, tmean - bmean[None, :], 0.0)
        bm2 = tl.sum(tm2 + tn * d * d, axis=0)
        frac = bn / tl.maximum(n + bn, 1.0)
        delta = bmean - mean
        m2 += bm2 + delta * delta * n * frac
        mean += delta * frac
        n += bn
    return n, mean, m2


@triton.jit
def _finish_moments(c, c_in, n, mean_rel, m2, shift, stats_ptr, rm_ptr, rv_ptr, counter_ptr, C, momentum, bessel,
                    HAS_RUNNING: tl.constexpr, SKIP_NONFINITE: tl.constexpr, HAS_COUNTER: tl.constexpr):
    """Store the batch mean and biased variance (``stats[0]``, ``stats[1]``); move the running statistics by torch's
    rule ``(1 - m) * running + m * batch`` (``bessel`` turns the biased variance into the stored one), keeping the
    old values of a channel whose statistics are not finite under ``SKIP_NONFINITE``; count the batch."""
    mean = mean_rel + shift
    var = m2 / tl.maximum(n, 1.0)
    tl.store(stats_ptr + c, mean, mask=c_in)
    tl.store(stats_ptr + C + c, var, mask=c_in)
    if HAS_RUNNING:
        old_mean = tl.load(rm_ptr + c, mask=c_in, other=0.0).to(tl.float32)
        old_var = tl.load(rv_ptr + c, mask=c_in, other=0.0).to(tl.float32)
        new_mean = (1.0 - momentum) * old_mean + momentum * mean
        new_var = (1.0 - momentum) * old_var + momentum * (var * bessel)
        if SKIP_NONFINITE:
            finite = ((mean - mean) == 0.0) & ((var - var) == 0.0)  # inf - inf and NaN - NaN are NaN
            new_mean = tl.where(finite, new_mean, old_mean)
            new_var = tl.where(finite, new_var, old_var)
        tl.store(rm_ptr + c, new_mean.to(rm_ptr.dtype.element_ty), mask=c_in)
        tl.store(rv_ptr + c, new_var.to(rv_ptr.dtype.element_ty), mask=c_in)
    if HAS_COUNTER:
        if tl.program_id(0) == 0:
            tl.store(counter_ptr, tl.load(counter_ptr) + 1)


@triton.jit
def _lane_counts(lo, hi, BLOCK: tl.constexpr):
    """How many of the chunks ``range(lo, hi, BLOCK)`` each lane ``i`` of a block sees (``lo + k * BLOCK + i < hi``)."""
    return tl.maximum(hi - lo - tl.arange(0, BLOCK) + BLOCK - 1, 0) // BLOCK


@triton.jit
def _tile_moments(s_acc, q_acc, n_lane, axis: tl.constexpr):
    """``(count, mean, M2)`` of a tile (along ``axis``) from its lanes' counts and shifted sums: each lane's own
    moments, Chan-merged across the lanes."""
    lane_mean, lane_m2 = _lane_moments(n_lane, s_acc, q_acc)
    n = tl.sum(n_lane + tl.zeros_like(s_acc), axis=axis)
    tile_mean = tl.sum(s_acc, axis=axis) / tl.maximum(n, 1.0)
    d = lane_mean - tl.expand_dims(tile_mean, axis)
    return n, tile_mean, tl.sum(lane_m2 + n_lane * d * d, axis=axis)


@triton.jit
def moments_planes(x_ptr, part_ptr, lock_ptr, stats_ptr, rm_ptr, rv_ptr, counter_ptr, P, C, S, per_tile, span,
                   tiles_s, tiles, momentum, bessel,
                   HAS_RUNNING: tl.constexpr, SKIP_NONFINITE: tl.constexpr, HAS_COUNTER: tl.constexpr,
                   EVEN: tl.constexpr, EVEN_P: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr,
                   BLOCK_T: tl.constexpr):
    """Partial ``(count, mean - K, M2)`` of channel ``program_id(0)`` over tile ``program_id(1)``; the last tile's
    program merges them all and finishes (:func:`_finish_moments`). The hot loop is a load, a subtraction, an add
    and an FMA per value: masked values load as ``K`` (so they add zero) and each lane's count comes from the loop
    bounds. ``EVEN``: the tile is a whole number of ``BLOCK_P x BLOCK_S`` chunks, so no masks at all; ``EVEN_P``: a
    whole number of ``BLOCK_P`` plane groups, so only the planes' tails are masked (the mask is loop-invariant)."""
    c = tl.program_id(0)
    t = tl.program_id(1)
    p_lo = (t // tiles_s) * per_tile
    p_hi = tl.minimum(p_lo + per_tile, P)
    s_lo = (t % tiles_s) * span
    s_hi = tl.minimum(s_lo + span, S)
    shift_raw = tl.load(x_ptr + c * S)  # the channel's first value, in the input's dtype
    shift = shift_raw.to(tl.float32)
    s_acc = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)
    q_acc = tl.zeros((BLOCK_P, BLOCK_S), tl.float32)
    if EVEN_P and not EVEN:  # whole BLOCK_P groups of planes, ragged planes (7x7): one mask per chunk column
        for s0 in range(s_lo, s_hi, BLOCK_S):
            s = s0 + tl.arange(0, BLOCK_S)
            s_in = tl.broadcast_to((s < s_hi)[None, :], (BLOCK_P, BLOCK_S))
            for p0 in range(p_lo, p_hi, BLOCK_P):
                p = p0 + tl.arange(0, BLOCK_P)
                x = tl.load(x_ptr + (p[:, None] * C + c) * S + s[None, :], mask=s_in, other=shift_raw)
                x = x.to(tl.float32) - shift
                s_acc += x
                q_acc += x * x
    else:
        for p0 in range(p_lo, p_hi, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            for s0 in range(s_lo, s_hi, BLOCK_S):
                s = s0 + tl.arange(0, BLOCK_S)
                offsets = (p[:, None] * C + c) * S + s[None, :]
                if EVEN:
                    x = tl.load(x_ptr + offsets)
                else:
                    x = tl.load(x_ptr + offsets, mask=(p[:, None] < p_hi) & (s[None, :] < s_hi), other=shift_raw)
                x = x.to(tl.float32) - shift
                s_acc += x
                q_acc += x * x
    n_lane = (_lane_counts(p_lo, p_hi, BLOCK_P)[:, None] * _lane_counts(s_lo, s_hi, BLOCK_S)[None, :]).to(tl.float32)
    tile_n, tile_mean, tile_m2 = _tile_moments(tl.reshape(s_acc, (BLOCK_P * BLOCK_S,)),
                                               tl.reshape(q_acc, (BLOCK_P * BLOCK_S,)),
                                               tl.reshape(n_lane, (BLOCK_P * BLOCK_S,)), 0)
    i = t * C + c
    tl.store(part_ptr + i, tile_n)
    tl.store(part_ptr + tiles * C + i, tile_mean)
    tl.store(part_ptr + 2 * tiles * C + i, tile_m2)
    if _last_ticket(lock_ptr + c, tiles):
        cv = c + tl.arange(0, 1)  # the channel as a block of one, as the rows kernel's blocks
        n_all, mean_rel, m2 = _merge_moment_tiles(part_ptr, cv, cv < C, tiles, C, BLOCK_T)
        _finish_moments(cv, cv < C, n_all, mean_rel, m2, shift, stats_ptr, rm_ptr, rv_ptr, counter_ptr, C,
                        momentum, bessel, HAS_RUNNING, SKIP_NONFINITE, HAS_COUNTER)


@triton.jit
def moments_rows(x_ptr, part_ptr, lock_ptr, stats_ptr, rm_ptr, rv_ptr, counter_ptr, M, C, per_tile, tiles,
                 momentum, bessel,
                 HAS_RUNNING: tl.constexpr, SKIP_NONFINITE: tl.constexpr, HAS_COUNTER: tl.constexpr,
                 EVEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Partial ``(count, mean - K, M2)`` of channel block ``program_id(0)`` over row tile ``program_id(1)`` (the
    hot loop as in :func:`moments_planes`); the last program of the block merges and finishes. ``EVEN``: whole
    chunks and every channel of the block real."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    t = tl.program_id(1)
    r_lo = t * per_tile
    r_hi = tl.minimum(r_lo + per_tile, M)
    shift_raw = tl.load(x_ptr + c, mask=c_in, other=0.0)  # row 0, in the input's dtype
    shift = shift_raw.to(tl.float32)[None, :]
    s_acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    q_acc = tl.zeros((BLOCK_M, BLOCK_C), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        r = r0 + tl.arange(0, BLOCK_M)
        offsets = r[:, None] * C + c[None, :]
        if EVEN:
            x = tl.load(x_ptr + offsets)
        else:
            x = tl.load(x_ptr + offsets, mask=(r[:, None] < r_hi) & c_in[None, :], other=shift_raw[None, :])
        x = x.to(tl.float32) - shift
        s_acc += x
        q_acc += x * x
    n_lane = _lane_counts(r_lo, r_hi, BLOCK_M).to(tl.float32)[:, None]
    tile_n, tile_mean, tile_m2 = _tile_moments(s_acc, q_acc, n_lane, 0)
    i = t * C + c
    tl.store(part_ptr + i, tile_n, mask=c_in)
    tl.store(part_ptr + tiles * C + i, tile_mean, mask=c_in)
    tl.store(part_ptr + 2 * tiles * C + i, tile_m2, mask=c_in)
    if _last_ticket(lock_ptr + tl.program_id(0), tiles):
        n_all, mean_rel, m2 = _merge_moment_tiles(part_ptr, c, c_in, tiles, C, BLOCK_T)
        _finish_moments(c, c_in, n_all, mean_rel, m2, shift_raw.to(tl.float32), stats_ptr, rm_ptr, rv_ptr,
                        counter_ptr, C, momentum, bessel, HAS_RUNNING, SKIP_NONFINITE, HAS_COUNTER)


@triton.jit
def _channel_constants(mean_ptr, var_ptr, w_ptr, b_ptr, c, c_in, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """``(mean, rstd, weight, bias)`` of channels ``c`` in float32 (identity affine when absent)."""
    mean = tl.load(mean_ptr + c, mask=c_in, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.load(var_ptr + c, mask=c_in, other=1.0).to(tl.float32) + eps)
    w = tl.load(w_ptr + c, mask=c_in, other=0.0).to(tl.float32) if HAS_W else 1.0
    b = tl.load(b_ptr + c, mask=c_in, other=0.0).to(tl.float32) if HAS_B else 0.0
    return mean, rstd, w, b


@triton.jit
def relu_bit(bits_ptr, i, mask):
    """Bit ``i`` of the ReLU bitmask the normalize pass wrote (``_bn_pointwise.normalize``): ``z > 0`` at value
    ``i``, as 0 or 1."""
    return (tl.load(bits_ptr + (i >> 3), mask=mask, other=0).to(tl.int32) >> (i & 7)) & 1


@triton.jit
def _grad_element(dy, x, r, mean, rstd, w, b, ACT: tl.constexpr, HAS_RES: tl.constexpr, RELU_BITS: tl.constexpr):
    """``(dz, x_hat)``: the gradient at the pre-activation (recomputed from the statistics, or from the ReLU's bit
    ``r`` with ``RELU_BITS``) and ``x_hat``."""
    x_hat = (x - mean) * rstd
    if RELU_BITS:
        dy = tl.where(r != 0, dy, 0.0)
    elif ACT != 0:
        z = x_hat * w + b
        if HAS_RES:
            z += r
        dy = activation_grad(dy, z, ACT)
    return dy, x_hat


@triton.jit
def _finish_grad_sums(part_ptr, c, c_in, tiles, C, dw_ptr, db_ptr, sums_ptr, HAS_DW: tl.constexpr,
                      HAS_DB: tl.constexpr, BLOCK_T: tl.constexpr):
    """Sum every tile's ``(sum dz, sum dz * x_hat)`` for the block of channels ``c`` (``BLOCK_T`` tiles at a time, in
    tile order); store them for the input gradient (``sums``) and as the affine gradients in the parameters'
    dtypes."""
    sum_dz = tl.zeros_like(c).to(tl.float32)
    sum_dzx = tl.zeros_like(sum_dz)
    for t0 in range(0, tiles, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t[:, None] < tiles) & c_in[None, :]
        i = t[:, None] * C + c[None, :]
        sum_dz += tl.sum(tl.load(part_ptr + i, mask=ok, other=0.0, volatile=True), axis=0)
        sum_dzx += tl.sum(tl.load(part_ptr + tiles * C + i, mask=ok, other=0.0, volatile=True), axis=0)
    tl.store(sums_ptr + c, sum_dz, mask=c_in)
    tl.store(sums_ptr + C + c, sum_dzx, mask=c_in)
    if HAS_DW:
        tl.store(dw_ptr + c, sum_dzx.to(dw_ptr.dtype.element_ty), mask=c_in)
    if HAS_DB:
        tl.store(db_ptr + c, sum_dz.to(db_ptr.dtype.element_ty), mask=c_in)


@triton.jit
def grad_sums_planes(dy_ptr, x_ptr, r_ptr, dz_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, part_ptr, lock_ptr,
                     sums_ptr, dw_ptr, db_ptr, P, C, S, per_tile, span, tiles_s, tiles, eps,
                     ACT: tl.constexpr, HAS_RES: tl.constexpr, RELU_BITS: tl.constexpr, WRITE_DZ: tl.constexpr,
                     WRITE_DX: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DW: tl.constexpr,
                     HAS_DB: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr):
    """Partial ``sum(dz)`` and ``sum(dz * x_hat)`` of channel ``program_id(0)`` over tile ``program_id(1)``; with
    ``WRITE_DZ`` also stores ``dz`` (the residual's gradient; with ``RELU_BITS`` from the forward's ReLU bitmask at
    ``r_ptr`` instead of the residual), with ``WRITE_DX`` the input gradient of evaluation
    mode (``dz * w * rstd``: one pass for the whole backward). The last program of the channel finishes."""
    c = tl.program_id(0)
    t = tl.program_id(1)
    p_lo = (t // tiles_s) * per_tile
    p_hi = tl.minimum(p_lo + per_tile, P)
    s_lo = (t % tiles_s) * span
    s_hi = tl.minimum(s_lo + span, S)
    mean, rstd, w, b = _channel_constants(mean_ptr, var_ptr, w_ptr, b_ptr, c, c < C, eps, HAS_W, HAS_B)
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
            if RELU_BITS:
                r = relu_bit(r_ptr, i, mask)
            elif HAS_RES:
                r = tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
            dz, x_hat = _grad_element(dy, x, r, mean, rstd, w, b, ACT, HAS_RES, RELU_BITS)
            if WRITE_DZ:
                tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=mask)
            if WRITE_DX:
                tl.store(dx_ptr + i, (dz * (w * rstd)).to(dx_ptr.dtype.element_ty), mask=mask)
            sum_dz += dz
            sum_dzx += tl.where(mask, dz * x_hat, 0.0)
    i = t * C + c
    tl.store(part_ptr + i, tl.sum(sum_dz))
    tl.store(part_ptr + tiles * C + i, tl.sum(sum_dzx))
    if _last_ticket(lock_ptr + c, tiles):
        cv = c + tl.arange(0, 1)
        _finish_grad_sums(part_ptr, cv, cv < C, tiles, C, dw_ptr, db_ptr, sums_ptr, HAS_DW, HAS_DB, BLOCK_T)


@triton.jit
def grad_sums_rows(dy_ptr, x_ptr, r_ptr, dz_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, part_ptr, lock_ptr,
                   sums_ptr, dw_ptr, db_ptr, M, C, per_tile, tiles, eps,
                   ACT: tl.constexpr, HAS_RES: tl.constexpr, RELU_BITS: tl.constexpr, WRITE_DZ: tl.constexpr,
                   WRITE_DX: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_DW: tl.constexpr,
                   HAS_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr):
    """Partial ``sum(dz)`` and ``sum(dz * x_hat)`` of channel block ``program_id(0)`` over row tile
    ``program_id(1)`` (options as :func:`grad_sums_planes`); the last program of the block finishes."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_in = c < C
    t = tl.program_id(1)
    r_lo = t * per_tile
    r_hi = tl.minimum(r_lo + per_tile, M)
    mean, rstd, w, b = _channel_constants(mean_ptr, var_ptr, w_ptr, b_ptr, c, c_in, eps, HAS_W, HAS_B)
    mean, rstd = mean[None, :], rstd[None, :]
    if HAS_W:
        w = w[None, :]
    if HAS_B:
        b = b[None, :]
    sum_dz = tl.zeros((BLOCK_C,), tl.float32)
    sum_dzx = tl.zeros((BLOCK_C,), tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < r_hi) & c_in[None, :]
        i = rows[:, None] * C + c[None, :]
        dy = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
        r = 0.0
        if RELU_BITS:
            r = relu_bit(r_ptr, i, mask)
        elif HAS_RES:
            r = tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
        dz, x_hat = _grad_element(dy, x, r, mean, rstd, w, b, ACT, HAS_RES, RELU_BITS)
        if WRITE_DZ:
            tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if WRITE_DX:
            tl.store(dx_ptr + i, (dz * (w * rstd)).to(dx_ptr.dtype.element_ty), mask=mask)
        sum_dz += tl.sum(dz, axis=0)
        sum_dzx += tl.sum(tl.where(mask, dz * x_hat, 0.0), axis=0)
    i = t * C + c
    tl.store(part_ptr + i, sum_dz, mask=c_in)
    tl.store(part_ptr + tiles * C + i, sum_dzx, mask=c_in)
    if _last_ticket(lock_ptr + tl.program_id(0), tiles):
        _finish_grad_sums(part_ptr, c, c_in, tiles, C, dw_ptr, db_ptr, sums_ptr, HAS_DW, HAS_DB, BLOCK_T)
