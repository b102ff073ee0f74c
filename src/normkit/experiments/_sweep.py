"""One hyperparameter swept over arms and seeds: the runs, their per-setting summary, and what "trains" means.

Shared by the ``learning-rate`` and ``initialization`` experiments: both train the same model with and without
batch norm at every value of a log-spaced sweep, and ask over which values each arm trains reliably.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ._harness import Settings
from ._training import History, fmt, mean_std

DIVERGED, FAILED, TRAINED = "diverged", "failed", "trained"


@dataclass(frozen=True)
class Arm:
    """One arm of a with/without comparison.

    Args:
        name: key in the JSON.
        label: legend and table label.
        norm: the :func:`normkit.nn.norm_layer` spec of every hidden block (``"none"`` for no norm layer).
    """

    name: str
    label: str
    norm: str


ARMS = (Arm("plain", "without BN", "none"), Arm("batchnorm", "with BN", "bn"))

RunOne = Callable[[Arm, float, int], History]


def run_sweep(settings: Settings, values: Sequence[float], run_one: RunOne, description: str,
              arms: Sequence[Arm] = ARMS) -> dict[str, list[list[dict]]]:
    """Train every arm at every value with every seed.

    Args:
        settings: the seeds and the progress bar.
        values: the swept values.
        run_one: ``run_one(arm, value, seed) -> History``, one seeded training run.
        description: the progress bar's text.
        arms: the arms.

    Returns:
        ``{arm.name: [[history dict per seed] per value]}``.
    """
    advance = settings.progress(description, len(arms) * len(values) * len(settings.seeds))
    done = 0
    runs: dict[str, list[list[dict]]] = {}
    for arm in arms:
        runs[arm.name] = []
        for value in values:
            per_seed = []
            for seed in settings.seeds:
                per_seed.append(run_one(arm, value, seed).as_dict())
                done += 1
                advance(done)
            runs[arm.name].append(per_seed)
    return runs


def outcome(run: dict, threshold: float) -> str:
    """``"diverged"`` (a non-finite loss), ``"failed"`` (final test accuracy below ``threshold``) or ``"trained"``.

    Examples:
        >>> outcome({"diverged_at": 12, "final_accuracy": 0.1}, 0.8)
        'diverged'
        >>> outcome({"diverged_at": None, "final_accuracy": 0.95}, 0.8)
        'trained'
    """
    if run["diverged_at"] is not None:
        return DIVERGED
    return TRAINED if run["final_accuracy"] >= threshold else FAILED


def summarize(per_seed: Sequence[dict], threshold: float, target: float) -> dict:
    """Mean ± std over the seeds of one arm at one value, and how many seeds diverged, failed or trained.

    Args:
        per_seed: the history dicts of the seeds.
        threshold: final test accuracy a run needs to count as trained.
        target: test accuracy whose first evaluated step is reported as ``steps_to_target``.

    Returns:
        ``final_accuracy``, ``final_val_accuracy`` (validation; ``None`` values without a validation part),
        ``best_accuracy``, ``steps_to_target`` (:func:`mean_std` dicts), ``outcomes`` (per seed), ``diverged``
        (count) and ``reliable`` (every seed trained).
    """
    outcomes = [outcome(run, threshold) for run in per_seed]
    steps = [next((int(s) for s, acc in run["curve"] if acc >= target), None) for run in per_seed]
    return {"final_accuracy": mean_std([run["final_accuracy"] for run in per_seed]),
            "final_val_accuracy": mean_std([run.get("final_val_accuracy") for run in per_seed]),
            "best_accuracy": mean_std([run["best_accuracy"] for run in per_seed]),
            "steps_to_target": mean_std(steps), "outcomes": outcomes, "diverged": outcomes.count(DIVERGED),
            "reliable": all(o == TRAINED for o in outcomes)}


def highest_reliable(values: Sequence[float], reliable: Sequence[bool]) -> float | None:
    """The largest value at which every seed trained, ``None`` if there is none.

    Examples:
        >>> highest_reliable([0.1, 1.0, 10.0, 100.0], [True, True, False, True])
        100.0
        >>> highest_reliable([0.1, 1.0], [False, False]) is None
        True
    """
    return max((v for v, ok in zip(values, reliable, strict=True) if ok), default=None)


def reliable_range(values: Sequence[float], reliable: Sequence[bool]) -> tuple[float, float] | None:
    """The lowest and highest value of the longest contiguous stretch of the sweep where every seed trained.

    Ties go to the stretch of lower values. ``None`` when no value trained reliably.

    Examples:
        >>> reliable_range([0.01, 0.1, 1.0, 10.0, 100.0], [False, True, True, False, True])
        (0.1, 1.0)
    """
    best: tuple[int, int] | None = None
    start = None
    for index, ok in enumerate([*reliable, False]):
        if ok and start is None:
            start = index
        elif not ok and start is not None:
            if best is None or index - start > best[1] - best[0] + 1:
                best = (start, index - 1)
            start = None
    return None if best is None else (values[best[0]], values[best[1]])


def best_value(values: Sequence[float], summaries: Sequence[dict]) -> tuple[float, dict]:
    """The value with the highest mean final *validation* accuracy (the lowest such value on ties) and its summary,
    whose test accuracy is then reported; a seed that diverged counts as accuracy 0."""
    def score(summary: dict) -> float:
        values_ = summary["final_val_accuracy"]["values"]
        if any(v is None for v in values_):
            raise ValueError("best_value: a run has no validation accuracy; train on a split with a validation part "
                             "(normkit.experiments._selection.carve).")
        kept = [0.0 if o == DIVERGED else v for o, v in zip(summary["outcomes"], values_, strict=True)]
        return sum(kept) / len(kept)

    index = max(range(len(values)), key=lambda i: (score(summaries[i]), -i))
    return values[index], summaries[index]


def outcome_cell(summary: dict) -> str:
    """How many seeds diverged or failed, for a table cell: ``"-"`` when all trained."""
    counts = [f"{summary['outcomes'].count(kind)} {kind}" for kind in (DIVERGED, FAILED)
              if summary["outcomes"].count(kind)]
    return ", ".join(counts) if counts else "-"


def table(values: Sequence[float], summaries: dict[str, list[dict]], value_label: str,
          arms: Sequence[Arm] = ARMS) -> dict:
    """One row per swept value: per arm the final test and validation accuracy (mean ± std) and the failed seeds."""
    columns = [value_label]
    for arm in arms:
        columns += [f"final test acc. {arm.label}", f"final val. acc. {arm.label}", f"seeds not trained {arm.label}"]
    rows = []
    for index, value in enumerate(values):
        row = [f"{value:g}"]
        for arm in arms:
            summary = summaries[arm.name][index]
            row += [fmt(summary["final_accuracy"], missing="-"), fmt(summary["final_val_accuracy"], missing="-"),
                    outcome_cell(summary)]
        rows.append(row)
    return {"columns": columns, "rows": rows}


def plot_sweep(result: dict, path, *, xlabel: str, title: str, arms: Sequence[Arm] = ARMS) -> None:
    """Final test accuracy (mean ± std over the seeds) against the swept value (log x), one line per arm.

    Values where some seed diverged carry an ``x`` marker; the dashed line is the accuracy every seed must reach.

    Args:
        result: the experiment's result (``config`` with ``values``, ``threshold``, ``steps``; ``summary``).
        path: the PNG to write.
        xlabel: the x axis label, with its unit and "log scale".
        title: the figure's one message.
        arms: the arms, in legend order.
    """
    from matplotlib.ticker import FuncFormatter

    from . import _plotting

    values = result["config"]["values"]
    fig, (ax,) = _plotting.figure(width=6.5, height=4.8)
    any_diverged = False
    for arm in arms:
        summaries = result["summary"][arm.name]
        mean = [s["final_accuracy"]["mean"] for s in summaries]
        std = [s["final_accuracy"]["std"] for s in summaries]
        _plotting.band(ax, values, mean, std, label=arm.label, marker="o", markersize=4)
        diverged = [(v, m) for v, m, s in zip(values, mean, summaries, strict=True) if s["diverged"]]
        if diverged:
            any_diverged = True
            ax.plot(*zip(*diverged, strict=True), linestyle="none", marker="x", markersize=10,
                    color=ax.get_lines()[-1].get_color())
    if any_diverged:
        ax.plot([], [], linestyle="none", marker="x", markersize=10, color="gray",
                label="a seed's loss became non-finite")
    ax.axhline(result["config"]["threshold"], color="gray", linestyle="--", linewidth=1,
               label=f"threshold: every seed must reach {result['config']['threshold']:.0%}")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _position: f"{value:g}"))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"final test accuracy after {result['config']['steps']} steps")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    _plotting.save(fig, path, title)
