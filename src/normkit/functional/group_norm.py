"""``normkit.functional.group_norm``: torch's signature and errors; statistics per (sample, group of channels)."""

from __future__ import annotations

import math

import torch

from .. import kernels
from . import _checks, reference
from ._dispatch import backend_for, params_refusal
from ._layout import in_torch_format

ACTIVATIONS = (None, "silu", "relu")


def group_norm(
    input: torch.Tensor,
    num_groups: int,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Group normalization: statistics over each sample's group of ``C // num_groups`` channels and all positions.

    .. math::
        y = \mathrm{act}\left(\frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \cdot \gamma
        + \beta\right)

    Same positional signature, defaults and errors as :func:`torch.nn.functional.group_norm` (Wu & He, 2018).
    Statistics are taken in at least float32; the output has torch's memory format (channels_last stays
    channels_last; sliced, transposed or expanded inputs give a contiguous output).
    ``activation`` (keyword-only) follows the affine, as in U-Net blocks (GroupNorm(32) + SiLU): one fused pass
    on the Triton backend, the norm then ``silu``/``relu`` elsewhere.

    Args:
        input: ``(N, C, *)`` tensor.
        num_groups: number of groups; must divide ``C``.
        weight, bias: ``(C,)`` per-channel affine parameters :math:`\gamma`, :math:`\beta`, or ``None``.
            Default: ``None``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        activation: ``None``, ``"silu"`` or ``"relu"``, applied after the affine. Default: ``None``.
        backend: ``"cpu"`` (the default on every device: torch's own op behind normkit's front), ``"triton"``
            (normkit's GPU kernel, ``normkit.kernels.group_norm``, on request until a GPU run has measured it; calls it
            does not take, e.g. float64, run ``"cpu"``) or ``"reference"`` (the readable composition). Default:
            ``None`` (``$NORMKIT_BACKEND``, else ``"cpu"``).

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape, dtype and memory format.

    Examples::

        >>> import torch
        >>> from normkit.functional.group_norm import group_norm
        >>> x = torch.tensor([[[1.0], [3.0], [10.0], [30.0]]])
        >>> group_norm(x, 2).flatten()
        tensor([-1.0000,  1.0000, -1.0000,  1.0000])
        >>> group_norm(x, 2, activation="relu").flatten()
        tensor([0.0000, 1.0000, 0.0000, 1.0000])
    """
    _checks.require_floating(input, "group_norm")
    _checks.choice("activation", activation, ACTIVATIONS)
    if input.dim() < 2:
        raise RuntimeError(
            f"Expected at least 2 dimensions for input tensor but received {input.dim()}; group_norm needs an "
            "(N, C, *) input. Add a batch dimension, e.g. input.unsqueeze(0)."
        )
    n, c = input.shape[0], input.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0:
        raise ValueError(f"group_norm: num_groups must be a positive int, got {num_groups!r}.")
    if c % num_groups != 0:
        raise RuntimeError(
            f"Expected number of channels in input to be divisible by num_groups, but got input of shape "
            f"{list(input.shape)} and num_groups={num_groups}. Pick a num_groups that divides {c} "
            f"(e.g. {math.gcd(c, num_groups)})."
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(
                f"Expected {name} to be a vector of size equal to the number of channels in input, but got {name} "
                f"of shape {list(t.shape)} and input of shape {list(input.shape)}. Pass a ({c},) {name}."
            )
    spatial = math.prod(input.shape[2:])
    if n * c // num_groups * spatial == 1:  # torch's _verify_batch_size([N * C // G, G, *spatial])
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size "
            f"{torch.Size([n * c // num_groups, num_groups, *input.shape[2:]])}; a group of one value has no "
            "variance. Use fewer groups or a larger input."
        )
    x = in_torch_format(input)
    name = backend_for(x, backend, refusal=lambda: params_refusal(x, weight, bias)
                       or kernels.supports_group_norm(x, num_groups, activation), op="group_norm")
    if name == "triton":
        return kernels.group_norm(x, num_groups, weight, bias, eps, activation=activation)
    if name == "reference":
        y = reference.group_norm(x, num_groups, weight, bias, eps)
    else:
        y = torch.group_norm(x, num_groups, weight, bias, eps, torch.backends.cudnn.enabled)
    return reference.activate(y, activation)
