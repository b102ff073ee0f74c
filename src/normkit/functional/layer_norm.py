"""``normkit.functional.layer_norm``: torch's signature and errors; statistics over the trailing dimensions."""

from __future__ import annotations

import numbers

import torch

from .. import kernels
from . import _checks, reference
from ._dispatch import backend_for, params_refusal


def layer_norm(
    input: torch.Tensor,
    normalized_shape: int | list[int] | tuple[int, ...] | torch.Size,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Layer normalization: statistics over the last ``len(normalized_shape)`` dimensions of each sample.

    .. math::
        y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \cdot \gamma + \beta

    Same positional signature, defaults and errors as :func:`torch.nn.functional.layer_norm` (Ba et al., 2016).
    Statistics are two-pass and taken in at least float32.

    Args:
        input: ``(*, *normalized_shape)`` tensor.
        normalized_shape: the trailing shape to normalize over (an int means one dimension).
        weight, bias: elementwise affine parameters of shape ``normalized_shape``, or ``None``. Default: ``None``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        backend: ``"cpu"`` (the default on every device: torch's own op behind normkit's front), ``"triton"``
            (normkit's GPU kernel, ``normkit.kernels.layer_norm``, on request until a GPU run has measured it; calls it
            does not take, e.g. float64, run ``"cpu"``) or ``"reference"`` (the readable composition). Default:
            ``None`` (``$NORMKIT_BACKEND``, else ``"cpu"``).

    Shape:
        - Input: :math:`(*, \text{normalized\_shape})`. Output: same shape and dtype, contiguous (as torch's).

    Examples::

        >>> import torch
        >>> from normkit.functional.layer_norm import layer_norm
        >>> layer_norm(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), 4)
        tensor([[-1.3416, -0.4472,  0.4472,  1.3416]])
    """
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        _checks.require_floating(input, "layer_norm")
    shape = (normalized_shape,) if type(normalized_shape) is int else tuple(normalized_shape)
    k, dim = len(shape), input.dim()
    if k == 0 or dim < k or input.shape[dim - k:] != shape:
        _require_trailing_shape(input, shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.shape != shape:
            raise RuntimeError(
                f"Expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{list(t.shape)} and normalized_shape = {list(shape)}. Pass a {name} of shape {shape}."
            )
    x = input.contiguous()  # torch's layer norm computes on (and returns) a contiguous tensor
    name = backend_for(x, backend, refusal=lambda: params_refusal(x, weight, bias)
                       or kernels.supports_layer_norm(x, shape), op="layer_norm")
    if name == "triton":
        return kernels.layer_norm(x, shape, weight, bias, eps)
    if name == "reference":
        return reference.layer_norm(x, shape, weight, bias, eps)
    return torch.layer_norm(x, shape, weight, bias, eps, torch.backends.cudnn.enabled)


def _require_trailing_shape(input: torch.Tensor, shape: tuple) -> None:
    """torch's errors for a ``normalized_shape`` that is empty, not positive ints, or not the input's trailing
    dimensions."""
    k = len(shape)
    if k == 0 or any(not isinstance(s, numbers.Integral) or s <= 0 for s in shape):
        raise RuntimeError(
            f"Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one positive "
            f"element, but got normalized_shape = {list(shape)}. Pass e.g. normalized_shape={input.shape[-1]}."
        )
    shape = tuple(int(s) for s in shape)
    if input.dim() < k or tuple(input.shape[input.dim() - k:]) != shape:
        raise RuntimeError(
            f"Given normalized_shape={list(shape)}, expected input with shape [*, {', '.join(map(str, shape))}], "
            f"but got input of size{list(input.shape)}. normalized_shape must equal the input's trailing "
            f"dimensions, e.g. normalized_shape={list(input.shape[-k:]) if input.dim() else []}."
        )
