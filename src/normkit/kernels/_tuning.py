"""Launch settings shared by normkit's kernels: interpreter detection, SM counts, the row-norm autotune configs.

Imports triton: load it only from the ``_*_triton`` kernel modules and from launch code, never at package import.
Under ``TRITON_INTERPRET=1`` (CPU tests) every autotuned kernel gets exactly one config: the interpreter is slow and
timing it would be meaningless.
"""

from __future__ import annotations

import torch
import triton

from ._support import interpreting


def warp_configs(*num_warps: int) -> list[triton.Config]:
    """One autotune config per warp count (no tunable block size: the host picks the tile from the shape);
    a single 4-warp config under the interpreter."""
    if interpreting():
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in num_warps]


def streaming_processors(device: torch.device) -> int:
    """Number of SMs of a CUDA device (1 on the interpreter): the launch grids aim at a few programs per SM."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
