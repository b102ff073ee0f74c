"""Picks the backend of each call, after the front (validation, memory format, dtype policy) has run.

Backends only compute: ``"cpu"`` (the default on every device: torch's ATen ops, ``_aten``, with normkit's
statistics composition, ``_compose``, where CPU_PLAN enables it), ``"reference"`` (the readable oracle),
``"triton"`` (``normkit.kernels``, on request until a GPU run has measured them). ``NORMKIT_BACKEND`` or a
``backend=`` argument forces one; a forced ``"triton"`` falls back to ``"cpu"`` for calls the kernels do not take
(see ``docs/kernels.md``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import torch
import torch.autograd.forward_ad as _forward_ad

from .. import kernels

BACKENDS = ("reference", "cpu", "triton")

# Where normkit's composition (_compose: a corrected two-pass statistics pass over contiguous planes, then ATen's
# per-channel multiply-add) may replace ATen's training forward on the "cpu" backend; its backward is always ATen's.
# Measured side by side with `python benchmarks/bench_batchnorm.py --passes` on the 2-core CI machine (BENCHMARKS.md):
# it was 1.55x ATen's pass on 56x56 planes on 2026-11-27, but on 2026-12-03 it at best tied ATen there (four runs:
# 0.65-1.00x forward, 0.80-1.04x forward+backward) and lost on every smaller plane (0.66-0.94x). So ATen
# runs every row by default; set CPU_PLAN["planes"] = "compose" to take the composition on planes of at least
# SHORT_PLANE values (it is tested on every run, through that switch). Everything else (evaluation, backward,
# channels_last "rows", float16/bfloat16/float64) is ATen's, and so is every call under torch.compile, export,
# torch.func, forward-mode AD or tracing: the composition is an eager, CPU, float32 shortcut.
SHORT_PLANE = 2048
CPU_PLAN: dict[str, str] = {"planes": "aten", "short_planes": "aten", "rows": "aten"}


# Which calls on CUDA tensors run normkit's Triton kernels by default, per (op, layout, dtype, size class): "triton"
# only where `bash benchmarks/gpu_check.sh` measured the kernel faster than torch eager and torch.compile for that
# class (the report's suggested plan, committed to BENCHMARKS.md); a key not in the table runs torch's kernels. No
# GPU run has measured the kernels yet, so the table is empty: every CUDA call runs ATen behind normkit's front.
# backend="triton" / NORMKIT_BACKEND=triton opt in regardless. Keys: op in batch_norm_train, batch_norm_eval,
# batch_norm_act_train, batch_norm_act_eval, group_norm, layer_norm; layout nchw, channels_last, rows; dtype
# float32, float16, bfloat16; size "small" or "large" (at least CUDA_LARGE elements).
CUDA_PLAN: dict[tuple[str, str, str, str], str] = {}
CUDA_LARGE = 2**22
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def cuda_plan_key(op: str, x: torch.Tensor) -> tuple[str, str, str, str]:
    """The CUDA_PLAN key of a call of ``op`` on ``x`` (``(N, C, *)``; 2D inputs and layer norm's rows are "rows")."""
    if x.dim() <= 2 or op == "layer_norm":
        layout = "rows"
    elif not x.is_contiguous() and x.movedim(1, -1).is_contiguous():
        layout = "channels_last"
    else:
        layout = "nchw"
    size = "large" if x.numel() >= CUDA_LARGE else "small"
    return op, layout, _DTYPE_NAMES.get(x.dtype, str(x.dtype).removeprefix("torch.")), size


def planned(op: str | None, x: torch.Tensor) -> bool:
    """Whether CUDA_PLAN sends this call to the Triton kernels (only ever for CUDA tensors)."""
    return bool(CUDA_PLAN) and op is not None and x.device.type == "cuda" and CUDA_PLAN.get(
        cuda_plan_key(op, x)) == "triton"


_ENV_KEY = "NORMKIT_BACKEND"


def requested_by_environment() -> str | None:
    """``$NORMKIT_BACKEND`` (read on every call, so it can change at run time), via the environment's own dict where
    the platform has one: ``os.environ.get`` decodes keys and costs a microsecond per call."""
    if _ENV_DATA is None:
        return os.environ.get(_ENV_KEY)
    value = _ENV_DATA.get(_ENV_KEY_ENCODED)
    return None if value is None else os.environ.decodevalue(value)


_ENV_DATA = getattr(os.environ, "_data", None)  # the same dict object for the life of the process
_ENV_KEY_ENCODED = os.environ.encodekey(_ENV_KEY) if hasattr(os.environ, "encodekey") else _ENV_KEY


def backend_for(x: torch.Tensor, requested: str | None = None, *,
                refusal: Callable[[], str | None] | None = None, op: str | None = None) -> str:
    """The backend for one call: ``requested``, else ``$NORMKIT_BACKEND``, else ``"triton"`` where ``CUDA_PLAN``
    has measured the kernels faster for ``op`` on this kind of CUDA call, else ``"cpu"``.

    ``"cpu"`` is torch's own ATen ops behind normkit's front and runs on every device, CUDA included: normkit's
    Triton kernels are correct under Triton's interpreter but have not been measured on a GPU yet, so until a GPU
    run shows a case faster (issue 13's ``CUDA_PLAN``) they run only when asked for, ``backend="triton"`` or
    ``NORMKIT_BACKEND=triton``. ``refusal()`` says why the kernels would not take a call (``None``: they take it;
    by default the batch-norm kernels' answer :func:`normkit.kernels.supports`); a forced ``"triton"`` needs a
    CUDA tensor, or a CPU one under ``TRITON_INTERPRET=1`` (how the tests run the kernels), and a call the kernels
    refuse (float64, ``"gelu"``, ...) runs ``"cpu"`` instead.

    Examples::

        >>> import torch
        >>> from normkit.functional._dispatch import backend_for
        >>> backend_for(torch.zeros(2, 3)), backend_for(torch.zeros(2, 3, dtype=torch.float64), "reference")
        ('cpu', 'reference')
    """
    name = requested or requested_by_environment()
    if name is None:
        if not planned(op, x):
            return "cpu"
        name = "triton"
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
        refused = refusal if refusal is not None else (lambda: kernels.supports(x))
        if refused() is not None:
            return "cpu"
    return name


def plan_kind(x: torch.Tensor) -> str:
    """The CPU_PLAN row of an ``(N, C, *)`` tensor in torch's memory format: contiguous planes (short or not), or
    channels-innermost rows."""
    if x.dim() > 2 and x.is_contiguous():
        return "short_planes" if math.prod(x.shape[2:]) < SHORT_PLANE else "planes"
    return "rows"


def eager_cpu(x: torch.Tensor) -> bool:
    """Whether this call runs eagerly on a plain CPU tensor: no compiler, exporter or tracer, no ``torch.func``
    transform, no forward-mode AD. Only then may a backend use a custom autograd function or read a value on the
    host (free on CPU); everything else takes ATen's ops, which every transform understands."""
    return (type(x) is torch.Tensor and x.is_cpu and _forward_ad._current_level < 0 and not _is_compiling()
            and _tracing_state() is None and not _functorch_wrapped(x))


_is_compiling, _tracing_state = torch.compiler.is_compiling, torch._C._get_tracing_state
_functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor


def composes_training(x: torch.Tensor, nonfinite: str = "skip") -> bool:
    """Whether the "cpu" backend computes this training call's statistics with normkit's composition. Not under
    ``nonfinite="propagate"``, which promises torch's running statistics even from inf/NaN batches (the
    composition's shifted sums can turn an inf into a NaN)."""
    if CPU_PLAN["planes"] != "compose" and CPU_PLAN["short_planes"] != "compose":  # the default: nothing to decide
        return False
    return (x.dtype == torch.float32 and nonfinite != "propagate" and CPU_PLAN[plan_kind(x)] == "compose"
            and eager_cpu(x))


def params_refusal(x: torch.Tensor, *params: torch.Tensor | None) -> str | None:
    """Why a kernel cannot take this call's parameters (on another device than ``x``), or ``None``."""
    if any(t is not None and t.device != x.device for t in params):
        return "parameters on another device than the input"
    return None
