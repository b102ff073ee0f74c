"""The shared benchmark runner: paired, interleaved timings, medians, and a markdown row per measurement.

Two implementations of the same call are timed in alternating rounds (A B A B ...), so drift on a shared, noisy
machine hits both alike; the reported speed-up is the median of the per-round ratios.
"""

from __future__ import annotations

import datetime
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
           warmup: int = 3) -> Paired:
    for _ in range(warmup):
        baseline()
        candidate()
    base, cand, ratios = [], [], []
    for i in range(rounds):
        order = (baseline, candidate) if i % 2 == 0 else (candidate, baseline)
        times = {fn: time_once(fn) for fn in order}
        base.append(times[baseline])
        cand.append(times[candidate])
        ratios.append(times[baseline] / times[candidate])
    return Paired(statistics.median(base), statistics.median(cand), statistics.median(ratios))


def machine() -> str:
    cores = os.cpu_count()
    return f"{cores}-core {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


def today() -> str:
    return datetime.date.today().isoformat()
