"""Triton kernels of GroupNorm (+ fused SiLU/ReLU) over an ``(N, C, S)`` strided view; host code: ``group_norm``.

A group ``(n, g)`` is the ``K x S`` block of channels ``g*K .. g*K+K-1`` of sample ``n``. Kernels walk it in
``BLOCK_C x BLOCK_S`` tiles through the strides, so one kernel serves NCHW (``stride_s == 1``) and channels_last
(``stride_c == 1``); Triton specialises on unit strides, so the contiguous dimension is vectorised.

Statistics: each tile gives its exact count, mean and M2 (centred in registers), merged into the running triple
with Chan's formula. Small groups: one program per group does statistics, then normalization (``*_fused``). Large
groups: ``SPLITS = SPLITS_C * SPLITS_S`` programs per group each cover a chunk of ``CHUNK_C`` channels by
``CHUNK_S`` positions and write a partial triple; the apply kernels merge the partials of their group (Chan,
vectorised) and normalize their chunk. Grids are one-dimensional: program ``group * SPLITS + j`` (``group = n * G +
g``), chunk ``j = jc * SPLITS_S + js``. No autotuning: the host passes ``num_warps`` from its config table
(``_tuning``).

Activation codes (``ACT``) are those of ``_activation.CODES``; the activation follows the affine.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._activation import activate, activation_grad


@triton.jit
def _range_moments(X, K, s_start, s_end, stride_c, stride_s, BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """(count, mean, M2) in float32 over channels ``0..K-1`` and positions ``s_start..s_end-1`` of a group."""
    count = 0.0
    mean = 0.0
    m2 = 0.0
    for s0 in range(s_start, s_end, BLOCK_S):
        for c0 in range(0, K, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (c < K)[:, None] & (s < s_end)[None, :]
            x = tl.load(X + c[:, None] * stride_c + s[None, :] * stride_s, mask=mask, other=0.0).to(tl.float32)
            # the tile's exact (count, mean, M2), merged into the running triple (Chan et al.)
            t_count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
            t_mean = tl.sum(tl.sum(x, axis=1), axis=0) / t_count
            d = tl.where(mask, x - t_mean, 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=1), axis=0)
            total = count + t_count
            delta = t_mean - mean
            frac = t_count / total
            mean = mean + delta * frac
            m2 = m2 + t_m2 + delta * delta * count * frac
            count = total
    return count, mean, m2


@triton.jit
def _affine_act(xhat, W, B, c, cmask, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """``z = xhat * w + b`` per channel and ``act(z)``; returns ``(z, act(z), w)`` (``w`` is 1 without weight)."""
    if HAS_W:
        w = tl.load(W + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        z = xhat * w
    else:
        w = 1.0
        z = xhat
    if HAS_B:
        z = z + tl.load(B + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
    return z, activate(z, ACT), w


@triton.jit
def _range_apply(X, Y, W, B, mean, rstd, K, s_start, s_end, stride_c, stride_s,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Writes ``act((x - mean) * rstd * w + b)`` over a range of a group (``W``/``B`` point at the group's)."""
    for s0 in range(s_start, s_end, BLOCK_S):
        for c0 in range(0, K, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (c < K)[:, None] & (s < s_end)[None, :]
            offsets = c[:, None] * stride_c + s[None, :] * stride_s
            x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
            _, y, _ = _affine_act((x - mean) * rstd, W, B, c, c < K, HAS_W, HAS_B, ACT)
            tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _chunk(pid, G, K, S, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS):
    """Of program ``pid`` of a split launch: ``(group, n, g, js, c_start, c_len, s_start, s_end)``: its group
    ``n * G + g``, its position split ``js``, its channels ``c_start .. c_start + c_len - 1`` of the group and its
    positions ``s_start .. s_end - 1``."""
    group = pid // SPLITS
    j = pid % SPLITS
    jc = j // SPLITS_S
    js = j % SPLITS_S
    c_start = jc * CHUNK_C
    s_start = js * CHUNK_S
    return (group, group // G, group % G, js, c_start, tl.minimum(CHUNK_C, K - c_start), s_start,
            tl.minimum(s_start + CHUNK_S, S))


@triton.jit
def gn_fwd_fused(X, Y, W, B, MEAN, RSTD, G, K, S, stride_n, stride_c, stride_s, eps,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per group: statistics, then the normalized (affine, activated) output."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n + (g * K).to(tl.int64) * stride_c
    count, mean, m2 = _range_moments(X + base, K, 0, S, stride_c, stride_s, BLOCK_C, BLOCK_S)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    tl.store(MEAN + pid, mean)
    tl.store(RSTD + pid, rstd)
    _range_apply(X + base, Y + base, W + g * K, B + g * K, mean, rstd, K, 0, S, stride_c, stride_s,
                 HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S)


@triton.jit
def gn_fwd_partial(X, PART, G, K, S, stride_n, stride_c, stride_s, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program ``p`` (chunk ``j`` of ``group``): the chunk's (count, mean, M2) into ``PART[p, :]``."""
    pid = tl.program_id(0)
    group, n, g, js, c_start, c_len, s_start, s_end = _chunk(pid, G, K, S, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS)
    base = n.to(tl.int64) * stride_n + (g * K + c_start).to(tl.int64) * stride_c
    count, mean, m2 = _range_moments(X + base, c_len, s_start, s_end, stride_c, stride_s, BLOCK_C, BLOCK_S)
    out = PART + pid.to(tl.int64) * 3
    tl.store(out, count)
    tl.store(out + 1, mean)
    tl.store(out + 2, m2)


@triton.jit
def _merge_partials(PART, group, SPLITS, BLOCK_P: tl.constexpr):
    """(count, mean, M2) of a whole group from its ``SPLITS`` partial triples (Chan's formula for many parts)."""
    p = tl.arange(0, BLOCK_P)
    pmask = p < SPLITS
    row = PART + (group.to(tl.int64) * SPLITS + p) * 3
    counts = tl.load(row, mask=pmask, other=0.0)
    means = tl.load(row + 1, mask=pmask, other=0.0)
    m2s = tl.load(row + 2, mask=pmask, other=0.0)
    count = tl.sum(counts, axis=0)
    mean = tl.sum(counts * means, axis=0) / count
    d = means - mean
    return count, mean, tl.sum(m2s, axis=0) + tl.sum(counts * d * d, axis=0)


@triton.jit
def gn_fwd_apply(X, Y, W, B, PART, MEAN, RSTD, G, K, S, stride_n, stride_c, stride_s, eps, CHUNK_C, CHUNK_S,
                 SPLITS_S, SPLITS, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program ``p`` (chunk ``j`` of ``group``): merges the group's partials, normalizes the chunk; ``j == 0``
    stores the group's mean and rstd."""
    pid = tl.program_id(0)
    group, n, g, js, c_start, c_len, s_start, s_end = _chunk(pid, G, K, S, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS)
    count, mean, m2 = _merge_partials(PART, group, SPLITS, BLOCK_P)
    rstd = 1.0 / tl.sqrt(m2 / count + eps)
    if pid % SPLITS == 0:
        tl.store(MEAN + group, mean)
        tl.store(RSTD + group, rstd)
    base = n.to(tl.int64) * stride_n + (g * K + c_start).to(tl.int64) * stride_c
    first = g * K + c_start
    _range_apply(X + base, Y + base, W + first, B + first, mean, rstd, c_len, s_start, s_end, stride_c, stride_s,
                 HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S)


# ---- backward ----
# With xhat = (x - mean) * rstd, z = xhat * w + b, dz = dy * act'(z) and g = dz * w:
#   dx = rstd * (g - sum(g) / m - xhat * sum(g * xhat) / m)    (sums over the group, m its size)
#   dw[c] = sum(dz * xhat), db[c] = sum(dz)                   (sums over samples and positions)

@triton.jit
def _grad_tile(X, DY, offsets, dy_offsets, mask, c, K, mean, rstd, W, B,
               HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr):
    """``(xhat, dz, g)`` of one tile, the activation's derivative recomputed from x and the statistics."""
    x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    z, _, w = _affine_act(xhat, W, B, c, c < K, HAS_W, HAS_B, ACT)
    dz = activation_grad(dy, z, ACT)
    return xhat, dz, dz * w


@triton.jit
def _range_grad_sums(X, DY, W, B, DWP, DBP, mean, rstd, K, s_start, s_end, stride_c, stride_s,
                     dy_stride_c, dy_stride_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Over a range of a group: returns ``(sum g, sum g * xhat)`` and stores the per-channel partial sums of
    ``dz * xhat`` (``DWP``) and ``dz`` (``DBP``) of the range."""
    sum_g = 0.0
    sum_gx = 0.0
    for c0 in range(0, K, BLOCK_C):
        acc_w = tl.zeros([BLOCK_C], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_C], dtype=tl.float32)
        for s0 in range(s_start, s_end, BLOCK_S):
            c = c0 + tl.arange(0, BLOCK_C)
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (c < K)[:, None] & (s < s_end)[None, :]
            offsets = c[:, None] * stride_c + s[None, :] * stride_s
            dy_offsets = c[:, None] * dy_stride_c + s[None, :] * dy_stride_s
            xhat, dz, g = _grad_tile(X, DY, offsets, dy_offsets, mask, c, K, mean, rstd, W, B, HAS_W, HAS_B, ACT)
            g = tl.where(mask, g, 0.0)
            sum_g += tl.sum(tl.sum(g, axis=1), axis=0)
            sum_gx += tl.sum(tl.sum(g * xhat, axis=1), axis=0)
            acc_w += tl.sum(dz * xhat, axis=1)
            acc_b += tl.sum(dz, axis=1)
        c = c0 + tl.arange(0, BLOCK_C)
        if HAS_W:
            tl.store(DWP + c, acc_w, mask=c < K)
        if HAS_B:
            tl.store(DBP + c, acc_b, mask=c < K)
    return sum_g, sum_gx


@triton.jit
def _range_grad_input(X, DY, DX, W, B, mean, rstd, mean_g, mean_gx, K, s_start, s_end, stride_c, stride_s,
                      dy_stride_c, dy_stride_s, HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Writes ``dx = rstd * (g - mean_g - xhat * mean_gx)`` over a range of a group."""
    for s0 in range(s_start, s_end, BLOCK_S):
        for c0 in range(0, K, BLOCK_C):
            c = c0 + tl.arange(0, BLOCK_C)
            s = s0 + tl.arange(0, BLOCK_S)
            mask = (c < K)[:, None] & (s < s_end)[None, :]
            offsets = c[:, None] * stride_c + s[None, :] * stride_s
            dy_offsets = c[:, None] * dy_stride_c + s[None, :] * dy_stride_s
            xhat, _, g = _grad_tile(X, DY, offsets, dy_offsets, mask, c, K, mean, rstd, W, B, HAS_W, HAS_B, ACT)
            dx = rstd * (g - mean_g - xhat * mean_gx)
            tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)


@triton.jit
def gn_bwd_fused(X, DY, DX, W, B, MEAN, RSTD, DWP, DBP, G, K, S, C, stride_n, stride_c, stride_s,
                 dy_stride_n, dy_stride_c, dy_stride_s,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """One program per group: the group's sums (and its channels' partials ``DWP/DBP[n, c]``), then dx."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * stride_n + (g * K).to(tl.int64) * stride_c
    dy_base = n.to(tl.int64) * dy_stride_n + (g * K).to(tl.int64) * dy_stride_c
    mean = tl.load(MEAN + pid)
    rstd = tl.load(RSTD + pid)
    part = n.to(tl.int64) * C + g * K
    sum_g, sum_gx = _range_grad_sums(X + base, DY + dy_base, W + g * K, B + g * K, DWP + part, DBP + part,
                                     mean, rstd, K, 0, S, stride_c, stride_s, dy_stride_c, dy_stride_s,
                                     HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S)
    m = K * S * 1.0
    _range_grad_input(X + base, DY + dy_base, DX + base, W + g * K, B + g * K, mean, rstd, sum_g / m, sum_gx / m,
                      K, 0, S, stride_c, stride_s, dy_stride_c, dy_stride_s, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S)


@triton.jit
def gn_bwd_partial(X, DY, W, B, MEAN, RSTD, PART, DWP, DBP, G, K, S, C, stride_n, stride_c, stride_s,
                   dy_stride_n, dy_stride_c, dy_stride_s, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS,
                   HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                   BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr):
    """Program ``p`` (chunk ``j`` of ``group``): the chunk's partial group sums into ``PART[p, :2]``, its channels'
    partials into ``DWP/DBP[n * SPLITS_S + js, c]``."""
    pid = tl.program_id(0)
    group, n, g, js, c_start, c_len, s_start, s_end = _chunk(pid, G, K, S, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS)
    first = g * K + c_start
    base = n.to(tl.int64) * stride_n + first.to(tl.int64) * stride_c
    dy_base = n.to(tl.int64) * dy_stride_n + first.to(tl.int64) * dy_stride_c
    mean = tl.load(MEAN + group)
    rstd = tl.load(RSTD + group)
    part = (n * SPLITS_S + js).to(tl.int64) * C + first
    sum_g, sum_gx = _range_grad_sums(X + base, DY + dy_base, W + first, B + first, DWP + part, DBP + part,
                                     mean, rstd, c_len, s_start, s_end, stride_c, stride_s, dy_stride_c,
                                     dy_stride_s, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S)
    out = PART + pid.to(tl.int64) * 2
    tl.store(out, sum_g)
    tl.store(out + 1, sum_gx)


@triton.jit
def gn_bwd_apply(X, DY, DX, W, B, MEAN, RSTD, PART, G, K, S, stride_n, stride_c, stride_s,
                 dy_stride_n, dy_stride_c, dy_stride_s, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS,
                 HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_P: tl.constexpr):
    """Program ``p`` (chunk ``j`` of ``group``): sums the group's partial sums, writes dx over the chunk."""
    pid = tl.program_id(0)
    group, n, g, js, c_start, c_len, s_start, s_end = _chunk(pid, G, K, S, CHUNK_C, CHUNK_S, SPLITS_S, SPLITS)
    p = tl.arange(0, BLOCK_P)
    row = PART + (group.to(tl.int64) * SPLITS + p) * 2
    m = K * S * 1.0
    mean_g = tl.sum(tl.load(row, mask=p < SPLITS, other=0.0), axis=0) / m
    mean_gx = tl.sum(tl.load(row + 1, mask=p < SPLITS, other=0.0), axis=0) / m
    first = g * K + c_start
    base = n.to(tl.int64) * stride_n + first.to(tl.int64) * stride_c
    dy_base = n.to(tl.int64) * dy_stride_n + first.to(tl.int64) * dy_stride_c
    _range_grad_input(X + base, DY + dy_base, DX + base, W + first, B + first, tl.load(MEAN + group),
                      tl.load(RSTD + group), mean_g, mean_gx, c_len, s_start, s_end, stride_c, stride_s,
                      dy_stride_c, dy_stride_s, HAS_W, HAS_B, ACT, BLOCK_C, BLOCK_S)
