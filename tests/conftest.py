"""Shared pytest set-up.

Hypothesis draws a fixed set of examples in CI (``CI`` set), fresh ones elsewhere. Without a GPU the Triton
kernels run under Triton's interpreter, which must be switched on before any kernel is decorated.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
settings.register_profile("dev", deadline=None, print_blob=True)
settings.load_profile("ci" if os.environ.get("CI") else "dev")

QUICK_SEEDS = (0, 1)


@pytest.fixture(scope="session")
def quick_experiment():
    """``quick_experiment(name)``: the experiment's ``--quick`` result with seeds 0 and 1, run once per session."""
    from normkit.experiments._harness import Settings, run_experiment

    results: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in results:
            results[name] = run_experiment(name, Settings(quick=True, seeds=QUICK_SEEDS))
        return results[name]

    return run


@pytest.fixture
def composition_from_128_values(monkeypatch):
    """normkit's statistics composition switched on (ATen runs by default: BENCHMARKS.md) for planes of >= 128
    values, so that tests reach it with small inputs."""
    from normkit.functional import _dispatch

    monkeypatch.setitem(_dispatch.CPU_PLAN, "planes", "compose")
    monkeypatch.setattr(_dispatch, "SHORT_PLANE", 128)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module of many tiny calls: on a busy 2-core machine OpenMP's spinning threads fight
    over the cores (a (4, 10) batch norm runs up to 30x slower). Restored when the module's tests end."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
