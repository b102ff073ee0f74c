"""``adapt(model, target_data)``: AdaBN — batch-norm statistics of the target domain, nothing else changed."""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from .recalibrate import recalibrate


def adapt(model: nn.Module, target_data: Iterable, *, num_batches: int | None = None,
          estimator: str = "population", progress: bool | None = None) -> nn.Module:
    r"""AdaBN (Li et al. 2016): replace every batch norm's running statistics by those of the target domain.

    .. math::
        \mu_c = \mathrm{E}_{x \sim \mathrm{target}}[x_c], \qquad \sigma^2_c = \mathrm{Var}_{x \sim \mathrm{target}}[x_c]

    for each batch norm's input channel ``c``: :func:`normkit.tools.recalibrate.recalibrate` run on target-domain
    inputs only (labels, if the batches carry them, are ignored). No parameter changes (bit for bit), no gradient
    is taken; only ``running_mean``, ``running_var`` and ``num_batches_tracked`` of the batch norms move, and every
    module's mode and momentum are restored. Call it with unlabeled target data, then evaluate in eval mode.

    Args:
        model: a model trained on the source domain.
        target_data: an iterable of target-domain batches (tensors, or tuples/lists whose first element is the
            input); a tensor alone is one batch.
        num_batches, estimator, progress: as in :func:`normkit.tools.recalibrate.recalibrate`. Default estimator:
            ``"population"``, the exact statistics of the whole target set.

    Returns:
        ``model``, with the target domain's statistics.

    Examples::

        >>> import torch, normkit
        >>> from normkit.tools.adapt import adapt
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), normkit.BatchNorm1d(4)).eval()
        >>> before = [p.clone() for p in model.parameters()]
        >>> target = torch.randn(256, 3) * 2.5 + 1.0
        >>> model = adapt(model, target.split(64))
        >>> all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        True
        >>> out = model(target)
        >>> bool(out.mean(0).abs().max() < 1e-4)
        True
    """
    return recalibrate(model, target_data, num_batches=num_batches, estimator=estimator, progress=progress)


__all__ = ["adapt"]
