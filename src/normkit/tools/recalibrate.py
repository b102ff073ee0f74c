"""``recalibrate(model, data)``: precise batch norm — exact population statistics of every batch norm's input."""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..functional._stats import accumulation_dtype, merge_moments
from .fold import _PLAIN_FORWARDS

ESTIMATORS = ("population", "mean_of_batches")
PROGRESS_MIN_BATCHES = 50  # progress=None shows a bar from this many batches on, and only on a terminal


class _Accumulator:
    """Per-channel statistics of one batch norm's inputs, merged in float64 into a pooled ``(count, mean, M2)``
    and the sums of per-batch means and variances (stored kind: unbiased, or biased for biased layers)."""

    def __init__(self, biased: bool) -> None:
        self.biased = biased
        self.batches = 0
        self.pending = 0  # values per channel of the call in flight (read lets the layer compute its moments)
        self.count = self.mean = self.m2 = None
        self.sum_means = self.sum_vars = None

    def add_input(self, x: torch.Tensor) -> None:
        """Moments of an input, computed here (layers whose own running update cannot be relied on)."""
        n = x.numel() // x.shape[1] if x.dim() > 1 else 0
        if n == 0:
            return
        x = x.detach()
        x = x.to(accumulation_dtype(x.dtype)) if x.dtype not in (torch.float32, torch.float64) else x
        var, mean = torch.var_mean(x, dim=[d for d in range(x.dim()) if d != 1], correction=0)
        self.add_moments(n, mean, var.to(torch.float64) * n)

    def add_layer_moments(self, module: _BatchNorm) -> None:
        """Moments the layer itself just stored with momentum 1 (its running statistics are the batch's)."""
        n, self.pending = self.pending, 0
        if n == 0:
            return
        stored = module.running_var.detach().to(torch.float64)
        self.add_moments(n, module.running_mean.detach(), stored * (n if self.biased else n - 1))

    def add_moments(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        mean = mean.to(torch.float64)
        var = m2 / n if self.biased else (m2 / (n - 1) if n > 1 else torch.full_like(m2, math.nan))
        count = torch.full_like(mean, n)
        if self.count is None:
            self.count, self.mean, self.m2 = count, mean, m2
            self.sum_means, self.sum_vars = mean, var
        else:
            self.count, self.mean, self.m2 = merge_moments(torch.stack([self.count, count]),
                                                           torch.stack([self.mean, mean]),
                                                           torch.stack([self.m2, m2]))
            self.sum_means, self.sum_vars = self.sum_means + mean, self.sum_vars + var
        self.batches += 1

    def result(self, estimator: str) -> tuple[torch.Tensor, torch.Tensor]:
        if estimator == "mean_of_batches":
            return self.sum_means / self.batches, self.sum_vars / self.batches
        total = self.count
        var = self.m2 / total if self.biased else self.m2 / (total - 1)
        return self.mean, var


def recalibrate(model: nn.Module, data: Iterable, *, num_batches: int | None = None,
                estimator: str = "population", progress: bool | None = None) -> nn.Module:
    r"""Precise batch norm: replace every batch norm's running statistics by those of its inputs over ``data``.

    .. math::
        \mu = \frac{1}{n} \sum_{i=1}^{n} x_i, \qquad
        \sigma^2 = \frac{1}{n - 1} \sum_{i=1}^{n} (x_i - \mu)^2

    over all ``n`` values per channel that reach the batch norm across the batches (``estimator="population"``,
    fvcore's precise BN: per-batch ``(count, mean, M2)`` merged exactly with Chan's formula, in float64, so the
    split into batches does not matter). ``running_var`` stores the unbiased variance (torch's convention), or the
    biased one ``M2 / n`` for layers built with ``running_var="biased"``. ``estimator="mean_of_batches"`` is
    :func:`torch.optim.swa_utils.update_bn`'s: the plain average of the per-batch means and per-batch (unbiased, or
    biased for ``running_var="biased"``) variances, every batch weighted equally whatever its size.

    The model runs under ``torch.no_grad()`` with its batch norms in training mode (each normalizes with its batch
    statistics, as in training, so downstream layers see what they saw in training) and every other module in the
    mode it had. A plain batch norm runs with momentum 1, so that its own kernel stores each batch's moments, read
    after the call; a class that overrides ``forward`` has its input reduced by a hook instead. Afterwards every
    module's mode is restored, as are momentum (and normkit's ``nonfinite``) and every parameter (bit for bit).
    ``num_batches_tracked`` grows by the number of batches the layer saw, as if it had trained on them (a counter
    that step schedules may rely on; for ``momentum=None`` layers the next training step then averages the new
    statistics with that weight). A batch norm that no batch reached keeps its statistics (fvcore would zero them)
    and a ``UserWarning`` names it; a batch norm without running statistics is skipped. A batch norm called
    several times per forward pools every call. Statistics are those of this process only (no all-reduce).

    ``model`` is changed in place (its running statistics are what it asked to change) and returned. If anything
    fails (a bad batch, too little data, non-finite statistics) every buffer, counter and mode is put back.

    Args:
        model: any module.
        data: an iterable of batches; a batch is the model's input tensor, or a tuple/list whose first element is
            (a ``DataLoader`` of ``(x, y)`` works as is). A tensor alone is one batch. Batches are moved to the
            device of the model's first parameter.
        num_batches: use the first ``num_batches`` batches; ``data`` must hold that many (else ``ValueError``).
            Default: ``None`` (all of ``data``).
        estimator: ``"population"`` (default) or ``"mean_of_batches"``.
        progress: show a rich progress bar (on stderr). Default: ``None``: only on a terminal and for at least 50
            batches (``num_batches``, or ``len(data)``).

    Returns:
        ``model``, with new running statistics.

    Examples::

        >>> import torch, normkit
        >>> from normkit.tools.recalibrate import recalibrate
        >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), normkit.BatchNorm1d(4)).eval()
        >>> x = torch.randn(128, 3)
        >>> batches = [x[:2], x[2:4], x[4:8], x[8:16], x[16:32], x[32:64], x[64:]]
        >>> model = recalibrate(model, batches)
        >>> h = model[0](x).detach()
        >>> torch.allclose(model[1].running_mean, h.mean(0), atol=1e-6)
        True
        >>> torch.allclose(model[1].running_var, h.var(0), atol=1e-5)
        True
        >>> model.training, int(model[1].num_batches_tracked)
        (False, 7)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"recalibrate expects an nn.Module, got {type(model).__name__}.")
    if estimator not in ESTIMATORS:
        raise ValueError(f"recalibrate: unknown estimator {estimator!r}; expected 'population' (fvcore's precise "
                         "BN, every sample weighted equally) or 'mean_of_batches' (torch.optim.swa_utils.update_bn).")
    if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int)
                                    or num_batches < 1):
        raise ValueError(f"recalibrate: num_batches must be a positive int or None, got {num_batches!r}.")
    if isinstance(data, torch.Tensor):
        data = [data]
    layers = {name: m for name, m in model.named_modules()
              if isinstance(m, _BatchNorm) and m.track_running_stats and m.running_mean is not None
              and m.running_var is not None}
    accumulators = {name: _Accumulator(getattr(m, "running_var_mode", "unbiased") == "biased")
                    for name, m in layers.items()}
    saved_buffers = {name: [b.detach().clone() if b is not None else None
                            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]
                     for name, m in layers.items()}
    modes = [(m, m.training) for m in model.modules()]
    options = [(m, m.momentum, getattr(m, "nonfinite", None)) for m in layers.values()]
    device = next((p.device for p in model.parameters()), None)
    handles = []
    for name, m in layers.items():
        if type(m).forward in _PLAIN_FORWARDS:
            # A plain batch norm in training mode with momentum 1 stores its batch's mean and variance: read them
            # after each call (free) instead of reducing the input a second time.
            handles.append(m.register_forward_pre_hook(_counter(accumulators[name])))
            handles.append(m.register_forward_hook(_reader(accumulators[name])))
        else:
            handles.append(m.register_forward_pre_hook(_recorder(accumulators[name])))
    seen = 0
    batches = _progress(_batches(data, num_batches), _total(data, num_batches), progress)
    try:
        with torch.no_grad():
            for m in layers.values():
                m.train()
                m.momentum = 1.0
                if hasattr(m, "nonfinite"):
                    m.nonfinite = "propagate"  # a non-finite batch must reach the statistics (checked below)
                m.running_mean.zero_()  # finite starting values: (1 - 1) * running must be 0
                m.running_var.fill_(1.0)
        with torch.no_grad():
            for batch in batches:
                x = _input_of(batch, seen)
                model(x.to(device) if device is not None and x.device != device else x)
                seen += 1
        if seen == 0:
            raise ValueError("recalibrate: data gave no batches; expected an iterable of batches (a DataLoader, a "
                             "list of tensors, ...). Pass data that holds at least one batch.")
        if num_batches is not None and seen < num_batches:
            raise ValueError(f"recalibrate: num_batches={num_batches} but data gave only {seen} batch(es). Pass "
                             f"num_batches={seen} (or None for all of data), or more data.")
        results = {}
        for name, acc in accumulators.items():
            if acc.batches == 0:
                continue
            mean, var = acc.result(estimator)
            if not bool(torch.isfinite(mean).all() and torch.isfinite(var).all()):
                raise ValueError(f"recalibrate: the statistics of {_layer(name, layers[name])} over the data are "
                                 "not finite (inf/NaN inputs, or batches of one value per channel with the "
                                 "unbiased variance); check the data, or use larger batches. Nothing was changed.")
            results[name] = (mean, var)
    except BaseException:
        _restore(layers, saved_buffers)
        raise
    finally:
        batches.close()  # ends the progress bar, if any
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
        for module, momentum, nonfinite in options:
            module.momentum = momentum
            if nonfinite is not None:
                module.nonfinite = nonfinite
    _restore(layers, saved_buffers)
    with torch.no_grad():
        for name, (mean, var) in results.items():
            m = layers[name]
            m.running_mean.copy_(mean.to(m.running_mean.dtype))
            m.running_var.copy_(var.to(m.running_var.dtype))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.add_(accumulators[name].batches)
    idle = [name for name, acc in accumulators.items() if acc.batches == 0]
    if idle:
        names = [repr(name) for name in idle]
        which = f"layer {names[0]}" if len(names) == 1 else f"layers {', '.join(names[:-1])} and {names[-1]}"
        warnings.warn(f"recalibrate: no batch reached batch-norm {which} (the forward did not call "
                      f"{'it' if len(names) == 1 else 'them'}); {'its' if len(names) == 1 else 'their'} running "
                      "statistics were kept.", UserWarning, stacklevel=2)
    return model


def _layer(name: str, module: nn.Module) -> str:
    """A batch norm as messages name it: ``layer '1' (BatchNorm1d)``, or the model itself for the root."""
    kind = type(module).__name__
    return f"layer {name!r} ({kind})" if name else f"the model itself (a {kind})"


def _recorder(accumulator: _Accumulator):
    def hook(_module, args):
        accumulator.add_input(args[0])

    return hook


def _counter(accumulator: _Accumulator):
    def hook(_module, args):
        x = args[0]
        accumulator.pending = x.numel() // x.shape[1] if x.dim() > 1 else 0

    return hook


def _reader(accumulator: _Accumulator):
    def hook(module, _args, _output):
        accumulator.add_layer_moments(module)

    return hook


def _restore(layers, saved) -> None:
    with torch.no_grad():
        for name, m in layers.items():
            for buffer, value in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved[name],
                                     strict=True):
                if buffer is not None:
                    buffer.copy_(value)


def _batches(data: Iterable, num_batches: int | None) -> Iterator:
    try:
        iterator = iter(data)
    except TypeError as error:
        raise TypeError(f"recalibrate: data must be an iterable of batches (a DataLoader, a list of tensors, a "
                        f"tensor for one batch), got {type(data).__name__}.") from error
    for index, batch in enumerate(iterator):
        if num_batches is not None and index >= num_batches:
            return
        yield batch


def _input_of(batch, index: int) -> torch.Tensor:
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"recalibrate: batch {index} is a {type(batch).__name__}; expected the model's input tensor "
                        "or a tuple/list whose first element is (as a DataLoader of (x, y) gives). Wrap other data "
                        "in a generator that yields the input tensor.")
    return batch


def _total(data, num_batches: int | None) -> int | None:
    try:
        length = len(data)
    except TypeError:
        return num_batches
    return length if num_batches is None else min(length, num_batches)


def _progress(batches: Iterator, total: int | None, progress: bool | None) -> Iterator:
    show = progress if progress is not None else (
        total is not None and total >= PROGRESS_MIN_BATCHES and sys.stderr.isatty())
    if not show:
        yield from batches
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("recalibrating batch norms", total=total)
        for batch in batches:
            yield batch
            bar.advance(task)


__all__ = ["ESTIMATORS", "recalibrate"]
