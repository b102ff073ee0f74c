"""``normkit.functional.batch_renorm``: Batch Renormalization (Ioffe 2017), torch and Keras 3 conventions."""

from __future__ import annotations

import math

import torch

from . import _checks, _stats, reference
from ._snapshot import snapshot
from .batch_norm import batch_norm, train_with_statistics


def check_bounds(rmax, dmax, op: str = "batch_renorm") -> None:
    """``rmax >= 1`` and ``dmax >= 0`` (``inf`` allowed: no clipping), else a ``ValueError`` naming the fix. 0-dim
    tensors (a module's schedule under torch.compile, from bounds it validated when built) pass as they are."""
    if isinstance(rmax, torch.Tensor) or isinstance(dmax, torch.Tensor):
        return
    if isinstance(rmax, bool) or not isinstance(rmax, (int, float)) or not rmax >= 1:
        raise ValueError(
            f"{op}: rmax must be a number >= 1 (r is clipped to [1/rmax, rmax]; rmax=1 forces r=1), got {rmax!r}. "
            "The paper's final value is 3."
        )
    if isinstance(dmax, bool) or not isinstance(dmax, (int, float)) or not dmax >= 0:
        raise ValueError(
            f"{op}: dmax must be a number >= 0 (d is clipped to [-dmax, dmax]; dmax=0 forces d=0), got {dmax!r}. "
            "The paper's final value is 5."
        )


def batch_renorm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    rmax: float = 3.0,
    dmax: float = 5.0,
    running_var_mode: str = "unbiased",
    channel_dim: int = 1,
    nonfinite: str = "skip",
) -> torch.Tensor:
    r"""Batch renormalization: the batch-normalized input corrected towards the running statistics.

    .. math::
        \sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon},\quad \sigma = \sqrt{\text{running\_var} + \epsilon},\quad
        r = \mathrm{sg}\Big(\mathrm{clip}_{[1/r_{max},\, r_{max}]}\frac{\sigma_B}{\sigma}\Big),\quad
        d = \mathrm{sg}\Big(\mathrm{clip}_{[-d_{max},\, d_{max}]}\frac{\mu_B - \text{running\_mean}}{\sigma}\Big),
        \quad y = \Big(\frac{x - \mu_B}{\sigma_B}\, r + d\Big)\gamma + \beta

    ``sg`` is stop-gradient. ``r`` and ``d`` use the running statistics *before* this call's update, which is
    then :func:`normkit.functional.batch_norm`'s (torch convention). In evaluation, and in training without
    running statistics (``r = 1``, ``d = 0``), this is :func:`normkit.functional.batch_norm`. The warm-up schedule
    of the clipping bounds lives in :class:`normkit.nn.batch_renorm.BatchRenorm2d`; here ``rmax``/``dmax`` are the
    bounds of this call.

    Args:
        input, running_mean, running_var, weight, bias, training, momentum, eps, running_var_mode, channel_dim,
            nonfinite: as :func:`normkit.functional.batch_norm` (defaults ``None``, ``None``, ``False``, ``0.1``,
            ``1e-5``, ``"unbiased"``, ``1``, ``"skip"``).
        rmax: ``r`` is clipped to ``[1/rmax, rmax]``; ``>= 1``, ``inf`` for no clipping. Default: ``3.0``.
        dmax: ``d`` is clipped to ``[-dmax, dmax]``; ``>= 0``, ``inf`` for no clipping. Default: ``5.0``.

    Shape:
        - Input: :math:`(N, C, *)` (or channels at ``channel_dim``). Output: same shape and dtype.

    Examples::

        >>> import torch
        >>> from normkit.functional.batch_renorm import batch_renorm
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> batch_renorm(x, rm, rv, training=True, rmax=1.0, dmax=0.0).flatten()  # exactly batch norm
        tensor([-1.3416, -0.4472,  0.4472,  1.3416])
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> batch_renorm(x, rm, rv, training=True, rmax=float("inf"), dmax=float("inf")).flatten()
        tensor([1.0000, 2.0000, 3.0000, 4.0000])
    """
    check_bounds(rmax, dmax)
    channel, momentum, eps = _checks.validate_batch_norm(input, running_mean, running_var, weight, bias, training,
                                                         momentum, eps, running_var_mode, channel_dim, nonfinite)
    if not training or running_mean is None or input.numel() == 0:
        return batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                          running_var_mode=running_var_mode, channel_dim=channel_dim, nonfinite=nonfinite)
    y, mean, var = train_with_statistics(input, channel, weight, bias, eps)
    with torch.no_grad():  # r and d: constants of this step, from the running statistics before the update
        sigma = torch.sqrt(snapshot(running_var, mean.dtype) + eps)
        r = (torch.sqrt(var + eps) / sigma).clamp(1.0 / rmax, rmax)
        d = ((mean - snapshot(running_mean, mean.dtype)) / sigma).clamp(-dmax, dmax)
        _stats.update_running_stats(running_mean, running_var, mean, var, input.numel() // input.shape[channel],
                                    momentum, running_var_mode, nonfinite)
    return _correct(y, r, d, weight, bias, channel)


