"""``normkit.functional.instance_norm``: torch's signature and errors; statistics per (sample, channel)."""

from __future__ import annotations

import math

import torch

from . import _checks, _stats, reference
from ._dispatch import backend_for


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
    ``use_input_stats`` the running statistics normalize. The output is contiguous, as torch's.

    Args:
        input: ``(N, C, *)`` tensor.
        running_mean, running_var: ``(C,)`` buffers or ``None``. Default: ``None``.
        weight, bias: ``(C,)`` affine parameters :math:`\gamma`, :math:`\beta`, or ``None``. Default: ``None``.
        use_input_stats: normalize with each instance's statistics. Default: ``True``.
        momentum: EMA factor of the running update (torch convention). Default: ``0.1``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        backend: ``"cpu"`` (default: torch's ops; without running statistics ATen's group norm with one group per
            channel, which measured faster than torch's batch-norm route) or ``"reference"`` (the composition).

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape and dtype, contiguous (as torch's).

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
    c = input.shape[1]
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
    if use_input_stats and running_mean is not None:
        momentum = _checks.require_momentum(momentum)
    eps = eps if type(eps) is float else _checks.as_float("eps", eps)
    x = input.contiguous()  # torch's instance norm computes on (and returns) a contiguous tensor
    if backend_for(x, backend, refusal=lambda: "no instance-norm kernel") == "reference":
        if not use_input_stats:
            return reference.normalize(x, 1, running_mean, running_var, weight, bias, eps)
        _update_running_stats(x, running_mean, running_var, momentum)
        return reference.group_norm(x, c, weight, bias, eps)
    if use_input_stats and (running_mean is None or x.dtype in _checks.LOW_PRECISION):
        _update_running_stats(x, running_mean, running_var, momentum)
        # ATen's group norm with one channel per group: faster than torch's batch-norm route
        return torch.group_norm(x, c, weight, bias, eps, torch.backends.cudnn.enabled)
    return torch.instance_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps,
                               torch.backends.cudnn.enabled)


def _update_running_stats(x, running_mean, running_var, momentum) -> None:
    """torch's running update, with the statistics in at least float32: each instance's mean and unbiased variance,
    averaged over the batch, then ``(1 - momentum) * running + momentum * batch``."""
    if running_mean is None or x.numel() == 0:
        return
    n, c = x.shape[0], x.shape[1]
    mean, var = reference.batch_moments(x.detach().reshape(1, n * c, -1), 1)
    batch = torch.stack((mean.view(n, c).mean(0), _stats.unbiased(var, x[0, 0].numel()).view(n, c).mean(0)))
    _stats.move_running(running_mean, running_var, batch, momentum)
