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
    biased ``var`` over ``count`` values, by torch's formula ``(1 - momentum) * running + momentum * batch``
    (a running value that is already inf stays inf, as in torch).

    ``nonfinite="skip"`` keeps the old values of every channel whose batch statistics are not finite (no host
    synchronisation), ``"propagate"`` lets them through (torch's behaviour), ``"raise"`` raises
    ``FloatingPointError`` before anything changes (a host read).
    """
    if count == 0 or running_mean is None:
        return
    if nonfinite == "raise":
        require_finite_statistics(mean, var)
    stored_var = unbiased(var, count) if running_var_mode == "unbiased" else var
    keep = ~(torch.isfinite(mean) & torch.isfinite(var)) if nonfinite == "skip" else None
    move_running(running_mean, running_var, torch.stack((mean, stored_var)), momentum, keep)


def move_running(running_mean: torch.Tensor, running_var: torch.Tensor, batch: torch.Tensor, momentum,
                 keep: torch.Tensor | None = None) -> None:
    """``running = ema(running, batch, momentum)`` for the stacked ``(2, C)`` batch ``(mean, stored variance)``, in
    at least float32 (float16 buffers are rounded once), except the channels where ``keep`` is true."""
    acc = accumulation_dtype(running_mean.dtype)
    old = torch.stack((running_mean, running_var)).to(acc)
    new = ema(old, batch.detach().to(acc), momentum)
    write_running(running_mean, running_var, new if keep is None else torch.where(keep, old, new))


def write_running(running_mean: torch.Tensor, running_var: torch.Tensor, values: torch.Tensor) -> None:
    """Copy the stacked ``(2, C)`` ``values`` into the buffers without bumping their autograd version, as ATen's own
    update does (a graph that saved the buffers, e.g. an earlier call in eval mode, stays valid). Traced by a
    compiler or exporter, where no eager graph holds the buffers, it is a plain in-place copy."""
    values = values.detach()
    if torch.compiler.is_compiling():
        torch._foreach_copy_([running_mean, running_var], [values[0], values[1]])
    else:
        torch._foreach_copy_([running_mean.data, running_var.data], [values[0], values[1]])


def restore_nonfinite_channels(running_mean: torch.Tensor, running_var: torch.Tensor, old: torch.Tensor,
                               save_mean: torch.Tensor, save_invstd: torch.Tensor, nonfinite: str) -> None:
    """After ATen moved the buffers itself (torch's rule), apply normkit's policy to the channels whose batch
    statistics were not finite: ``"skip"`` puts their old values (the stacked ``(2, C)`` ``old``) back, ``"raise"``
    puts every old value back and raises. ATen's ``save_mean``/``save_invstd`` tell the channels apart: a batch
    variance of inf gives ``invstd == 0``, a NaN one NaN."""
    finite = torch.isfinite(save_mean) & torch.isfinite(save_invstd) & (save_invstd > 0)
    if nonfinite == "raise":
        if not bool(finite.all()):
            write_running(running_mean, running_var, old)
            require_finite_channels(finite)
        return
    write_running(running_mean, running_var, torch.where(finite, torch.stack((running_mean, running_var)), old))


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
    "move_running",
    "require_finite_channels",
    "require_finite_statistics",
    "restore_nonfinite_channels",
    "unbiased",
    "update_running_stats",
    "write_running",
]
