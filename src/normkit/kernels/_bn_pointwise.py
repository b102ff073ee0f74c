"""Pointwise batch-norm passes (Triton): the normalize pass (+ residual + activation) and the input gradient.

Both see the canonical tensor as a matrix: ``planes`` ``(P, C, S)`` as ``(P * C, S)`` rows whose channel is
``row % C``; ``rows`` ``(M, C)`` as is, the channel being the column. A program handles a ``BLOCK_R x BLOCK_K``
tile (the contiguous axis innermost) and loads its per-channel constants once per row (or column), never per
element.
"""

from __future__ import annotations

import triton
import triton.language as tl

from . import _bn_tiling as tiling
from ._activation import activate, activation_grad

_CONFIGS = tiling.configs((1024, 2048, 4096, 8192), (4, 8), interpret_block=256)


# Tile shape from the autotuned element count BLOCK: the contiguous axis first, the rest across rows.
_tile = {
    "BLOCK_K": lambda a: tiling.inner_block(a["K"], a["BLOCK"]),
    "BLOCK_R": lambda a: max(1, a["BLOCK"] // tiling.inner_block(a["K"], a["BLOCK"])),
}


def grid(rows: int, inner: int):
    """The launch grid of a pointwise kernel over a ``rows x inner`` matrix."""
    return lambda meta: (triton.cdiv(rows, meta["BLOCK_R"]), triton.cdiv(inner, meta["BLOCK_K"]))


@triton.jit
def _tile_indices(R, K, C, CHANNELS_LAST: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """Element offsets, mask, and the channel index (with its mask) broadcastable over the tile."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (r[:, None] < R) & (k[None, :] < K)
    if CHANNELS_LAST:
        channel = k[None, :]
        channel_in = channel < K
    else:
        channel = (r % C)[:, None]
        channel_in = r[:, None] < R
    return r[:, None] * K + k[None, :], mask, channel, channel_in


@triton.autotune(configs=_CONFIGS, key=["K", "C", "CHANNELS_LAST", "ACT", "HAS_RES"])
@triton.heuristics(_tile)
@triton.jit
def normalize(x_ptr, r_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, R, K, C, eps,
              CHANNELS_LAST: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
              BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y = act((x - mean) * rsqrt(var + eps) * w + b (+ residual))``, float32 math, stored in ``y``'s dtype."""
    i, mask, ch, ch_in = _tile_indices(R, K, C, CHANNELS_LAST, BLOCK_R, BLOCK_K)
    mean = tl.load(mean_ptr + ch, mask=ch_in, other=0.0).to(tl.float32)
    var = tl.load(var_ptr + ch, mask=ch_in, other=1.0).to(tl.float32)
    w = tl.load(w_ptr + ch, mask=ch_in, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + ch, mask=ch_in, other=0.0).to(tl.float32)
    scale = w * tl.rsqrt(var + eps)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean) * scale + b
    if HAS_RES:
        z += tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, activate(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)


@triton.autotune(configs=_CONFIGS, key=["K", "C", "CHANNELS_LAST", "ACT", "HAS_RES", "DZ_GIVEN", "WRITE_DZ",
                                        "TRAINING"])
@triton.heuristics(_tile)
@triton.jit
def grad_input(dy_ptr, x_ptr, r_ptr, dz_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, sums_ptr, R, K, C,
               inv_count, CHANNELS_LAST: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr,
               DZ_GIVEN: tl.constexpr, WRITE_DZ: tl.constexpr, TRAINING: tl.constexpr,
               BLOCK: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """``dx = w * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))`` in training, ``w * rstd * dz`` with running
    statistics; ``dz`` is read (``DZ_GIVEN``) or recomputed from ``dy`` and the activation (and then stored when
    ``WRITE_DZ``); ``sums`` holds ``sum(dz)`` then ``sum(dz * x_hat)`` per channel."""
    i, mask, ch, ch_in = _tile_indices(R, K, C, CHANNELS_LAST, BLOCK_R, BLOCK_K)
    mean = tl.load(mean_ptr + ch, mask=ch_in, other=0.0)
    rstd = tl.load(rstd_ptr + ch, mask=ch_in, other=0.0)
    w = tl.load(w_ptr + ch, mask=ch_in, other=0.0).to(tl.float32)
    x_hat = (tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    if DZ_GIVEN:
        dz = tl.load(dz_ptr + i, mask=mask, other=0.0).to(tl.float32)
    else:
        dz = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
        if ACT != 0:
            z = x_hat * w + tl.load(b_ptr + ch, mask=ch_in, other=0.0).to(tl.float32)
            if HAS_RES:
                z += tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
            dz = activation_grad(dz, z, ACT)
        if WRITE_DZ:
            tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        mean_dz = tl.load(sums_ptr + ch, mask=ch_in, other=0.0) * inv_count
        mean_dzx = tl.load(sums_ptr + C + ch, mask=ch_in, other=0.0) * inv_count
        dz = dz - mean_dz - x_hat * mean_dzx
    tl.store(dx_ptr + i, (dz * (w * rstd)).to(dx_ptr.dtype.element_ty), mask=mask)
