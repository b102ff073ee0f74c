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


@dataclass
class Interleaved:
    """Per-round milliseconds per call of several implementations timed in interleaved rounds."""

    times: dict[str, list[float]]
    repeats: dict[str, int]

    def median(self, name: str) -> float:
        return statistics.median(self.times[name])

    def quantile(self, name: str, q: float) -> float:
        values = sorted(self.times[name])
        return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]

    def ratio(self, baseline: str, candidate: str) -> float:
        """Median over rounds of baseline / candidate (drift within a round hits both alike)."""
        return statistics.median(b / c for b, c in zip(self.times[baseline], self.times[candidate], strict=True))


def interleaved(fns: dict[str, Callable[[], object]], device: torch.device | str = "cpu", rounds: int = 11,
                warmup: int = 3, sample_ms: float = 2.0, max_repeats: int = 1000) -> Interleaved:
    """Time several implementations of one call in interleaved rounds; on CUDA with events around each sample.

    Each implementation is first called ``warmup`` times (compilation belongs outside: call each once before).
    Then each sample repeats a call back to back until it lasts about ``sample_ms`` (so launch gaps count, as they
    do in a model, while timer resolution does not), and every round times each implementation once, in an order
    that rotates and reverses from round to round. The device is synchronised around every sample.
    """
    device = torch.device(device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def sample(fn: Callable[[], object], repeats: int) -> float:
        sync()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(repeats):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / repeats
        begin = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - begin) * 1e3 / repeats

    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    sync()
    repeats = dict.fromkeys(names, 1)
    for name in names if sample_ms > 0 else ():
        once = min(sample(fns[name], 1) for _ in range(2))
        repeats[name] = max(1, min(max_repeats, math.ceil(sample_ms / max(once, 1e-3))))
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]
        if (i // len(names)) % 2:
            order.reverse()
        for name in order:
            times[name].append(sample(fns[name], repeats[name]))
    return Interleaved(times, repeats)


def machine() -> str:
    cores = os.cpu_count()
    return f"{cores}-core {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


def today() -> str:
    return datetime.date.today().isoformat()