def _correct(y, r, d, weight, bias, channel):
    r"""From the batch-norm output :math:`y = \hat x\gamma + \beta` to :math:`(\hat x r + d)\gamma + \beta =
    y r + d\gamma + \beta (1 - r)`; one extra pass, and the gradient reaches :math:`\gamma`, :math:`\beta`
    through both terms. ``r = 1, d = 0`` gives ``y`` back bit for bit."""
    shift = d if weight is None else d * weight.to(d.dtype)
    if bias is not None:
        shift = shift + bias.to(d.dtype) * (1 - r)
    shape = reference.per_channel_shape(y, channel)
    if y.dtype == r.dtype:
        return torch.addcmul(shift.view(shape), y, r.view(shape))
    return torch.addcmul(shift.view(shape), y.to(r.dtype), r.view(shape)).to(y.dtype)


def batch_renorm_keras(
    input: torch.Tensor,
    moving_mean: torch.Tensor,
    moving_variance: torch.Tensor,
    moving_stddev: torch.Tensor,
    renorm_mean: torch.Tensor,
    renorm_stddev: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.01,
    renorm_momentum: float = 0.01,
    eps: float = 1e-3,
    *,
    rmin: float = 0.0,
    rmax: float = math.inf,
    dmax: float = math.inf,
    channel_dim: int = 1,
) -> torch.Tensor:
    r"""Keras 3's ``BatchNormalization(renorm=True)`` step, number for number.

    .. math::
        \sigma_B = \sqrt{\mathrm{Var}_B[x] + \epsilon},\quad \sigma = \max(\text{renorm\_stddev}, \sqrt\epsilon),
        \quad r = \mathrm{clip}_{[r_{min}, r_{max}]}\frac{\sigma_B}{\sigma},\quad
        d = \mathrm{clip}_{[-d_{max}, d_{max}]}\frac{\mu_B - \text{renorm\_mean}}{\sigma}

    and :math:`y = \frac{x - \mu_B}{\sigma_B}(r\gamma) + (d\gamma + \beta)` with stop-gradient on ``r``, ``d``.
    Then, in place: ``renorm_mean``/``renorm_stddev`` move towards :math:`\mu_B`/:math:`\sigma_B` with
    ``renorm_momentum``, ``moving_mean``/``moving_stddev`` with ``momentum``, and
    ``moving_variance = relu(moving_stddev**2 - eps)``. Evaluation normalizes with ``moving_mean`` and
    ``moving_variance``. Momenta are in torch's convention: a Keras momentum ``m`` is ``1 - m`` here (Keras's
    default ``0.99`` is ``0.01``); Keras's missing ``renorm_clipping`` keys are ``rmin=0``, ``rmax=dmax=inf``.

    Args:
        input: ``(N, C, *)`` tensor (or channels at ``channel_dim``).
        moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev: ``(C,)`` buffers, updated in place
            in training (Keras initializes them to 0, 1, 1, 0, 1).
        weight, bias: :math:`\gamma`, :math:`\beta` or ``None``. Default: ``None``.
        training: Default: ``False``. momentum, renorm_momentum: Default: ``0.01``. eps: Default: ``1e-3``.
        rmin, rmax, dmax: clipping bounds. Default: ``0``, ``inf``, ``inf``.
        channel_dim: Default: ``1``.

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape and dtype.

    Examples::

        >>> import torch
        >>> from normkit.functional.batch_renorm import batch_renorm_keras
        >>> x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
        >>> mm, mv, ms, rm, rs = torch.zeros(1), torch.ones(1), torch.ones(1), torch.zeros(1), torch.ones(1)
        >>> batch_renorm_keras(x, mm, mv, ms, rm, rs, training=True, rmin=1 / 3, rmax=3.0, dmax=5.0).flatten()
        tensor([1.0000, 2.0000, 3.0000, 4.0000])
        >>> ms, mv, mm
        (tensor([1.0012]), tensor([1.0014]), tensor([0.0250]))
    """
    traced = any(isinstance(t, torch.Tensor) for t in (rmin, rmax, dmax))
    check_bounds(rmax if traced else max(rmax, 1.0), dmax, "batch_renorm_keras")
    if not traced and not 0 <= rmin <= rmax:
        raise ValueError(f"batch_renorm_keras: need 0 <= rmin <= rmax, got rmin={rmin!r}, rmax={rmax!r}.")
    channel, momentum, eps = _checks.validate_batch_norm(input, moving_mean, moving_variance, weight, bias, training,
                                                         momentum, eps, "biased", channel_dim, "propagate")
    for name, t in (("moving_stddev", moving_stddev), ("renorm_mean", renorm_mean),
                    ("renorm_stddev", renorm_stddev)):
        if not isinstance(t, torch.Tensor) or t.shape != moving_mean.shape or t.dtype != moving_mean.dtype:
            raise ValueError(f"batch_renorm_keras: {name} must be a tensor like moving_mean "
                             f"({tuple(moving_mean.shape)}, {moving_mean.dtype}), got {t!r}.")
    if type(renorm_momentum) is not float or not 0.0 <= renorm_momentum <= 1.0:
        raise ValueError(f"batch_renorm_keras: renorm_momentum must be a float in [0, 1] (torch convention), "
                         f"got {renorm_momentum!r}.")
    if not training or input.numel() == 0:
        return batch_norm(input, moving_mean, moving_variance, weight, bias, training, momentum, eps,
                          running_var_mode="biased", channel_dim=channel_dim, nonfinite="propagate")
    y, mean, var = train_with_statistics(input, channel, weight, bias, eps)
    with torch.no_grad():
        acc = mean.dtype
        stddev = torch.sqrt(var + eps)
        sigma = torch.clamp_min(snapshot(renorm_stddev, acc), math.sqrt(eps))
        r = (stddev / sigma).clamp(rmin, rmax)
        d = ((mean - snapshot(renorm_mean, acc)) / sigma).clamp(-dmax, dmax)
        dtype = moving_mean.dtype
        torch._foreach_lerp_([renorm_mean, renorm_stddev], [mean.to(dtype), stddev.to(dtype)],
                             renorm_momentum)
        torch._foreach_lerp_([moving_mean, moving_stddev], [mean.to(dtype), stddev.to(dtype)], momentum)
        moving_variance.copy_(torch.relu(moving_stddev * moving_stddev - eps))
    return _correct(y, r, d, weight, bias, channel)


__all__ = ["batch_renorm", "batch_renorm_keras"]
