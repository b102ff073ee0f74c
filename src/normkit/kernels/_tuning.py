"""Launch settings shared by normkit's kernels: SM counts, grid limits, and the configs of the row-norm kernels.

Torch-only at import time (triton is imported inside the functions that need it), so the host modules and the
tests can ask for configs and grids without triton loaded.

Configs (GroupNorm and LayerNorm kernels): no per-process autotuning. Each kernel family has a small table
(:data:`WARPS_TABLE`) mapping the size of its tile (values a program holds per loop step, chosen by the host from
the shape) to ``num_warps``; by default that choice is the only one, so every process computes a shape with the
same config and the results are bitwise reproducible. ``NORMKIT_TUNE=1`` times the table's choice and its
neighbours (half and twice the warps, never so few warps that a thread holds more than the family's register
budget) once per shape class, and caches the winner on disk (``_tune_cache``) for other processes and DDP ranks;
``NORMKIT_TUNE=check`` times at most 2 candidates (the table's and twice its warps). Under ``TRITON_INTERPRET=1``
there is exactly one config (the table's) and nothing is timed.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

import torch

from . import _tune_cache
from ._options import COMPILE_OPTIONS
from ._support import interpreting

TUNE_ENV = "NORMKIT_TUNE"
# family -> ascending (largest tile in values, num_warps) rows; the last row (None) takes every larger tile.
# Forward kernels hold ~2 fp32 values per tile element, backward ones ~4-6 (x, dy, xhat, g, the column partials):
# more warps for the same tile. Checked on offline sm_90 compiles (Triton 3.9, ptxas -v): no spills for LayerNorm's
# plans at every power-of-two row length 16..32768 (bf16, fp32) nor for GroupNorm's kernels on representative
# NCHW/channels_last shapes (tiles <= 2048 values); LayerNorm's backward at 16 warps spilled from 8192 values.
WARPS_TABLE: dict[str, tuple[tuple[int | None, int], ...]] = {
    "gn_fwd": ((256, 1), (512, 2), (2048, 4), (8192, 8), (None, 16)),
    "gn_bwd": ((128, 1), (256, 2), (1024, 4), (4096, 8), (None, 16)),
    "ln_fwd": ((256, 1), (512, 2), (2048, 4), (4096, 8), (16384, 16), (None, 32)),
    "ln_bwd": ((128, 1), (256, 2), (1024, 4), (2048, 8), (4096, 16), (None, 32)),
}
# Most tile values one thread may hold when tuning explores fewer warps (fewer warps spill, and spilling configs
# take 10-70 s to compile): LayerNorm's forward at 8-16k values tries >= 8 warps, its backward >= 16 from 4096.
VALUES_PER_THREAD = {"gn_fwd": 64, "gn_bwd": 32, "ln_fwd": 32, "ln_bwd": 8}
MAX_WARPS = 32
CHECK_CANDIDATES = 2
# CUDA's launch grid: x up to 2**31 - 1 programs, y and z up to 65,535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def warp_configs(*num_warps: int) -> list:
    """One ``triton.Config`` per warp count (no tunable block size: the host picks the tile from the shape);
    a single 4-warp config under the interpreter.

    Args:
        num_warps: the warp counts to autotune over.
    """
    import triton

    if interpreting():
        return [triton.Config({}, num_warps=4)]
    return [triton.Config({}, num_warps=w) for w in num_warps]


def streaming_processors(device: torch.device) -> int:
    """Number of SMs of a CUDA device (1 on the interpreter): the launch grids aim at a few programs per SM.

    Args:
        device: the tensors' device.
    """
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def check_grid(grid: tuple[int, ...]) -> tuple[int, ...]:
    """``grid`` itself when CUDA can launch it (:data:`GRID_LIMITS`), else ``ValueError`` (a bug in a plan).

    Args:
        grid: programs along x (, y (, z)).
    """
    if not 1 <= len(grid) <= 3 or any(not 1 <= g <= limit for g, limit in zip(grid, GRID_LIMITS, strict=False)):
        raise ValueError(f"launch grid {grid} exceeds CUDA's limits {GRID_LIMITS} (or has an empty dimension)")
    return grid


def table_config(family: str, values: int) -> dict:
    """The table's config for a tile of ``values`` values of a kernel family (see :data:`WARPS_TABLE`).

    Args:
        family: ``"gn_fwd"``, ``"gn_bwd"``, ``"ln_fwd"`` or ``"ln_bwd"``.
        values: values one program holds per loop step (its tile).
    """
    for bound, warps in WARPS_TABLE[family]:
        if bound is None or values <= bound:
            return {"num_warps": warps}
    raise ValueError(f"WARPS_TABLE[{family!r}] lacks its last (None) row")


def min_warps(family: str, values: int) -> int:
    """Fewest warps tuning may try for a tile (each thread holds at most ``VALUES_PER_THREAD[family]`` values)."""
    budget = 32 * VALUES_PER_THREAD[family]
    return min(MAX_WARPS, max(1, 1 << max(0, -(-values // budget) - 1).bit_length()))


def candidates(family: str, values: int) -> list[dict]:
    """Configs tuning may time: the table's first, then twice and half its warps (within the register budget).

    Args:
        family: a :data:`WARPS_TABLE` key.
        values: the tile's values.
    """
    warps = table_config(family, values)["num_warps"]
    lowest = min_warps(family, values)
    found = [warps] + [w for w in (2 * warps, warps // 2) if lowest <= w <= MAX_WARPS and w != warps]
    return [{"num_warps": w} for w in found]


def tune_mode() -> str | None:
    """``$NORMKIT_TUNE``: ``None`` (unset, empty or ``0``: the table only), ``"full"`` (``1``) or ``"check"``."""
    value = os.environ.get(TUNE_ENV, "").strip().lower()
    if value in ("", "0"):
        return None
    if value in ("1", "check"):
        return "full" if value == "1" else "check"
    warnings.warn(f"normkit: {TUNE_ENV}={value!r} is not 1, check or 0; using the config table", RuntimeWarning,
                  stacklevel=3)
    return None


def measure(run: Callable[[dict], None], config: dict) -> float:
    """Milliseconds per launch of ``run(config)`` (``triton.testing.do_bench``, short warm-up; compiles first)."""
    from triton.testing import do_bench

    return do_bench(lambda: run(config), warmup=5, rep=20)


def _measure_or_inf(run: Callable[[dict], None], config: dict) -> float:
    """:func:`measure`, or infinity when a neighbour of the table's config cannot compile or run (resources)."""
    try:
        return measure(run, config)
    except Exception:  # noqa: BLE001 - any failure of an alternative only rules it out
        return float("inf")


