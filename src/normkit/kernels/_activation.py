"""Activations fused into the batch-norm kernels, and their derivatives (Triton device functions).

Codes: ``0`` identity, ``1`` ReLU, ``2`` SiLU. The backward never stores the pre-activation: the kernels recompute
``z = x_hat * gamma + beta (+ residual)`` and call :func:`activation_grad` on it.
"""

from __future__ import annotations

import triton
import triton.language as tl

CODES = {None: 0, "relu": 1, "silu": 2}


@triton.jit
def activate(z, ACT: tl.constexpr):
    """``act(z)`` in float32."""
    if ACT == 1:
        z = tl.maximum(z, 0.0, propagate_nan=tl.PropagateNan.ALL)  # relu(NaN) is NaN, as in torch
    elif ACT == 2:
        z = z * tl.sigmoid(z)
    return z


@triton.jit
def activation_grad(dy, z, ACT: tl.constexpr):
    """``dy * act'(z)``: ReLU passes ``dy`` where ``z > 0``; SiLU's derivative is ``s (1 + z (1 - s))``."""
    if ACT == 1:
        dy = tl.where(z > 0, dy, 0.0)
    elif ACT == 2:
        s = tl.sigmoid(z)
        dy = dy * s * (1.0 + z * (1.0 - s))
    return dy
