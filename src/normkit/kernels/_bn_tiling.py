"""Launch choices of the batch-norm kernels from the shape alone: a small table, no autotuning.

Every choice is a pure function of the shape and dtype, so every process (every DDP rank) launches the same
configuration and gets bitwise the same result, and nothing is compiled or timed beyond the one variant a call
needs. Under Triton's interpreter (``TRITON_INTERPRET=1``, how CI runs the kernels on CPU) the blocks are tiny, so
that tiny test shapes still take every code path (several tiles per channel, several chunks per tile, several
blocks of tiles in the merge, masked edges, partial pointwise tiles).
"""

from __future__ import annotations

import functools

import torch
import triton

from ._support import interpreting
from ._tuning import streaming_processors

INTERPRET = interpreting()

# Values per chunk of a reduction program (all lanes of all warps, one loop iteration), and its warps.
REDUCE_BLOCK = 16 if INTERPRET else 2048
REDUCE_WARPS = 1 if INTERPRET else 4
# Largest block along the contiguous axis of a plane, and along the channels of a ``rows`` reduction.
INNER_CAP = 16 if INTERPRET else 1024
CHANNEL_CAP = 8 if INTERPRET else 64
# Tiles merged per step by the last program of a channel.
MERGE_BLOCK = 4 if INTERPRET else 64
# A reduction program reads at least this many values (on a GPU: >= 32 KiB of fp32).
MIN_TILE = 16 if INTERPRET else 8192
# Programs a reduction aims for per streaming multiprocessor (enough to hide memory latency).
PROGRAMS_PER_SM = 8
# Values per program of a pointwise pass: 16 per thread of 8 warps on a GPU (four 16-byte fp32 vectors).
POINTWISE_BLOCK = 64 if INTERPRET else 4096
POINTWISE_WARPS = 1 if INTERPRET else 8


def target_programs(device: torch.device) -> int:
    """How many programs a reduction grid should have to fill the device."""
    if device.type != "cuda":  # the interpreter runs programs one after another: few, but more than one per channel
        return 8
    return PROGRAMS_PER_SM * streaming_processors(device)


def tiles_per_channel(groups: int, count: int, programs: int) -> int:
    """Tiles per channel group so that ``groups * tiles`` is about ``programs``, each tile holding >= ``MIN_TILE``
    of the group's ``count`` values."""
    wanted = triton.cdiv(programs, max(groups, 1))
    return max(1, min(wanted, triton.cdiv(count, MIN_TILE)))


def _largest_power_of_two_dividing(n: int, cap: int) -> int:
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block


@functools.lru_cache(maxsize=4096)
def plane_split(planes: int, channels: int, size: int, programs: int) -> dict:
    """The reduction split of a ``(P, C, S)`` tensor: grid, tile count, block shape and the kernel's arguments.

    Whole planes per tile when there are enough planes, else one plane per tile cut into spans of the contiguous
    axis. The block along ``S`` divides ``S`` when a power of two of at least 32 does (56x56: 64; 7x7 has none), and
    then every chunk is full and the hot loop runs without masks (``EVEN``).
    """
    tiles = tiles_per_channel(channels, planes * size, programs)
    block_s = _largest_power_of_two_dividing(size, INNER_CAP)
    if block_s < min(32, INNER_CAP):
        block_s = min(triton.next_power_of_2(size), INNER_CAP)
    block_p = max(1, REDUCE_BLOCK // block_s)
    if planes >= tiles:
        per_tile = triton.cdiv(triton.cdiv(planes, tiles), block_p) * block_p if planes >= block_p else planes
        span, along_planes, along_size = size, triton.cdiv(planes, per_tile), 1
    else:
        block_p = 1
        per_tile = 1
        span = triton.cdiv(triton.cdiv(size, triton.cdiv(tiles, planes)), block_s) * block_s
        along_planes, along_size = planes, triton.cdiv(size, span)
    even_p = per_tile % block_p == 0 and planes % per_tile == 0
    even = even_p and size % block_s == 0 and span % block_s == 0 and size % span == 0
    count = along_planes * along_size
    return {"grid": (channels, count), "tiles": count, "locks": channels,
            "args": dict(P=planes, C=channels, S=size, per_tile=per_tile, span=span, tiles_s=along_size,
                         tiles=count),
            "blocks": dict(BLOCK_P=block_p, BLOCK_S=block_s, BLOCK_T=MERGE_BLOCK), "even": even,
            "even_p": even_p}


@functools.lru_cache(maxsize=4096)
def row_split(rows: int, channels: int, programs: int) -> dict:
    """The reduction split of an ``(M, C)`` tensor: blocks of channels, each cut into row tiles."""
    block_c = min(triton.next_power_of_2(channels), CHANNEL_CAP)
    block_m = max(1, REDUCE_BLOCK // block_c)
    groups = triton.cdiv(channels, block_c)
    per_tile = triton.cdiv(rows, tiles_per_channel(groups, rows * block_c, programs))
    per_tile = triton.cdiv(per_tile, block_m) * block_m if rows >= block_m else per_tile
    count = triton.cdiv(rows, per_tile)
    even = channels % block_c == 0 and per_tile % block_m == 0 and rows % per_tile == 0
    return {"grid": (groups, count), "tiles": count, "locks": groups,
            "args": dict(M=rows, C=channels, per_tile=per_tile, tiles=count),
            "blocks": dict(BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_T=MERGE_BLOCK), "even": even}


def pointwise_grid(numel: int) -> tuple[int]:
    """The 1D grid of a pointwise pass over ``numel`` values."""
    return (-(-numel // POINTWISE_BLOCK),)

