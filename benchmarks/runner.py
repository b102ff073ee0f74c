"""The shared benchmark runner: paired, interleaved timings, medians, and a markdown row per measurement.

Two implementations of the same call are timed in alternating rounds (A B A B ...), so drift on a shared, noisy
machine hits both alike; the reported speed-up is the median of the per-round ratios.
"""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Paired:
    baseline_ms: float
    candidate_ms: float
    speedup: float  # median over rounds of baseline / candidate


def time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def paired(baseline: Callable[[], object], candidate: Callable[[], object], rounds: int = 15,
           warmup_s: float = 0.3, sample_ms: float = 2.0) -> Paired:
    """Time ``baseline`` and ``candidate`` in alternating rounds; each sample repeats a call until it lasts about
    ``sample_ms`` (short calls are otherwise dominated by timer and scheduler noise)."""
    single = []
    for fn in (baseline, candidate):
        start = time.perf_counter()
        while time.perf_counter() - start < warmup_s:
            single.append(time_once(fn))
    repeats = max(1, math.ceil(sample_ms / max(statistics.median(single), 1e-3)))
    base, cand, ratios = [], [], []
    for i in range(rounds):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {fn: time_repeated(fn, repeats) for fn in order}
        base.append(times[baseline])
        cand.append(times[candidate])
        ratios.append(times[baseline] / times[candidate])
    return Paired(statistics.median(base), statistics.median(cand), statistics.median(ratios))


def time_repeated(fn: Callable[[], object], repeats: int) -> float:
    """Milliseconds per call, averaged over ``repeats`` back-to-back calls."""
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) * 1e3 / repeats


def machine() -> str:
    cores = os.cpu_count()
    return f"{cores}-core {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


def today() -> str:
    return datetime.date.today().isoformat()
