"""Every benchmark script imports (a renamed or removed internal breaks it here, not on the next measurement day)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.parametrize("name", sorted(p.stem for p in BENCHMARKS.glob("*.py")))
def test_benchmark_imports_and_has_a_main(name, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module(name)
    try:
        assert name == "runner" or callable(getattr(module, "main", None))
    finally:
        sys.modules.pop(name, None)