def tuned(path, key: str, options: list[dict], run: Callable[[dict], None], *, valid=None) -> dict:
    """The cached config of ``key``, else the fastest of ``options`` (timed once, ties to the first; an option
    other than the first that fails to compile or run is skipped), cached.

    Args:
        path: the cache file (``_tune_cache.cache_path``).
        key: kernel family and shape class.
        options: the candidates, table's first.
        run: launches the kernel with a config (idempotent: same inputs, same outputs).
        valid: whether a cached config may be used (default: it is one of ``options``).
    """
    valid = valid or (lambda config: config in options)
    cached = _tune_cache.lookup(path, key)
    if cached is not None and valid(cached):
        return cached
    times = [measure(run, options[0])] + [_measure_or_inf(run, config) for config in options[1:]]
    best = options[times.index(min(times))]
    return _tune_cache.store(path, key, best, valid=valid)


@functools.cache
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def _device_cache_path(index: int):
    """The cache file of CUDA device ``index`` (``$NORMKIT_CACHE_DIR`` read on each call)."""
    import triton

    return _tune_cache.cache_path(triton.__version__, _device_name(index))


def choose(family: str, values: int, key: Callable[[], str], run: Callable[[dict], None],
           device: torch.device) -> dict:
    """The config of one launch: the table's, or (``NORMKIT_TUNE`` set, on CUDA) the tuned and cached one.

    Args:
        family: a :data:`WARPS_TABLE` key.
        values: the launch's tile in values.
        key: builds the shape-class key (called only when tuning).
        run: launches the kernel with a config.
        device: the tensors' device.
    """
    config = table_config(family, values)
    mode = tune_mode()
    if mode is None or interpreting() or device.type != "cuda":
        return config
    options = candidates(family, values)
    if mode == "check":
        options = options[:CHECK_CANDIDATES]
    index = device.index if device.index is not None else torch.cuda.current_device()
    full = candidates(family, values)
    return tuned(_device_cache_path(index), f"{family}|{key()}", options, run, valid=lambda c: c in full)


def launch(kernel, grid: tuple[int, ...], args: tuple, meta: dict, *, family: str, values: int,
           key: Callable[[], str], device: torch.device) -> None:
    """``kernel[grid](*args, **meta)`` with the config :func:`choose` picks (and normkit's compile options).

    Args:
        kernel: a ``triton.jit`` function.
        grid: the launch grid (checked against CUDA's limits).
        args: positional arguments.
        meta: keyword arguments (constexprs).
        family, values, key, device: as for :func:`choose`.
    """
    check_grid(grid)

    def run(config: dict) -> None:
        kernel[grid](*args, **meta, **config, **COMPILE_OPTIONS)

    run(choose(family, values, key, run, device))
