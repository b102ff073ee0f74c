"""Host side of the batch-norm kernels: workspaces, grids and the order of the passes, on canonical layouts.

Bytes moved, in element passes: training forward 3 (read x for the statistics; read x, write y), backward 5 (read
dy and x for the sums; read dy and x, write dx), evaluation forward 2. A residual adds its read; with a residual
and an activation the backward's first pass also writes ``dz`` (the residual's gradient), which the second pass
reads instead of recomputing the activation.
"""

from __future__ import annotations

import torch
import triton

from . import _bn_pointwise as pointwise
from . import _bn_reduce as reduce
from . import _bn_tiling as tiling
from ._activation import CODES
from ._options import COMPILE_OPTIONS

_MERGE_CHANNELS = 8 if tiling.INTERPRET else 16


def _tiles(xc: torch.Tensor, kind: str) -> dict:
    """The reduction split of a canonical tensor: grid, tile count and the kernel's shape arguments."""
    channels = xc.shape[1]
    if kind == "planes":
        planes, _, size = xc.shape
        tiles = tiling.tiles_per_channel(channels, planes * size, xc.device)
        per_tile, span, along_planes, along_size = tiling.plane_tiles(planes, size, tiles)
        count = along_planes * along_size
        args = dict(P=planes, C=channels, S=size, per_tile=per_tile, span=span, tiles_s=along_size, tiles=count)
        return {"grid": (channels, count), "tiles": count, "args": args}
    rows = xc.shape[0]
    block_c = tiling.channel_block(channels)
    groups = triton.cdiv(channels, block_c)
    per_tile = triton.cdiv(rows, tiling.tiles_per_channel(groups, rows * block_c, xc.device))  # values/program
    count = triton.cdiv(rows, per_tile)
    args = dict(M=rows, C=channels, per_tile=per_tile, tiles=count, BLOCK_C=block_c)
    return {"grid": (groups, count), "tiles": count, "args": args}


def _matrix(xc: torch.Tensor, kind: str) -> tuple[int, int]:
    """``(R, K)``: the canonical tensor as the matrix the pointwise kernels tile."""
    return (xc.shape[0] * xc.shape[1], xc.shape[2]) if kind == "planes" else (xc.shape[0], xc.shape[1])


def moments(xc: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance (float32): split partials, then one Chan merge."""
    split = _tiles(xc, kind)
    channels = xc.shape[1]
    part = torch.empty((3, split["tiles"], channels), dtype=torch.float32, device=xc.device)
    kernel = reduce.moments_planes if kind == "planes" else reduce.moments_rows
    kernel[split["grid"]](xc, part, **split["args"], **COMPILE_OPTIONS)
    mean = torch.empty(channels, dtype=torch.float32, device=xc.device)
    var = torch.empty_like(mean)
    block_t = min(triton.next_power_of_2(split["tiles"]), 128)
    reduce.merge_moments[(triton.cdiv(channels, _MERGE_CHANNELS),)](
        part, xc, mean, var, split["tiles"], channels, xc.shape[2] if kind == "planes" else 1, BLOCK_T=block_t,
        BLOCK_C=_MERGE_CHANNELS, **COMPILE_OPTIONS)
    return mean, var


def normalize(xc, kind, mean, var, weight, bias, eps, residual, act, yc=None) -> torch.Tensor:
    """``act((x - mean) * rsqrt(var + eps) * weight + bias (+ residual))`` in the input's dtype, written into
    ``yc`` (a canonical view of the caller's output) or a new tensor."""
    rows, inner = _matrix(xc, kind)
    yc = torch.empty_like(xc) if yc is None else yc
    pointwise.normalize[pointwise.grid(rows, inner)](
        xc, residual if residual is not None else xc, yc, mean, var, weight, bias, rows, inner, xc.shape[1],
        eps, CHANNELS_LAST=kind == "rows", ACT=CODES[act], HAS_RES=residual is not None, **COMPILE_OPTIONS)
    return yc


def backward(dyc, xc, kind, weight, bias, mean, rstd, residual, act, training, count, need_input, need_affine,
             need_residual):
    """``(dx, sum(dz * x_hat), sum(dz), dz)`` on the canonical layout; entries not asked for are ``None``.

    ``dz`` (the gradient at the pre-activation, also the residual's) is only materialised for an activation with a
    residual whose gradient is wanted; without an activation it is ``dy`` itself.
    """
    channels = xc.shape[1]
    code = CODES[act]
    has_res = residual is not None
    write_dz = act is not None and has_res and need_residual
    dzc = torch.empty_like(xc) if write_dz else None
    sums = None
    if training or need_affine:
        split = _tiles(xc, kind)
        part = torch.empty((2, split["tiles"], channels), dtype=torch.float32, device=xc.device)
        kernel = reduce.grad_sums_planes if kind == "planes" else reduce.grad_sums_rows
        kernel[split["grid"]](dyc, xc, residual if has_res else xc, dzc if write_dz else xc, mean, rstd, weight,
                              bias, part, **split["args"], ACT=code, HAS_RES=has_res, WRITE_DZ=write_dz,
                              **COMPILE_OPTIONS)
        sums = part.sum(1)
    dxc = None
    if need_input or (write_dz and sums is None):
        rows, inner = _matrix(xc, kind)
        dxc = torch.empty_like(xc)
        pointwise.grad_input[pointwise.grid(rows, inner)](
            dyc, xc, residual if has_res else xc, dzc if write_dz else xc, dxc, mean, rstd, weight, bias,
            sums if sums is not None else mean, rows, inner, channels, 1.0 / count, CHANNELS_LAST=kind == "rows",
            ACT=code, HAS_RES=has_res, DZ_GIVEN=write_dz and sums is not None,
            WRITE_DZ=write_dz and sums is None, TRAINING=training, **COMPILE_OPTIONS)
    grad_weight, grad_bias = (sums[1], sums[0]) if need_affine else (None, None)
    return dxc if need_input else None, grad_weight, grad_bias, dzc
