"""Which calls the Triton kernels take (no triton import: the dispatcher asks on every CUDA call).

The checks every kernel shares (triton present, a float32/float16/bfloat16 tensor on CUDA, or on CPU under Triton's
interpreter) are :func:`refusal`; each op adds its own (:func:`supports` for batch norm, ``_group_norm.supports``,
``_layer_norm.supports``).
"""

from __future__ import annotations

import importlib.util
import os

import torch

ACTIVATIONS = (None, "relu", "silu")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_ELEMENTS = 2**31 - 1  # the kernels index with 32-bit integers


_TRITON_INSTALLED: list[bool] = []  # found once (a plain list, not functools.cache: torch.compile traces this)


def triton_installed() -> bool:
    """Whether ``import triton`` would succeed (checked without importing it)."""
    if not _TRITON_INSTALLED:
        _TRITON_INSTALLED.append(importlib.util.find_spec("triton") is not None)
    return _TRITON_INSTALLED[0]


def interpreting() -> bool:
    """Whether Triton runs kernels on the CPU through its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def refusal(x) -> str | None:
    """Why no kernel can take ``x`` (triton missing, not a tensor, dtype, device), or ``None``."""
    if not triton_installed():
        return "triton is not installed"
    if not isinstance(x, torch.Tensor):
        return f"input is a {type(x).__name__}, not a tensor"
    if x.dtype not in DTYPES:
        return f"dtype {x.dtype} (the kernels take float32, float16 and bfloat16)"
    if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting()):
        return f"a tensor on {x.device.type} (the kernels run on CUDA, or on CPU under TRITON_INTERPRET=1)"
    return None


def supports(x: torch.Tensor, activation: str | None = None) -> str | None:
    """``None`` when the batch-norm kernels take this call, else a short reason (for the fallback)."""
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} has no fused kernel (only 'relu', 'silu' or None)"
    reason = refusal(x)
    if reason is not None:
        return reason
    if x.dim() < 2:
        return f"a {x.dim()}D input (the kernels take (N, C, *) or (N, *, C))"
    if x.numel() > MAX_ELEMENTS:
        return f"{x.numel()} elements (the kernels index with 32 bits: at most 2**31 - 1)"
    return None
