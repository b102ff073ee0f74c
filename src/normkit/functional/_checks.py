"""Validation shared by every op. Each error names what was expected, what came, and the fix.

Where torch raises for the same mistake, the message starts with torch's own wording so that code written
against ``torch.nn`` (and people searching for the message) keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)
_TENSOR, _PARAMETER = torch.Tensor, torch.nn.Parameter


def choice(name: str, value, options: Sequence):
    """Return ``value`` if it is one of ``options``, else raise a ``ValueError`` that lists them."""
    if value not in options:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, options))}; got {value!r}.")
    return value


def require_tensor(x, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: expected input to be a torch.Tensor, got {type(x).__name__}.")


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """A non-floating input: a ``TypeError``, and a ``NotImplementedError`` as torch raises for it ("batch_norm" not
    implemented for 'Long'), so code written against either keeps working."""


def require_floating(x: torch.Tensor, op: str) -> None:
    require_tensor(x, op)
    if not x.is_floating_point():
        raise UnsupportedDtypeError(
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


def as_float(name: str, value) -> float:
    """``value`` as a Python float, accepting what torch's argument parser accepts for a ``float`` (Python and numpy
    numbers, bools, one-element tensors); anything else is a ``TypeError`` with torch's wording."""
    if isinstance(value, (str, bytes)) or value is None or (isinstance(value, torch.Tensor) and value.numel() != 1):
        raise TypeError(
            f"batch_norm(): argument '{name}' must be float, not {type(value).__name__}. Pass a number such as "
            f"{'0.1' if name == 'momentum' else '1e-5'}"
            + (" (modules take momentum=None for a cumulative average)." if name == "momentum" else ".")
        )
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"batch_norm(): argument '{name}' must be float, not {type(value).__name__}.") from None


def _traced_factor(momentum) -> bool:
    """A one-element tensor momentum while torch.compile/export traces (a module's ``momentum=None`` average,
    computed from its counter without a host read); eagerly such a tensor is read as a float, as torch does."""
    return isinstance(momentum, torch.Tensor) and momentum.numel() == 1 and torch.compiler.is_compiling()


def require_momentum(momentum) -> float:
    """``momentum`` as a float. torch takes any number here (outside [0, 1] the running update extrapolates), and
    so does normkit; the convention is ``running = (1 - momentum) * running + momentum * batch``."""
    return momentum if type(momentum) is float else as_float("momentum", momentum)


def require_unit_momentum(momentum, op: str) -> float:
    """For normkit's own layers whose math needs an EMA weight: a number in [0, 1]."""
    value = require_momentum(momentum)
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{op}: momentum must be a number in [0, 1] (torch convention: running = (1 - momentum) * running + "
            f"momentum * batch), got {momentum!r}. A Keras momentum m converts to 1 - m "
            "(normkit.compat.momentum_from_keras)."
        )
    return value


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


RUNNING_VAR_MODES = ("unbiased", "biased")
NONFINITE_POLICIES = ("skip", "propagate", "raise")


def validate_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                        running_var_mode, channel_dim, nonfinite) -> tuple[int, float, float]:
    """Every check of a batch-norm call, before anything is computed or changed: ``(channel index, momentum,
    eps)`` as Python ints and floats.

    Accepts exactly what :func:`torch.nn.functional.batch_norm` accepts (any number for ``momentum`` and ``eps``,
    numpy scalars included) and raises torch's error type where torch raises. Written for the common case first
    (it runs on every call): each test is one comparison, and only a failing one builds the message.
    """
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        require_floating(input, "batch_norm")
    channel = 1 if channel_dim == 1 and input.dim() >= 2 else channel_index(input, channel_dim, "batch_norm")
    if running_var_mode not in RUNNING_VAR_MODES:
        choice("running_var_mode", running_var_mode, RUNNING_VAR_MODES)
    if nonfinite not in NONFINITE_POLICIES:
        choice("nonfinite", nonfinite, NONFINITE_POLICIES)
    if type(momentum) is not float and not _traced_factor(momentum):
        momentum = as_float("momentum", momentum)
    if type(eps) is not float:
        eps = as_float("eps", eps)
    if not (eps > 0 if training else eps >= 0):
        require_eps(eps, training)
    channels = input.shape[channel]
    if (running_mean is None) != (running_var is None) or (running_mean is None and not training) or not _fit(
            input, channels, running_mean, running_var, weight, bias):
        _require_per_channel_tensors(input, channels, running_mean, running_var, weight, bias, training)
    if training and input.numel() == channels:
        require_more_than_one_value_per_channel(input, channel)
    return channel, momentum, eps


