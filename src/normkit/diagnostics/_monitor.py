"""The monitor: per-BN statistics over training, recorded by hooks, written as CSV/JSON/TensorBoard/PNG."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

#: The columns of a record, in CSV order.
FIELDS: tuple[str, ...] = (
    "step", "layer", "call", "training", "batch_size",
    "batch_mean", "running_mean", "batch_var", "running_var",
    "mean_shift", "var_ratio", "distance", "dead_fraction",
    "gamma_mean", "gamma_std", "beta_mean", "beta_std",
)
_SCHEMA = "normkit.monitor/1"
_STATS = FIELDS[5:]  # computed on the device, moved to the host in one transfer per step
_MODES = {"all": None, "train": True, "eval": False}  # Monitor.series(mode=...): the value of "training" it keeps
_EVAL_MARKER = {"linestyle": "none", "marker": "x", "markersize": 6, "markeredgewidth": 1.5}


class Monitor:
    r"""Record what every batch norm's statistics do during training: batch vs running, γ/β, dead channels.

    A forward pre-hook on each BN (any ``torch.nn.modules.batchnorm._BatchNorm``: torch's and normkit's
    BatchNorm1d/2d/3d, SyncBatchNorm) reads the BN's input and, on recorded steps only, reduces it to the batch
    mean and biased variance per channel (ATen's batch-norm statistics, float32, no gradient), and compares them
    with the running statistics *before* this batch updates them, i.e. with what inference would use. One row per
    BN call and recorded step:

    - ``batch_mean``/``running_mean``, ``batch_var``/``running_var``: channel averages;
    - ``mean_shift``: :math:`\overline{|\mu_B - \mu_R| / \sqrt{\sigma^2_R + \epsilon}}`, the batch-mean offset in
      running standard deviations;
    - ``var_ratio``: :math:`\exp \overline{\ln((\sigma^2_B + \epsilon) / (\sigma^2_R + \epsilon))}` (1 = same);
    - ``distance``: the channel mean of :math:`\mathrm{KL}(\mathcal N(\mu_B, \sigma^2_B) \| \mathcal N(\mu_R,
      \sigma^2_R))` (eps added to both variances), 0 when batch and running statistics agree;
    - ``dead_fraction``: the fraction of channels whose batch variance is at most ``dead_var`` (default: the
      BN's eps): eps dominates their normalization and they output β;
    - ``gamma_mean``/``gamma_std``/``beta_mean``/``beta_std`` (NaN without affine parameters).

    Steps: by default every forward of ``model`` (the root) is one step (``auto_step=True``), counted from 0,
    training and eval forwards alike. Each record's ``training`` field says whether the BN was in training mode
    (``True``) or eval mode (``False``, e.g. a validation forward) for that call; ``series(..., mode="train")``
    keeps the training calls only, and :meth:`plot` draws eval calls as separate markers, never joined into the
    training lines. With ``auto_step=False`` call :meth:`step` after each iteration instead. A step ``s`` is
    recorded when ``s % every == 0``; the other steps cost one Python hook call per BN and nothing else.

    Overhead: a recorded step reads each BN's input once more (one reduction pass) and syncs the host once;
    ``benchmarks/bench_monitor.py`` measures it (``docs/diagnostics.md`` has the numbers).

    Args:
        model: the model to watch; hooks go on every BN under it while the monitor is active.
        every: record every ``every``-th step (default 1).
        auto_step: count forwards of ``model`` as steps (default ``True``); ``False``: call :meth:`step`.
        dead_var: the batch variance at or below which a channel counts as near-dead (default: each BN's eps).

    Examples::

        >>> import torch
        >>> from normkit.diagnostics import Monitor
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        >>> with Monitor(model, every=2) as mon:
        ...     for _ in range(4):
        ...         _ = model(torch.randn(64, 4) * 5)
        >>> [(r["step"], r["layer"]) for r in mon.records]
        [(0, '1'), (2, '1')]
        >>> mon.records[0]["var_ratio"] > 2  # the running variance starts at 1; the batch's is larger
        True
    """

    def __init__(self, model: nn.Module, every: int = 1, *, auto_step: bool = True,
                 dead_var: float | None = None) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"Monitor: expected an nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Monitor: expected every to be a positive int, got {every!r}")
        self.model = model
        self.every = every
        self.auto_step = auto_step
        self.dead_var = dead_var
        self.records: list[dict] = []
        self._step = 0
        self._pending: list[tuple[str, int, bool, int, torch.Tensor]] = []
        self._calls: dict[str, int] = {}
        self._handles: list = []
        self.layers = [name for name, m in model.named_modules() if isinstance(m, _BatchNorm)]

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> Monitor:
        self.attach()
        return self

    def __exit__(self, *exc_info) -> None:
        self.detach()

    def attach(self) -> Monitor:
        """Install the hooks (``with Monitor(...)`` does this); returns ``self``."""
        if self._handles:
            return self
        for name, module in self.model.named_modules():
            if isinstance(module, _BatchNorm):
                self._handles.append(module.register_forward_pre_hook(self._make_hook(name)))
        if self.auto_step:
            self._handles.append(self.model.register_forward_hook(lambda *_: self.step()))
        return self

    def detach(self) -> None:
        """Remove the hooks and flush what the current step recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._flush()

    @property
    def current_step(self) -> int:
        """The step the next forward belongs to."""
        return self._step

    def step(self) -> None:
        """End the current step: move its statistics to :attr:`records` and count one step."""
        self._flush()
        self._step += 1
        self._calls.clear()

    # -- recording -------------------------------------------------------------------------------------------

    def _make_hook(self, name: str):
        def hook(module: _BatchNorm, args) -> None:
            call = self._calls.get(name, 0)
            self._calls[name] = call + 1
            if self._step % self.every or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if x.dim() < 2 or x.numel() == 0:
                return
            self._pending.append((name, call, module.training, x.shape[0], self._stats(module, x)))

        return hook

    @torch.no_grad()
    def _stats(self, bn: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        eps = float(bn.eps)
        try:  # ATen's batch-norm statistics: one fused pass, ~3x faster on CPU than var_mean over (0, 2, 3)
            _, mean_b, invstd = torch.native_batch_norm(x, None, None, None, None, True, 0.0, eps)
            mean_b, vb = mean_b.float(), invstd.float().pow(-2)  # vb = var + eps, exactly what KL needs
            var_b = (vb - eps).clamp_min(0)
        except (RuntimeError, ValueError, NotImplementedError):  # eps <= 0, a dtype ATen does not take
            dims = [d for d in range(x.dim()) if d != 1]
            var_b, mean_b = torch.var_mean(x.float(), dim=dims, unbiased=False)
            vb = var_b + eps
        nan = torch.full_like(mean_b, float("nan"))
        mean_r = bn.running_mean.float() if bn.running_mean is not None else nan
        var_r = bn.running_var.float() if bn.running_var is not None else nan
        vr = var_r + eps
        log_ratio = torch.log(vb / vr)
        diff = mean_b - mean_r
        kl = 0.5 * (vb / vr + diff.square() / vr - 1.0 - log_ratio)
        dead = (vb <= eps + (eps if self.dead_var is None else self.dead_var)).float()
        gamma = bn.weight.detach().float() if bn.weight is not None else nan
        beta = bn.bias.detach().float() if bn.bias is not None else nan
        return torch.stack([
            mean_b.mean(), mean_r.mean(), var_b.mean(), var_r.mean(),
            (diff.abs() / vr.sqrt()).mean(), log_ratio.mean().exp(), kl.mean(), dead.mean(),
            gamma.mean(), gamma.std(unbiased=False), beta.mean(), beta.std(unbiased=False),
        ])

    def _flush(self) -> None:
        if not self._pending:
            return
        values = torch.stack([p[4].cpu() for p in self._pending]).tolist()  # one host transfer per step
        for (name, call, training, batch, _), row in zip(self._pending, values, strict=True):
            record = {"step": self._step, "layer": name, "call": call, "training": training, "batch_size": batch}
            record.update(zip(_STATS, row, strict=True))
            self.records.append(record)
        self._pending.clear()

    # -- output ----------------------------------------------------------------------------------------------

    def series(self, layer: str, field: str, *, call: int = 0, mode: str = "all") -> tuple[list[int], list[float]]:
        """The steps and values of one recorded field of one layer, in step order (first call per step by default).

        Args:
            layer: the BN's qualified name (see :attr:`layers`).
            field: a column of :data:`FIELDS`, e.g. ``"distance"``.
            call: which call within a step, for a BN called several times per forward (default 0). Calls are
                counted over both modes: with ``auto_step=False`` and a training and an eval forward in one step,
                the training call is 0 and the eval call 1.
            mode: ``"all"`` (default, every recorded call, as before), ``"train"`` (the calls made while the BN
                was in training mode: the training curve) or ``"eval"`` (those made in eval mode, e.g. validation
                forwards, which with ``auto_step=True`` are steps of their own). The ``training`` field of
                :attr:`records` tells the modes apart in the same way; :meth:`plot` draws the training calls as
                lines and the eval calls as separate ``x`` markers.

        Returns:
            ``(steps, values)``: two lists of the same length, one entry per matching record, in the order recorded
            (increasing step); ``steps[i]`` is an ``int``, ``values[i]`` the record's ``field`` (a ``float``, NaN
            where undefined, e.g. ``gamma_mean`` without affine parameters; ``bool`` for ``"training"``, ``str``
            for ``"layer"``). Empty lists when nothing matches (an unknown layer, a mode never seen).

        Raises:
            ValueError: for a ``field`` outside :data:`FIELDS` or a ``mode`` other than ``"all"``, ``"train"``,
                ``"eval"``.

        Examples::

            >>> import torch
            >>> from normkit.diagnostics import Monitor
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
            >>> with Monitor(model) as mon:
            ...     for step in range(4):
            ...         _ = model.train(step != 2)(torch.randn(16, 4))  # step 2: an eval-mode (validation) forward
            >>> steps, values = mon.series("1", "running_var")
            >>> steps, [type(v).__name__ for v in values]
            ([0, 1, 2, 3], ['float', 'float', 'float', 'float'])
            >>> mon.series("1", "batch_size", mode="train")[0], mon.series("1", "batch_size", mode="eval")
            ([0, 1, 3], ([2], [16]))
        """
        if field not in FIELDS:
            raise ValueError(f"Monitor.series: expected a field in {FIELDS}, got {field!r}")
        if mode not in _MODES:
            raise ValueError(f"Monitor.series: expected mode to be one of {tuple(_MODES)}, got {mode!r}")
        wanted = _MODES[mode]
        rows = [r for r in self.records if r["layer"] == layer and r["call"] == call
                and (wanted is None or r["training"] is wanted)]
        return [r["step"] for r in rows], [r[field] for r in rows]

    def to_csv(self, path) -> Path:
        """Write the records as CSV (header: :data:`FIELDS`); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            writer.writerows(self.records)
        return path

    def to_json(self, path) -> Path:
        """Write ``{"schema", "every", "layers", "fields", "records"}`` as JSON (NaN as ``null``); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        records = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in self.records]
        data = {"schema": _SCHEMA, "every": self.every, "layers": self.layers, "fields": list(FIELDS),
                "records": records}
        path.write_text(json.dumps(data, indent=1) + "\n")
        return path

    def to_tensorboard(self, log_dir) -> None:
        """Write every record as TensorBoard scalars ``bn/<layer>/<field>`` (needs the ``tensorboard`` package).

        Raises:
            ImportError: when ``tensorboard`` is not installed (it is not a normkit dependency).
        """
        try:
            import tensorboard  # noqa: F401 - torch's SummaryWriter needs it
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError(
                "Monitor.to_tensorboard: expected the tensorboard package, which is not installed "
                f"({exc}). Install it with `pip install tensorboard`, or use to_csv/to_json/plot instead."
            ) from exc
        with SummaryWriter(log_dir=str(log_dir)) as writer:
            for r in self.records:
                for field in _STATS:
                    writer.add_scalar(f"bn/{r['layer']}/{field}" + (f"/call{r['call']}" if r["call"] else ""),
                                      r[field], r["step"])

    def plot(self, path, *, layers: list[str] | None = None, focus: str | None = None, dpi: int = 90) -> Path:
        """Draw the records as a PNG of four panels (matplotlib, Agg backend); returns the path.

        The figure of :meth:`figure`, written to ``path`` (its folder is created).

        Args:
            path: where to write the PNG.
            layers, focus: as in :meth:`figure`.
            dpi: the resolution (default 90, about 80 KB).

        Returns:
            ``path`` as a :class:`pathlib.Path`.
        """
        figure = self.figure(layers=layers, focus=focus)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=dpi)
        return path

    def figure(self, *, layers: list[str] | None = None, focus: str | None = None):
        """The four-panel figure of :meth:`plot`, as a :class:`matplotlib.figure.Figure` (imported on call).

        Panels: the batch-vs-running distance of every layer over the steps (log scale); batch mean against
        running mean, and batch variance against running variance, of one "focus" layer (the running statistics'
        lag shows as a shaded gap between the lines); the near-dead channel fraction per layer. Lines join the
        calls made in training mode only; calls made in eval mode (validation forwards, which see the running
        statistics and, with ``auto_step=True``, are steps of their own) are drawn as separate ``x`` markers with
        a legend entry, so they never show as a spike of the training curve. The step axes have integer ticks.

        Args:
            layers: which BNs to draw (default: all that were recorded, at most the 12 with the largest peaks).
            focus: the BN of the mean/variance panels (default: the one with the largest distance peak after the
                first 10 % of the recorded steps, which are the warm-up from the initial statistics 0 and 1;
                training-mode calls only, unless there are none).

        Returns:
            A matplotlib ``Figure`` drawn without pyplot (no global backend or figure state); ``savefig`` writes it.

        Examples::

            >>> import torch
            >>> from normkit.diagnostics import Monitor
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
            >>> with Monitor(model) as mon:
            ...     for _ in range(3):
            ...         _ = model(torch.randn(16, 4))
            >>> [ax.get_title() for ax in mon.figure().axes][1]
            '1: channel-averaged mean'
        """
        if not self.records:
            raise ValueError("Monitor.plot: expected recorded steps, got none. Run forwards inside `with "
                             "Monitor(model):` (or call attach()) before plotting.")
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state; PNG goes through Agg
        from matplotlib.ticker import MaxNLocator

        recorded = list(dict.fromkeys(r["layer"] for r in self.records))
        ranked = [r for r in self.records if r["training"]] or self.records  # eval calls do not pick the focus
        steps = sorted({r["step"] for r in ranked})
        settled = steps[len(steps) // 10]  # skip the warm-up from the initial running statistics (0 and 1)
        peak: dict[str, float] = {}
        for r in ranked:
            if r["step"] >= settled:
                peak[r["layer"]] = max(peak.get(r["layer"], -1.0), _finite(r["distance"]))
        if layers is None:
            layers = sorted(recorded, key=lambda n: -peak.get(n, -1.0))[:12]
            layers = [n for n in recorded if n in layers]
        if focus is None:
            focus = max(layers, key=lambda n: peak.get(n, -1.0))
        elif focus not in recorded:
            raise ValueError(f"Monitor.plot: expected focus to be a recorded BN, one of {recorded}, got {focus!r}")
        has_eval = any(not r["training"] for r in self.records)

        figure = Figure(figsize=(11, 7), layout="constrained")
        axes = figure.subplots(2, 2)
        ax = axes[0, 0]
        self._draw_per_layer(ax, layers, "distance", lambda v: max(v, 1e-8))
        ax.set_yscale("log")
        ax.set(title="batch vs running statistics: KL distance per BN", xlabel="step", ylabel="distance (log)")
        _eval_legend_entry(ax, has_eval)
        ax.legend(fontsize=7, ncol=2, title="layer", title_fontsize=7)
        for ax, field, label in ((axes[0, 1], "mean", "mean"), (axes[1, 0], "var", "variance")):
            steps, batch = self.series(focus, f"batch_{field}", mode="train")
            _, running = self.series(focus, f"running_{field}", mode="train")
            ax.plot(steps, batch, label=f"batch {label}", color="tab:blue", linewidth=1.2)
            ax.plot(steps, running, label=f"running {label} (before update)", color="tab:orange", linewidth=1.8)
            ax.fill_between(steps, batch, running, color="tab:red", alpha=0.15, label="gap = what eval gets wrong")
            eval_steps, eval_batch = self.series(focus, f"batch_{field}", mode="eval")
            _, eval_running = self.series(focus, f"running_{field}", mode="eval")
            if eval_steps:
                ax.plot(eval_steps, eval_batch, color="tab:blue", label=f"batch {label}, eval-mode call",
                        **_EVAL_MARKER)
                ax.plot(eval_steps, eval_running, color="tab:orange", label=f"running {label}, eval-mode call",
                        **_EVAL_MARKER)
            ax.set(title=f"{focus or '(root)'}: channel-averaged {label}", xlabel="step")
            ax.legend(fontsize=7)
        ax = axes[1, 1]
        self._draw_per_layer(ax, layers, "dead_fraction", float)
        ax.set(title="near-dead channels (batch var <= eps)", xlabel="step", ylabel="fraction", ylim=(-0.02, 1.02))
        if any(r["dead_fraction"] > 0 for r in self.records):
            _eval_legend_entry(ax, has_eval)
            ax.legend(fontsize=7, ncol=2)
        else:
            ax.text(0.5, 0.5, "no near-dead channel at any recorded step", ha="center", transform=ax.transAxes)
        for ax in axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers: no 0.5 ticks
        eval_note = "; x = eval-mode calls, not joined to the training lines" if has_eval else ""
        figure.suptitle(f"normkit Monitor: {len(self.layers)} BN layers, every {self.every} step(s){eval_note}")
        return figure

    def _draw_per_layer(self, ax, layers: list[str], field: str, transform) -> None:
        """One training-mode line per layer, and its eval-mode calls as unlabelled markers of the same colour."""
        for name in layers:
            steps, values = self.series(name, field, mode="train")
            (line,) = ax.plot(steps, [transform(v) for v in values], label=name or "(root)", linewidth=1.2)
            eval_steps, eval_values = self.series(name, field, mode="eval")
            if eval_steps:
                ax.plot(eval_steps, [transform(v) for v in eval_values], color=line.get_color(),
                        label="_eval " + (name or "(root)"), **_EVAL_MARKER)


def _eval_legend_entry(ax, has_eval: bool) -> None:
    """A grey ``x`` in the legend standing for every layer's eval-mode markers (each in its layer's colour)."""
    if has_eval:
        ax.plot([], [], color="0.35", label="eval-mode call (x, not joined)", **_EVAL_MARKER)


def _finite(value: float) -> float:
    return value if value == value and abs(value) != float("inf") else -1.0
