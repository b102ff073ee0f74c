"""Validation shared by every op. Each error names what was expected, what came, and the fix.

Where torch raises for the same mistake, the message starts with torch's own wording so that code written
against ``torch.nn`` (and people searching for the message) keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def choice(name: str, value, options: Sequence):
    """Return ``value`` if it is one of ``options``, else raise a ``ValueError`` that lists them."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}.")
    return value


def require_tensor(x, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected input to be a torch.Tensor, got {type(x).__name__}.")


def require_floating(x: torch.Tensor, op: str) -> None:
    require_tensor(x, op)
    if not x.is_floating_point():
        raise TypeError(
            f"{op}: expected a floating-point input (float16, bfloat16, float32 or float64), got {x.dtype}. "
            "Convert it first, e.g. input.float()."
        )


def channel_index(x: torch.Tensor, channel_dim: int, op: str) -> int:
    """The non-negative index of the channel dimension; the input needs a batch dimension besides it."""
    if x.dim() < 2:
        raise ValueError(
            f"{op}: expected an input with a batch and a channel dimension (at least 2D), got {x.dim()}D input "
            f"of shape {tuple(x.shape)}. Add a batch dimension, e.g. input.unsqueeze(0)."
        )
    if not isinstance(channel_dim, int) or not -x.dim() <= channel_dim < x.dim():
        raise ValueError(
            f"{op}: channel_dim must be an int in [{-x.dim()}, {x.dim() - 1}] for a {x.dim()}D input, "
            f"got {channel_dim!r}."
        )
    index = channel_dim % x.dim()
    if index == 0:
        raise ValueError(
            f"{op}: channel_dim={channel_dim} points at the batch dimension (dim 0); the channels must be another "
            "dimension, e.g. channel_dim=1 for (N, C, *) or channel_dim=-1 for (N, *, C)."
        )
    return index


def values_per_channel(x: torch.Tensor, channel: int) -> int:
    return math.prod([size for dim, size in enumerate(x.shape) if dim != channel])


def require_more_than_one_value_per_channel(x: torch.Tensor, channel: int) -> None:
    if values_per_channel(x, channel) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {x.size()}; "
            "batch statistics of a single value are undefined. Use a batch of 2 or more, call .eval(), "
            "or use a batch-independent norm such as torch.nn.GroupNorm."
        )


def require_eps(eps: float, training: bool) -> None:
    if training and not eps > 0:
        raise ValueError(
            f"batch_norm eps must be positive during training, but got {eps}. "
            "Use a small positive value such as 1e-5 (torch) or 1e-3 (Keras)."
        )
    if not eps >= 0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}. Use e.g. 1e-5.")


def require_momentum(momentum) -> None:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0:
        raise ValueError(
            f"batch_norm momentum must be a number in [0, 1] (torch convention: running = (1 - momentum) * running "
            f"+ momentum * batch), got {momentum!r}. A Keras momentum m converts to 1 - m "
            "(normkit.compat.momentum_from_keras)."
        )


def require_per_channel(name: str, t: torch.Tensor | None, channels: int, x: torch.Tensor) -> None:
    """A weight, bias or running statistic must hold one value per channel and live on the input's device."""
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}.")
    if t.numel() != channels:
        raise RuntimeError(
            f"{name} should contain {channels} elements not {t.numel()}: the input has {channels} channels "
            f"(shape {tuple(x.shape)}). Build the layer with num_features={channels}, or check which dimension "
            "holds the channels."
        )
    if t.device != x.device:
        raise RuntimeError(
            f"Expected all tensors to be on the same device, but {name} is on {t.device} and the input is on "
            f"{x.device}. Move the module or the tensors with .to({str(x.device)!r})."
        )


def require_compatible_dtypes(x: torch.Tensor, **tensors: torch.Tensor | None) -> None:
    """Parameters and statistics share one dtype: the input's, or float32 under a float16/bfloat16 input."""
    given = {name: t.dtype for name, t in tensors.items() if t is not None}
    if not given:
        return
    dtypes = set(given.values())
    allowed = {x.dtype, torch.float32} if x.dtype in LOW_PRECISION else {x.dtype}
    if len(dtypes) == 1 and dtypes <= allowed:
        return
    listed = ", ".join(f"{name}: {dtype}" for name, dtype in given.items())
    expected = f"{x.dtype} (or float32)" if x.dtype in LOW_PRECISION else str(x.dtype)
    raise RuntimeError(
        f"mixed dtype (CPU): all inputs must share same datatype. Expected parameters and running statistics of "
        f"dtype {expected} for a {x.dtype} input, got {listed}. Convert the module with "
        f".to({x.dtype}) or the input with .to({next(iter(dtypes))})."
    )
