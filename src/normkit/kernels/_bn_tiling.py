"""Host-side launch choices of the batch-norm kernels: block caps, autotune configs, reduction tiles.

On a GPU the kernels autotune over several block sizes and warp counts; under Triton's interpreter
(``TRITON_INTERPRET=1``, how CI runs them on CPU) there is exactly one small config, so that tiny test shapes still
take every code path (several tiles per channel, several chunks per tile, masked edges).
"""

from __future__ import annotations

import torch
import triton

from ._support import interpreting
from ._tuning import streaming_processors

INTERPRET = interpreting()

# Largest block along the contiguous axis of a pointwise tile, and along the channels of a ``rows`` reduction.
INNER_CAP = 16 if INTERPRET else 1024
CHANNEL_CAP = 8 if INTERPRET else 64
# A reduction program reads at least this many values (on a GPU: >= 32 KiB of fp32).
MIN_TILE = 16 if INTERPRET else 8192
# Programs a reduction aims for per streaming multiprocessor (enough to hide memory latency).
PROGRAMS_PER_SM = 8


def configs(blocks: tuple[int, ...], warps: tuple[int, ...], interpret_block: int) -> list[triton.Config]:
    """Autotune configs: every ``BLOCK`` x ``num_warps`` on a GPU, one small config under the interpreter."""
    if INTERPRET:
        return [triton.Config({"BLOCK": interpret_block}, num_warps=1)]
    return [triton.Config({"BLOCK": b}, num_warps=w) for b in blocks for w in warps]


def inner_block(extent: int, block: int) -> int:
    """The block along a contiguous axis of ``extent`` values, within a ``block``-element tile."""
    return min(triton.next_power_of_2(max(extent, 1)), block, INNER_CAP)


def channel_block(channels: int) -> int:
    """Channels per program of a ``rows`` reduction."""
    return min(triton.next_power_of_2(channels), CHANNEL_CAP)


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should have to fill the device."""
    if device.type != "cuda":  # the interpreter runs programs one after another: few, but more than one per channel
        return 8
    return PROGRAMS_PER_SM * streaming_processors(device)


def tiles_per_channel(groups: int, count: int, device: torch.device) -> int:
    """Tiles per channel group so that ``groups * tiles`` fills the device, each tile holding >= ``MIN_TILE`` of
    the group's ``count`` values."""
    wanted = triton.cdiv(target_programs(device), max(groups, 1))
    return max(1, min(wanted, triton.cdiv(count, MIN_TILE)))


def plane_tiles(planes: int, size: int, tiles: int) -> tuple[int, int, int, int]:
    """Split a channel's ``planes x size`` values into about ``tiles`` rectangles.

    Returns ``(planes_per_tile, span, tiles_along_planes, tiles_along_size)``: whole planes per tile when there are
    enough planes, else one plane per tile cut into spans of the contiguous axis (rounded to 128 values).
    """
    if planes >= tiles:
        per_tile = triton.cdiv(planes, tiles)
        return per_tile, size, triton.cdiv(planes, per_tile), 1
    cuts = triton.cdiv(tiles, planes)
    span = triton.cdiv(size, cuts)
    if not INTERPRET:
        span = triton.cdiv(span, 128) * 128
    return 1, span, planes, triton.cdiv(size, span)
