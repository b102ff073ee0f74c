"""Pointwise batch-norm passes (Triton): the normalize pass (+ residual + activation) and the input gradient.

Both run over the canonical tensor as one flat, contiguous range of ``numel`` values cut into ``BLOCK``-element
tiles: no per-row padding to a power of two (a 7x7 plane wastes no lanes) and a 1D grid (CUDA's x dimension, up to
``2**31 - 1`` programs, so no grid limit below the kernels' 32-bit indexing). The channel of value ``i`` is
``(i // S) % C`` on ``planes`` ``(P, C, S)`` and ``i % C`` on ``rows`` ``(M, C)`` (``ROWS``); the per-channel
constants are gathered per value (cached loads of ``C``-long vectors).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._activation import activate, activation_grad
from ._bn_reduce import _channel_constants, relu_bit


@triton.jit
def _flat(numel, C, S, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """This program's offsets, their mask and channels."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    if ROWS:
        channel = i % C
    else:
        channel = (i // S) % C
    return i, mask, channel


@triton.jit
def normalize(x_ptr, r_ptr, y_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, bits_ptr, numel, C, S, eps,
              ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
              WRITE_BITS: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``y = act((x - mean) * rsqrt(var + eps) * w + b (+ residual))``, float32 math, stored in ``y``'s dtype;
    ``mean``/``var`` are the batch statistics (float32) or the running ones (any float dtype). ``WRITE_BITS``:
    also store ``z > 0`` as a bitmask (bit ``i % 8`` of byte ``i // 8``), the ReLU's derivative for the backward,
    which then need not read the residual again."""
    i, mask, ch = _flat(numel, C, S, ROWS, BLOCK)
    mean, rstd, w, b = _channel_constants(mean_ptr, var_ptr, w_ptr, b_ptr, ch, mask, eps, HAS_W, HAS_B)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    z = (x - mean) * (rstd * w) + b
    if HAS_RES:
        z += tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, activate(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)
    if WRITE_BITS:
        bits = tl.reshape((z > 0).to(tl.int32), (BLOCK // 8, 8)) << tl.arange(0, 8)[None, :]
        byte = tl.program_id(0) * (BLOCK // 8) + tl.arange(0, BLOCK // 8)
        tl.store(bits_ptr + byte, tl.sum(bits, axis=1).to(tl.uint8), mask=byte * 8 < numel)



@triton.jit
def grad_input(dy_ptr, x_ptr, r_ptr, dz_ptr, dx_ptr, mean_ptr, var_ptr, w_ptr, b_ptr, sums_ptr, numel, C, S, eps,
               inv_count, ACT: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
               DZ_GIVEN: tl.constexpr, WRITE_DZ: tl.constexpr, TRAINING: tl.constexpr, RELU_BITS: tl.constexpr,
               ROWS: tl.constexpr, BLOCK: tl.constexpr):
    """``dx = w * rstd * (dz - mean(dz) - x_hat * mean(dz * x_hat))`` in training, ``w * rstd * dz`` with running
    statistics (then ``x`` is read only to recompute an activation's derivative); ``dz`` is read (``DZ_GIVEN``) or
    recomputed from ``dy`` and the activation, or the ReLU bitmask at ``r_ptr`` (``RELU_BITS``), and then stored
    when ``WRITE_DZ``; ``sums`` holds ``sum(dz)`` then ``sum(dz * x_hat)`` per channel."""
    i, mask, ch = _flat(numel, C, S, ROWS, BLOCK)
    mean, rstd, w, b = _channel_constants(mean_ptr, var_ptr, w_ptr, b_ptr, ch, mask, eps, HAS_W, HAS_B)
    x_hat = 0.0
    if TRAINING or (ACT != 0 and not DZ_GIVEN and not RELU_BITS):  # evaluation without an activation: no x
        x_hat = (tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32) - mean) * rstd
    if DZ_GIVEN:
        dz = tl.load(dz_ptr + i, mask=mask, other=0.0).to(tl.float32)
    else:
        dz = tl.load(dy_ptr + i, mask=mask, other=0.0).to(tl.float32)
        if RELU_BITS:
            dz = tl.where(relu_bit(r_ptr, i, mask) != 0, dz, 0.0)
        elif ACT != 0:
            z = x_hat * w + b
            if HAS_RES:
                z += tl.load(r_ptr + i, mask=mask, other=0.0).to(tl.float32)
            dz = activation_grad(dz, z, ACT)
        if WRITE_DZ:
            tl.store(dz_ptr + i, dz.to(dz_ptr.dtype.element_ty), mask=mask)
    if TRAINING:
        mean_dz = tl.load(sums_ptr + ch, mask=mask, other=0.0) * inv_count
        mean_dzx = tl.load(sums_ptr + C + ch, mask=mask, other=0.0) * inv_count
        dz = dz - mean_dz - x_hat * mean_dzx
    tl.store(dx_ptr + i, (dz * (w * rstd)).to(dx_ptr.dtype.element_ty), mask=mask)