def _fit(input: torch.Tensor, channels: int, running_mean, running_var, weight, bias) -> bool:
    """The common case in one pass of cheap attribute reads (this runs every call): every given tensor holds one
    value per channel, on the input's device, all in one dtype that is the input's (or float32 under a
    float16/bfloat16 input); the running statistics are 1D and need no gradient."""
    if type(weight) is _PARAMETER and type(bias) is _PARAMETER and type(running_mean) is _TENSOR and type(
            running_var) is _TENSOR:  # a module's call, unrolled: the common case costs one read per property
        dtype = weight.dtype
        if (weight.numel() == bias.numel() == running_mean.numel() == running_var.numel() == channels
                and bias.dtype == running_mean.dtype == running_var.dtype == dtype
                and (input.is_cpu and weight.is_cpu and bias.is_cpu and running_mean.is_cpu and running_var.is_cpu)
                and running_mean.dim() == running_var.dim() == 1
                and not (running_mean.requires_grad or running_var.requires_grad)):
            return dtype == input.dtype or (dtype == torch.float32 and input.dtype in LOW_PRECISION)
    on_cpu = input.is_cpu
    dtype = None
    for t in (running_mean, running_var, weight, bias):
        if t is None:
            continue
        kind = type(t)  # isinstance(t, Tensor) costs 0.2 µs on a Parameter (its metaclass); the exact types first
        if kind is not _TENSOR and kind is not _PARAMETER and not isinstance(t, torch.Tensor):
            return False
        if t.numel() != channels or not (on_cpu and t.is_cpu) and t.device != input.device:
            return False
        if dtype is None:
            dtype = t.dtype
        elif t.dtype != dtype:
            return False
    if running_mean is not None and (running_mean.dim() != 1 or running_var.dim() != 1 or running_mean.requires_grad
                                     or running_var.requires_grad):
        return False
    return dtype is None or dtype == input.dtype or (dtype == torch.float32 and input.dtype in LOW_PRECISION)


def _require_per_channel_tensors(input, channels, running_mean, running_var, weight, bias, training) -> None:
    """The errors behind a failed :func:`_fit`, in torch's order and with torch's types."""
    if not training and (running_mean is None or running_var is None):
        missing = "running_mean" if running_mean is None else "running_var"
        raise RuntimeError(
            f"{missing} must be defined in evaluation mode: with training=False batch_norm normalizes with the "
            "running statistics. Pass both, or training=True to use the batch's statistics."
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must either both be None or neither be None; got "
            f"running_mean={'a tensor' if running_mean is not None else 'None'} and "
            f"running_var={'a tensor' if running_var is not None else 'None'}. Pass both buffers, or neither to "
            "use the batch's statistics without tracking them."
        )
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        require_per_channel(name, t, channels, input)
    require_compatible_dtypes(input, weight=weight, bias=bias, running_mean=running_mean, running_var=running_var)
    if running_mean.dim() != 1 or running_var.dim() != 1:
        raise RuntimeError(
            f"batch_norm: running_mean and running_var must be 1D ({channels},) tensors, got shapes "
            f"{tuple(running_mean.shape)} and {tuple(running_var.shape)}. Flatten them, e.g. "
            "running_mean.view(-1)."
        )
    raise RuntimeError(
        "The function 'native_batch_norm' is not differentiable with respect to argument 'running_mean'. "
        "This input cannot have requires_grad True. Running statistics are buffers: pass "
        "running_mean.detach() / running_var.detach() (or register them with register_buffer)."
    )
