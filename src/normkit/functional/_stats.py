"""Moments and running statistics: the arithmetic every normalization layer shares.

Conventions (DESIGN.md section 3): normalization uses the biased variance; the torch convention stores the
unbiased one, ``var * n / (n - 1)``; the running update is ``(1 - momentum) * running + momentum * batch``.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in at least float32 whatever the input dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def unbiased(var: torch.Tensor, count: int) -> torch.Tensor:
    """Bessel's correction ``var * n / (n - 1)`` of a biased variance over ``count`` values."""
    return var * (count / (count - 1)) if count > 1 else torch.full_like(var, float("nan"))


def ema(running: torch.Tensor, batch: torch.Tensor, momentum: float) -> torch.Tensor:
    """``(1 - momentum) * running + momentum * batch`` (torch's convention)."""
    return (1.0 - momentum) * running + momentum * batch


def cumulative_factor(num_batches_tracked: int) -> float:
    """The EMA factor that turns the running statistics into a plain average over the batches so far."""
    return 1.0 / float(num_batches_tracked)


def merge_moments(
    counts: torch.Tensor, means: torch.Tensor, m2s: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chan et al.'s parallel merge of per-group ``(count, mean, M2)`` along dim 0.

    ``M2`` is the sum of squared deviations from the group's mean. Groups with count 0 drop out. Returns the total
    count, the mean and the M2 of the union, per trailing position (per channel).
    """
    total = counts.sum(0)
    safe_total = total.clamp_min(1)
    weights = counts / safe_total
    mean = (weights * means).sum(0)
    m2 = m2s.sum(0) + (counts * (means - mean) ** 2).sum(0)
    return total, mean, m2


def update_running_stats(
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    mean: torch.Tensor,
    var: torch.Tensor,
    count: int,
    momentum: float,
    running_var_mode: str,
    nonfinite: str,
) -> None:
    """Move the running statistics (both tensors, or both None) in place towards the batch's ``mean`` and
    biased ``var`` over ``count`` values.

    ``nonfinite="skip"`` keeps the old values of every channel whose batch statistics are not finite (no host
    synchronisation), ``"propagate"`` lets them through (torch's behaviour); ``"raise"`` must have been checked
    by the caller before anything changed.
    """
    if count == 0 or running_mean is None:
        return
    stored_var = unbiased(var, count) if running_var_mode == "unbiased" else var
    if nonfinite == "skip":  # a skipped channel moves towards itself: lerp(a, a, m) == a exactly
        finite = torch.isfinite(mean + var)
        mean = torch.where(finite, mean, running_mean)
        stored_var = torch.where(finite, stored_var, running_var)
    torch._foreach_lerp_([running_mean, running_var],
                         [mean.to(running_mean.dtype), stored_var.to(running_var.dtype)], momentum)


def require_finite_statistics(mean: torch.Tensor, var: torch.Tensor) -> None:
    """For ``nonfinite="raise"``: raise before anything changed if a channel's batch statistics are not finite."""
    require_finite_channels(torch.isfinite(mean) & torch.isfinite(var))


def require_finite_channels(finite: torch.Tensor) -> None:
    """Raise ``FloatingPointError`` naming the channels where ``finite`` is false; a host read."""
    if bool(finite.all()):
        return
    channels = (~finite).nonzero().flatten().tolist()
    shown = ", ".join(map(str, channels[:8])) + (", ..." if len(channels) > 8 else "")
    raise FloatingPointError(
        f"batch_norm: the batch statistics of {len(channels)} channel(s) are not finite (channels {shown}); "
        "the running statistics were left unchanged. Find the inf/NaN upstream (e.g. a diverging loss or an "
        "fp16 overflow), or pass nonfinite='skip' to keep training while ignoring such batches."
    )


__all__ = [
    "accumulation_dtype",
    "cumulative_factor",
    "ema",
    "merge_moments",
    "require_finite_channels",
    "require_finite_statistics",
    "unbiased",
    "update_running_stats",
]
