"""``normkit.functional.ghost_batch_norm``: batch normalization over ghost (virtual) batches (Hoffer et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import _checks, _layout, _stats, reference
from .batch_norm import batch_norm

GROUPINGS = ("contiguous", "strided")


def require_virtual_batch_size(virtual_batch_size) -> int:
    """Return ``virtual_batch_size`` if it is a positive int, else raise a ``ValueError`` that names the fix."""
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, int) or virtual_batch_size <= 0:
        raise ValueError(
            f"virtual_batch_size must be a positive int (the number of samples per ghost batch), got "
            f"{virtual_batch_size!r}. Pass e.g. virtual_batch_size=32; virtual_batch_size equal to the batch size "
            "is plain batch norm."
        )
    return virtual_batch_size


def ghost_batch_sizes(batch: int, virtual_batch_size: int, grouping: str) -> list[int]:
    """The sizes of the ghost batches a batch of ``batch`` samples is split into (raises if ``strided`` cannot)."""
    if virtual_batch_size >= batch and grouping == "contiguous":
        return [batch]
    if grouping == "strided" and batch % virtual_batch_size:
        raise ValueError(
            f"ghost_batch_norm: grouping='strided' needs a batch size divisible by virtual_batch_size (tf.keras "
            f"reshapes the batch to (virtual_batch_size, -1, ...)); got batch size {batch} and virtual_batch_size "
            f"{virtual_batch_size}. Use a batch size that is a multiple of {virtual_batch_size}, or "
            "grouping='contiguous' (the last ghost batch is then smaller)."
        )
    sizes = [virtual_batch_size] * (batch // virtual_batch_size)
    return sizes + [batch % virtual_batch_size] if batch % virtual_batch_size else sizes


def ghost_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    virtual_batch_size: int,
    grouping: str = "contiguous",
    running_var_mode: str = "unbiased",
    nonfinite: str = "skip",
    backend: str | None = None,
) -> torch.Tensor:
    r"""Ghost batch normalization: each ghost batch of ``virtual_batch_size`` samples is normalized by its own
    statistics.

    .. math::
        y_i = \frac{x_i - \mathrm{E}_{g(i)}[x]}{\sqrt{\mathrm{Var}_{g(i)}[x] + \epsilon}} \cdot \gamma + \beta

    where :math:`g(i)` is the ghost batch of sample :math:`i` (statistics over its samples and every
    non-channel dimension, biased variance). ``grouping="contiguous"`` (Hoffer et al.'s code, ``input.chunk``):
    ghost batch :math:`g` is samples :math:`gV, \dots, gV+V-1`, the running statistics take one EMA step per ghost
    batch, in order, and a batch that :math:`V` does not divide ends with a smaller ghost batch.
    ``grouping="strided"`` (tf.keras ``virtual_batch_size``): with :math:`G = N/V` ghost batches, ghost batch
    :math:`g` is samples :math:`g, g+G, g+2G, \dots`; the running statistics take ONE step per call towards the
    mean over ghost batches of their means and of their variances (unbiased per ghost batch unless
    ``running_var_mode="biased"``, which is what Keras stores); :math:`V` must divide :math:`N`. In evaluation
    this is :func:`normkit.functional.batch_norm` with the running statistics. ``virtual_batch_size >= N``
    (contiguous) or ``== N`` (strided) is exactly batch norm.

    Args:
        input: ``(N, C, *)`` tensor.
        running_mean, running_var: ``(C,)`` buffers, updated in place when ``training``; may be ``None`` in
            training.
        weight, bias: ``(C,)`` affine parameters :math:`\gamma`, :math:`\beta`, or ``None``. Default: ``None``.
        training: normalize with the ghost batches' statistics and update the running ones. Default: ``False``.
        momentum: EMA factor of each running update (torch convention). Default: ``0.1``.
        eps: added to the variance inside the square root. Default: ``1e-5``.
        virtual_batch_size: samples per ghost batch, a positive int (keyword-only, required).
        grouping: ``"contiguous"`` (default) or ``"strided"``, as above.
        running_var_mode, nonfinite, backend: as in :func:`normkit.functional.batch_norm`.

    Shape:
        - Input: :math:`(N, C, *)`. Output: same shape, dtype and memory format.

    A call that raises (bad argument, a ghost batch with a single value per channel, ``nonfinite="raise"``)
    leaves the running statistics unchanged.

    Examples::

        >>> import torch
        >>> from normkit.functional.ghost_batch_norm import ghost_batch_norm
        >>> x = torch.tensor([[0.0], [10.0], [2.0], [12.0]])
        >>> rm, rv = torch.zeros(1), torch.ones(1)
        >>> ghost_batch_norm(x, rm, rv, training=True, momentum=1.0, eps=1e-3, virtual_batch_size=2,
        ...                  grouping="strided", running_var_mode="biased").flatten()
        tensor([-0.9995, -0.9995,  0.9995,  0.9995])
        >>> rm, rv
        (tensor([6.]), tensor([1.]))
    """
    return _ghost_batch_norm(input, running_mean, running_var, weight, bias, training, momentum, eps,
                             virtual_batch_size, grouping, running_var_mode, nonfinite, backend)


def _ghost_batch_norm(input, running_mean, running_var, weight, bias, training, momentum: float | Sequence[float],
                      eps, virtual_batch_size, grouping, running_var_mode, nonfinite, backend) -> torch.Tensor:
    """The op; ``momentum`` may be one factor per running update (the modules' ``momentum=None`` average)."""
    require_virtual_batch_size(virtual_batch_size)
    _checks.choice("grouping", grouping, GROUPINGS)
    momenta = momentum if isinstance(momentum, (list, tuple)) else None
    first = float(momenta[0]) if momenta else momentum
    channel, first, eps = _checks.validate_batch_norm(input, running_mean, running_var, weight, bias, training, first,
                                                      eps, running_var_mode, 1, nonfinite)
    if not training:
        return batch_norm(input, running_mean, running_var, weight, bias, False, first, eps,
                          running_var_mode=running_var_mode, nonfinite=nonfinite, backend=backend)
    batch = input.shape[0]
    sizes = ghost_batch_sizes(batch, virtual_batch_size, grouping)
    per_sample = _checks.values_per_channel(input, channel) // max(batch, 1)
    if len(sizes) > 1 and min(sizes) * per_sample == 1:
        raise ValueError(
            f"ghost_batch_norm: a ghost batch of {min(sizes)} sample(s) of input size {tuple(input.shape)} has a "
            f"single value per channel, whose statistics are undefined (batch size {batch}, virtual_batch_size "
            f"{virtual_batch_size}). Use a batch size that leaves no ghost batch of one sample, or a larger "
            "virtual_batch_size."
        )
    updates = len(sizes) if grouping == "contiguous" else 1
    if momenta is None:
        momenta = [momentum] * updates
    elif len(momenta) != updates:
        raise ValueError(f"ghost_batch_norm: expected {updates} momentum factors (one per running update), got "
                         f"{len(momenta)}.")
    if len(sizes) <= 1:  # one ghost batch (or an empty batch): exactly batch norm
        return batch_norm(input, running_mean, running_var, weight, bias, True, float(momenta[0]), eps,
                          running_var_mode=running_var_mode, nonfinite=nonfinite, backend=backend)
    if grouping == "contiguous":
        return _contiguous(input, running_mean, running_var, weight, bias, momenta, eps, sizes, running_var_mode,
                           nonfinite, backend)
    return _strided(input, running_mean, running_var, weight, bias, float(momenta[0]), eps, len(sizes),
                    running_var_mode, nonfinite, backend)


def _contiguous(input, running_mean, running_var, weight, bias, momenta, eps, sizes, running_var_mode, nonfinite,
                backend) -> torch.Tensor:
    # Work on copies of the buffers so that a ghost batch failing half-way (nonfinite="raise") changes nothing.
    tracked = running_mean is not None
    rm = running_mean.clone() if tracked else None
    rv = running_var.clone() if tracked else None
    outputs = [batch_norm(piece, rm, rv, weight, bias, True, float(factor), eps, running_var_mode=running_var_mode,
                          nonfinite=nonfinite, backend=backend)
               for piece, factor in zip(input.split(sizes), momenta, strict=True)]
    output = _keep_format(torch.cat(outputs), input)  # cat, not slice assignment: its backward is a cheap split
    if tracked:
        with torch.no_grad():
            running_mean.copy_(rm)
            running_var.copy_(rv)
    return output


def _strided(input, running_mean, running_var, weight, bias, momentum, eps, ghosts, running_var_mode, nonfinite,
             backend) -> torch.Tensor:
    size, rest = input.shape[0] // ghosts, input.shape[1:]
    # ghost batch g is samples g, g + G, g + 2G, ...: one copy puts each ghost batch in consecutive rows
    ghost_major = input.reshape(size, ghosts, *rest).transpose(0, 1).reshape(input.shape)
    pieces = ghost_major.split(size)
    if running_mean is not None:
        with torch.no_grad():
            moments = [reference.batch_moments(p, 1) for p in pieces]
            mean = torch.stack([m for m, _ in moments]).mean(0)
            var = torch.stack([v for _, v in moments]).mean(0)  # every ghost batch has the same count
    outputs = [batch_norm(piece, None, None, weight, bias, True, momentum, eps, running_var_mode=running_var_mode,
                          nonfinite="propagate", backend=backend) for piece in pieces]
    # back from ghost-major (G, V, C, ...) to the batch order (V, G, C, ...): row i * G + g is sample i of ghost g
    output = torch.cat(outputs).reshape(ghosts, size, *rest).transpose(0, 1).reshape(input.shape)
    output = _keep_format(output, input)
    if running_mean is not None:
        with torch.no_grad():
            count = _checks.values_per_channel(pieces[0], 1)
            _stats.update_running_stats(running_mean, running_var, mean, var, count, momentum, running_var_mode,
                                        nonfinite)
    return output


def _keep_format(output: torch.Tensor, input: torch.Tensor) -> torch.Tensor:
    """``output`` in torch's batch-norm output format for ``input`` (channels_last stays channels_last)."""
    return output.contiguous(memory_format=_layout.suggest_memory_format(input))


__all__ = ["GROUPINGS", "ghost_batch_norm", "ghost_batch_sizes", "require_virtual_batch_size"]
