"""Picks the implementation of each batch-norm pass: one seam between the math and the kernels.

Backends: ``"reference"`` (the readable oracle, autograd through plain torch ops), ``"cpu"`` (normkit's fast
path: per layout and pass the faster of a torch composition and ATen's native kernel, as measured in
BENCHMARKS.md; it runs on any device), ``"triton"`` (``normkit.kernels``: the default for CUDA tensors when triton is
installed and the kernels take the call). ``NORMKIT_BACKEND`` or a ``backend=`` argument forces one; a forced
``"triton"`` falls back to ``"reference"`` for calls the kernels do not take (see ``docs/kernels.md``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from types import ModuleType

import torch

from .. import kernels
from . import _aten, _compose
from ._layout import Layout

BACKENDS = ("reference", "cpu", "triton")

# Which implementation runs each pass on each canonical layout. "compose" is normkit's torch composition
# (_compose), "aten" ATen's native kernel for that pass alone (_aten). Measured side by side with
# `python benchmarks/bench_batchnorm.py --passes` on the 2-core CI machine; the numbers are in BENCHMARKS.md.
# "short_planes" are planes of fewer than SHORT_PLANE values (e.g. 7x7 maps), where the composition's per-call cost
# outweighs what it saves over ATen's per-channel loop.
SHORT_PLANE = 128
CPU_PLAN: dict[tuple[str, str], str] = {
    ("planes", "train_forward"): "compose",
    ("planes", "normalize"): "aten",
    ("planes", "backward"): "aten",
    ("short_planes", "train_forward"): "aten",
    ("short_planes", "normalize"): "aten",
    ("short_planes", "backward"): "aten",
    ("rows", "train_forward"): "aten",
    ("rows", "normalize"): "aten",
    ("rows", "backward"): "aten",
}

IMPLEMENTATIONS: dict[str, ModuleType] = {"compose": _compose, "aten": _aten}


def backend_for(x: torch.Tensor, requested: str | None = None, *,
                refusal: Callable[[], str | None] | None = None, fallback: str = "reference") -> str:
    """The backend for one call: ``requested``, else ``$NORMKIT_BACKEND``, else the default.

    ``refusal()`` says why the Triton kernels would not take this call (``None``: they take it); by default the
    batch-norm kernels' answer :func:`normkit.kernels.supports` for ``x``. The default backend is ``"triton"`` for a
    CUDA tensor the kernels take, else ``"cpu"``. A forced ``"triton"`` needs a CUDA tensor, or a CPU one under
    ``TRITON_INTERPRET=1`` (Triton's interpreter, how the tests run the kernels); a call the kernels refuse
    (float64, ``"gelu"``, ...) runs ``fallback`` instead (batch norm: ``"reference"``; group and layer norm pass
    ``"cpu"``, ATen's kernels).

    Examples::

        >>> import torch
        >>> from normkit.functional._dispatch import backend_for
        >>> backend_for(torch.zeros(2, 3), "cpu"), backend_for(torch.zeros(2, 3, dtype=torch.float64), "reference")
        ('cpu', 'reference')
    """
    name = requested or os.environ.get("NORMKIT_BACKEND")
    refused = refusal if refusal is not None else (lambda: kernels.supports(x))
    if name is None:
        return "triton" if x.is_cuda and refused() is None else "cpu"
    if name not in BACKENDS:
        raise ValueError(
            f"unknown normkit backend {name!r}; expected one of {', '.join(map(repr, BACKENDS))} "
            "(from the backend argument or the NORMKIT_BACKEND environment variable)."
        )
    if name == "triton":
        if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend 'triton' expects a CUDA tensor, got one on {x.device.type!r}. Move the input to a GPU, "
                "use backend='cpu' (runs on any device) or unset NORMKIT_BACKEND; to run the kernels on CPU "
                "through Triton's (slow) interpreter, set TRITON_INTERPRET=1 before triton is imported."
            )
        if refused() is not None:
            return fallback
    return name


def plan_kind(kind: str, plane_size: int) -> str:
    """The CPU_PLAN row of a canonical layout: its memory kind, with short planes apart."""
    return "short_planes" if kind == "planes" and plane_size < SHORT_PLANE else kind


def aten_end_to_end(layout: Layout, training: bool) -> bool:
    """Whether ATen's kernel runs both the forward and the backward of this call (then autograd needs no help)."""
    kind = plan_kind(layout.kind, math.prod(layout.shape[layout.channel + 1:]))
    forward = "train_forward" if training else "normalize"
    return CPU_PLAN[(kind, forward)] == CPU_PLAN[(kind, "backward")] == "aten"


def aten_in_place(x: torch.Tensor, layout: Layout) -> bool:
    """Whether ATen may also move the running statistics of this training call (torch's rule, unbiased variance):
    when it wins both passes, on CPU (its non-finite check is a host read) and outside ``torch.compile``."""
    return x.device.type == "cpu" and not torch.compiler.is_compiling() and aten_end_to_end(layout, True)


def _impl(xc: torch.Tensor, kind: str, pass_name: str) -> ModuleType:
    return IMPLEMENTATIONS[CPU_PLAN[(plan_kind(kind, xc.shape[-1]), pass_name)]]


def train_forward(xc, kind, weight, bias, eps):
    """Batch statistics and the normalized output: ``(y, mean, biased var)`` on a canonical layout."""
    impl = _impl(xc, kind, "train_forward")
    if impl is _aten:
        return _aten.train_forward(xc, kind, weight, bias, eps)
    mean, var = impl.moments(xc, kind)
    return normalize(xc, kind, mean, var, weight, bias, eps), mean, var


def normalize(xc, kind, mean, var, weight, bias, eps):
    """``(x - mean) / sqrt(var + eps) * weight + bias`` on a canonical layout."""
    return _impl(xc, kind, "normalize").normalize(xc, kind, mean, var, weight, bias, eps)


def backward(dyc, xc, kind, weight, mean, var, eps, training, grad_affine):
    """``(grad_input, grad_weight, grad_bias)`` on a canonical layout."""
    return _impl(xc, kind, "backward").backward(dyc, xc, kind, weight, mean, var, eps, training, grad_affine)
