"""Picks the implementation of each batch-norm pass: one seam between the math and the kernels.

Backends: ``"reference"`` (the readable oracle, autograd through plain torch ops), ``"cpu"`` (normkit's fast
path: per layout and pass the faster of a torch composition and ATen's native kernel, as measured in
BENCHMARKS.md), ``"triton"`` (GPU kernels; not built yet). ``NORMKIT_BACKEND`` forces one for every call.
"""

from __future__ import annotations

import os
from types import ModuleType

import torch

from . import _aten, _compose

BACKENDS = ("reference", "cpu", "triton")
PASSES = ("train_forward", "eval_forward", "backward")

# Measured with `python benchmarks/bench_batchnorm.py --passes` on the 2-core CI machine; see BENCHMARKS.md.
CPU_PLAN: dict[tuple[str, str], str] = {
    ("planes", "train_forward"): "compose",
    ("planes", "eval_forward"): "aten",
    ("planes", "backward"): "aten",
    ("rows", "train_forward"): "compose",
    ("rows", "eval_forward"): "compose",
    ("rows", "backward"): "compose",
}

IMPLEMENTATIONS: dict[str, ModuleType] = {"compose": _compose, "aten": _aten}


def backend_for(x: torch.Tensor, requested: str | None = None) -> str:
    """The backend for one call: ``requested``, else ``$NORMKIT_BACKEND``, else ``"cpu"``."""
    name = requested or os.environ.get("NORMKIT_BACKEND") or "cpu"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown normkit backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))} "
            "(from the backend argument or the NORMKIT_BACKEND environment variable)."
        )
    if name == "triton":
        raise NotImplementedError(
            "normkit's Triton kernels are not built yet (issue 8: 'Triton GPU kernels'); use backend='cpu', "
            "which runs on any device, or unset NORMKIT_BACKEND."
        )
    return name


def pass_impl(kind: str, pass_name: str, plan: dict[tuple[str, str], str] | None = None):
    """The function that runs ``pass_name`` on the canonical layout ``kind`` under ``plan`` (default CPU_PLAN)."""
    choice = (plan or CPU_PLAN)[(kind, pass_name)]
    module = IMPLEMENTATIONS[choice]
    return getattr(module, "normalize" if pass_name == "eval_forward" else pass_name)
