"""Triton kernels of LayerNorm over an ``(M, D)`` matrix of rows; host code: ``layer_norm``.

``SINGLE``: a row fits one ``BLOCK_D`` tile, so each program normalizes ``ROWS`` whole rows held in registers (exact
two-pass statistics). Otherwise rows are walked in ``BLOCK_D`` tiles: per-tile (count, mean, M2) merged with Chan's
formula, then a second pass writes the output.

Backward: program ``p`` owns a contiguous range of rows; it writes their ``dx`` and one row ``p`` of partial sums
of ``dy * xhat`` and ``dy`` (the weight and bias gradients are those partials summed over programs: no atomics).

No autotuning: the host passes ``num_warps`` from its config table (``_tuning``).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def ln_fwd(X, Y, W, B, MEAN, RSTD, M, D, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
           ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr):
    """Program ``p``: rows ``p*ROWS ..``: ``y = (x - mean) * rstd * w + b``, float32 ``mean`` and ``rstd``."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    rmask = rows < M
    base = rows.to(tl.int64)[:, None] * D
    cols = tl.arange(0, BLOCK_D)
    if SINGLE:
        mask = rmask[:, None] & (cols < D)[None, :]
        x = tl.load(X + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        d = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / D + eps)
    else:
        count = tl.zeros([ROWS], dtype=tl.float32)
        mean = tl.zeros([ROWS], dtype=tl.float32)
        m2 = tl.zeros([ROWS], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cmask = d0 + cols < D
            mask = rmask[:, None] & cmask[None, :]
            x = tl.load(X + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            t_count = tl.sum(cmask.to(tl.float32), axis=0)
            t_mean = tl.sum(x, axis=1) / t_count
            d = tl.where(mask, x - t_mean[:, None], 0.0)
            t_m2 = tl.sum(d * d, axis=1)
            total = count + t_count  # Chan et al.'s merge of the tile into the running triple
            delta = t_mean - mean
            frac = t_count / total
            mean = mean + delta * frac
            m2 = m2 + t_m2 + delta * delta * count * frac
            count = total
        rstd = 1.0 / tl.sqrt(m2 / D + eps)
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)
    for d0 in range(0, D, BLOCK_D):
        cmask = d0 + cols < D
        mask = rmask[:, None] & cmask[None, :]
        if SINGLE:
            y = d * rstd[:, None]
        else:
            x = tl.load(X + base + (d0 + cols)[None, :], mask=mask, other=0.0).to(tl.float32)
            y = (x - mean[:, None]) * rstd[:, None]
        if HAS_W:
            y = y * tl.load(W + d0 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y = y + tl.load(B + d0 + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + base + (d0 + cols)[None, :], y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _row_tile(X, DY, MEAN, RSTD, W, rows, rmask, cols, D, dy_stride_r, dy_stride_d, HAS_W: tl.constexpr):
    """``(xhat, dy, g = dy * w, mask, rstd)`` of a ``ROWS x BLOCK_D`` tile (columns ``cols``) in float32."""
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    x = tl.load(X + rows.to(tl.int64)[:, None] * D + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    dy_offsets = rows.to(tl.int64)[:, None] * dy_stride_r + cols[None, :] * dy_stride_d
    dy = tl.load(DY + dy_offsets, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
    xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
    if HAS_W:
        g = dy * tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)[None, :]
    else:
        g = dy
    return xhat, dy, g, mask, rstd


@triton.jit
def ln_bwd(X, DY, DX, W, MEAN, RSTD, DWP, DBP, SUMS, M, D, ROWS_PER_PROGRAM, dy_stride_r, dy_stride_d,
           HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr):
    """Program ``p``: ``dx = rstd * (g - mean(g) - xhat * mean(g * xhat))`` of its rows, ``g = dy * w``; partial
    ``DWP[p] = sum dy * xhat`` and ``DBP[p] = sum dy`` over its rows. ``SUMS`` (``M x 2``): per-row scratch of the
    looped path."""
    p = tl.program_id(0)
    row_start = p * ROWS_PER_PROGRAM
    row_end = tl.minimum(row_start + ROWS_PER_PROGRAM, M)
    cols = tl.arange(0, BLOCK_D)
    if SINGLE:
        acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
        for r0 in range(row_start, row_end, ROWS):
            rows = r0 + tl.arange(0, ROWS)
            rmask = rows < row_end
            xhat, dy, g, mask, rstd = _row_tile(X, DY, MEAN, RSTD, W, rows, rmask, cols, D, dy_stride_r,
                                                dy_stride_d, HAS_W)
            mean_gx = tl.sum(g * xhat, axis=1) / D
            mean_g = tl.sum(g, axis=1) / D
            dx = (g - xhat * mean_gx[:, None] - mean_g[:, None]) * rstd[:, None]
            tl.store(DX + rows.to(tl.int64)[:, None] * D + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
            acc_w += tl.sum(dy * xhat, axis=0)
            acc_b += tl.sum(dy, axis=0)
        tl.store(DWP + p * D + cols, acc_w, mask=cols < D)
        tl.store(DBP + p * D + cols, acc_b, mask=cols < D)
    else:
        for r0 in range(row_start, row_end, ROWS):  # pass 1: each row's sums, kept in SUMS
            rows = r0 + tl.arange(0, ROWS)
            rmask = rows < row_end
            sum_g = tl.zeros([ROWS], dtype=tl.float32)
            sum_gx = tl.zeros([ROWS], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                xhat, dy, g, mask, rstd = _row_tile(X, DY, MEAN, RSTD, W, rows, rmask, d0 + cols, D,
                                                    dy_stride_r, dy_stride_d, HAS_W)
                sum_g += tl.sum(g, axis=1)
                sum_gx += tl.sum(g * xhat, axis=1)
            tl.store(SUMS + rows * 2, sum_g, mask=rmask)
            tl.store(SUMS + rows * 2 + 1, sum_gx, mask=rmask)
        for d0 in range(0, D, BLOCK_D):  # pass 2: dx, and the column partials tile by tile
            acc_w = tl.zeros([BLOCK_D], dtype=tl.float32)
            acc_b = tl.zeros([BLOCK_D], dtype=tl.float32)
            for r0 in range(row_start, row_end, ROWS):
                rows = r0 + tl.arange(0, ROWS)
                rmask = rows < row_end
                xhat, dy, g, mask, rstd = _row_tile(X, DY, MEAN, RSTD, W, rows, rmask, d0 + cols, D,
                                                    dy_stride_r, dy_stride_d, HAS_W)
                mean_g = tl.load(SUMS + rows * 2, mask=rmask, other=0.0) / D
                mean_gx = tl.load(SUMS + rows * 2 + 1, mask=rmask, other=0.0) / D
                dx = (g - xhat * mean_gx[:, None] - mean_g[:, None]) * rstd[:, None]
                offsets = rows.to(tl.int64)[:, None] * D + (d0 + cols)[None, :]
                tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=mask)
                acc_w += tl.sum(dy * xhat, axis=0)
                acc_b += tl.sum(dy, axis=0)
            tl.store(DWP + p * D + d0 + cols, acc_w, mask=d0 + cols < D)
            tl.store(DBP + p * D + d0 + cols, acc_b, mask=d0 + cols < D)
