"""``normkit.functional.instance_norm``: torch's signature and errors; statistics per (sample, channel)."""

from __future__ import annotations

import math

import torch

from . import _checks
from ._rownorm import Spec, moments, run
from ._stats import accumulation_dtype


def instance_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    use_input_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    backend: str | None = None,
) -> torch.Tensor:
    r"""Instance normalization: statistics over the positions of each (sample, channel) plane.

    .. math::
        y = \frac{x - \mathrm{E}_{hw}[x]}{\sqrt{\mathrm{Var}_{hw}[x] + \epsilon}} \cdot \gamma + \beta

    Same positional signature, defaults and errors as :func:`torch.nn.functional.instance_norm` (Ulyanov et al.,
    2016). With ``use_input_stats`` and running statistics given, they move in place as torch moves them: each
    instance's EMA update, averaged over the batch, i.e.
    ``running = (1 - momentum) * running + momentum * mean_n(stat_n)`` (unbiased variance per instance). Without
    ``use_input_stats`` the running statistics normalize. A channels_last input gives a channels_last output.

    Args:
        input: ``(N, C, *)`` tensor.
        running_mean, running_var: ``(C,)`` buffers or ``None``. Default: ``None``.
        weight, bias: ``(C,)`` affine parameters :math:`\gamma`, :math:`\beta`, or ``None``. Default: ``None``.
        use_input_stats: normalize with each instance's statistics. Default: ``True``.
        momentum: EMA factor of the running update (torch convention). Default: ``0.1``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        backend: ``"cpu"`` (default: the fastest measured path) or ``"reference"`` (the composition).

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape, dtype and memory format.

    Examples::

        >>> import torch
        >>> from normkit.functional.instance_norm import instance_norm
        >>> x = torch.tensor([[[1.0, 3.0], [0.0, 10.0]]])
        >>> rm, rv = torch.zeros(2), torch.ones(2)
        >>> instance_norm(x, rm, rv)
        tensor([[[-1.0000,  1.0000],
                 [-1.0000,  1.0000]]])
        >>> rm, rv
        (tensor([0.2000, 0.5000]), tensor([1.1000, 5.9000]))
    """
    _checks.require_floating(input, "instance_norm")
    if input.dim() < 2:
        raise ValueError(
            f"instance_norm: expected an (N, C, *) input (at least 2D), got {input.dim()}D input of shape "
            f"{tuple(input.shape)}. Add a batch dimension, e.g. input.unsqueeze(0)."
        )
    n, c = input.shape[0], input.shape[1]
    spatial = math.prod(input.shape[2:])
    if use_input_stats and spatial == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when training, got input size {input.size()}; the statistics "
            "of one position are undefined. Use an input with more than one position, or a batch norm."
        )
    if (running_mean is None) != (running_var is None):
        raise ValueError("instance_norm: pass both running_mean and running_var, or neither.")
    if not use_input_stats and running_mean is None:
        raise RuntimeError(
            "Expected running_mean and running_var to be defined when use_input_stats is false; pass them, or "
            "use_input_stats=True to normalize with each instance's statistics."
        )
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight),
                    ("bias", bias)):
        if t is not None and t.numel() != c:
            raise RuntimeError(
                f"instance_norm: expected {name} to have {c} elements (one per channel of the input of shape "
                f"{tuple(input.shape)}), got shape {tuple(t.shape)}. Check num_features against the input's "
                "dimension 1."
            )
    if use_input_stats and running_mean is not None and (
            isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"instance_norm: momentum must be a number in [0, 1] (running = (1 - momentum) * running + momentum * "
            f"batch), got {momentum!r}. torch's InstanceNorm passes 0.0 for momentum=None."
        )
    rest = tuple(input.shape[2:])
    spec = Spec("instance_norm", (n, c, *rest), tuple(range(2, input.dim())), (1, c) + (1,) * len(rest), (c,), c)
    if not use_input_stats:
        acc = accumulation_dtype(input.dtype)
        stat_shape = (1, c) + (1,) * len(rest)
        mean = running_mean.detach().to(acc, copy=True).reshape(stat_shape)
        rstd = torch.rsqrt(running_var.detach().to(acc) + eps).reshape(stat_shape)
        return run(input, weight, bias, spec, eps, mean, rstd, backend=backend)[0]
    output, mean, rstd = run(input, weight, bias, spec, eps, backend=backend)
    if running_mean is not None and input.numel() > 0:
        with torch.no_grad():
            if mean.dtype in _checks.LOW_PRECISION:  # ATen's statistics of a half/bf16 call: recompute them
                mean, var = moments(input.detach().view(spec.view), spec.dims)
            else:  # biased, per (n, c), from the float32+ statistics the normalization used
                var = rstd.detach().double().pow(-2).sub(eps).clamp_min(0)
            unbiased = var * (spatial / (spatial - 1))
            batch_mean = mean.detach().reshape(n, c).mean(0)
            batch_var = unbiased.reshape(n, c).mean(0)
            running_mean.mul_(1 - momentum).add_(batch_mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(batch_var.to(running_var.dtype), alpha=momentum)
    return output
