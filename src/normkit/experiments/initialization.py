"""``normkit experiment initialization``: does batch norm make training less dependent on the initial weights?

The same ReLU MLP (three hidden layers of 100 units) on the digits, with and without a batch norm after each hidden
linear layer. The initial weights of every linear layer (torch's default init, same seed in both arms) are
multiplied by a factor swept log-spaced over several decades; biases keep their default init. Plain SGD at one
fixed learning rate that trains both arms at the default scale. The experiment reports, per arm, the range of
scales where every seed trains (final test accuracy above a threshold, no divergence), and its best scale, chosen
on a validation part held out from the training data (highest mean final validation accuracy), with that scale's
test accuracy; the two arms' best-vs-best difference is paired by seed, with a 95 % CI.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..data import load_digits
from . import _sweep
from ._compare import describe, paired_difference
from ._harness import Settings
from ._selection import carve
from ._training import History, fmt, mlp, train

NAME = "initialization"
TITLE = "the range of initial weight scales that train, with and without batch norm"
CLAIM = "With batch norm the network is less sensitive to the choice of its initial weights."

HIDDEN = (100, 100, 100)
BATCH_SIZE = 64
LEARNING_RATE = 0.1
THRESHOLD = 0.8
TARGET = 0.9
FULL = {"values": [0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0],
        "steps": 600, "eval_every": 50}
QUICK = {"values": [0.1, 10.0], "steps": 20, "eval_every": 10}


def scale_weights(model: nn.Module, factor: float) -> nn.Module:
    """Multiply the weight of every linear and convolution layer of ``model`` by ``factor``, in place.

    Args:
        model: the freshly initialized model.
        factor: the init scale; 1 keeps torch's default init.

    Returns:
        ``model``.

    Examples:
        >>> layer = nn.Linear(2, 1)
        >>> before = layer.weight.clone()
        >>> torch.equal(scale_weights(layer, 3.0).weight, 3.0 * before)
        True
    """
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d):
                module.weight.mul_(factor)
    return model


def config(settings: Settings) -> dict:
    """Everything that defines the run: data, model, init, optimizer, sweep and the definition of "trains"."""
    sweep = QUICK if settings.quick else FULL
    return {"dataset": "digits (scikit-learn 8x8, pixels / 16; 1078 train / 269 validation / 450 test, split seed 0)",
            "model": f"MLP 64 -> {' -> '.join(map(str, HIDDEN))} -> 10, ReLU; with BN: BatchNorm1d after every hidden "
                     "linear layer, before the ReLU",
            "init": "torch default init of every linear layer, weights (not biases) multiplied by the swept scale; "
                    "the same seed gives both arms the same weights",
            "optimizer": "SGD, no momentum, no weight decay", "learning_rate": LEARNING_RATE,
            "batch_size": BATCH_SIZE, **sweep, "swept": "init scale", "threshold": THRESHOLD, "target": TARGET,
            "trains": f"an arm trains at a scale when no seed's training loss became non-finite and every seed's "
                      f"final test accuracy (eval mode, after {sweep['steps']} steps) is at least {THRESHOLD:.0%}",
            "arms": {arm.name: arm.label for arm in _sweep.ARMS}}


def run(settings: Settings) -> dict:
    """Train both arms at every init scale with every seed.

    Args:
        settings: quick or full, the seeds, the progress bar.

    Returns:
        The harness's ``config``, ``table``, ``measured``, plus ``validation`` (the held-out part that picks each
        arm's best scale), ``runs`` (every seed's history), ``summary`` (per arm and scale), ``derived`` (per arm:
        the range of scales that train, the best scale on validation and its test accuracy) and ``best_vs_best``
        (BN − plain final test accuracy, each arm at its best scale, paired by seed, with a 95 % CI).
    """
    cfg = config(settings)
    split, validation = carve(load_digits())

    def run_one(arm: _sweep.Arm, scale: float, seed: int) -> History:
        model = mlp(split.num_features, split.num_classes, HIDDEN, norm=arm.norm, act="relu", seed=seed)
        return train(scale_weights(model, scale), split, steps=cfg["steps"], batch_size=BATCH_SIZE,
                     lr=LEARNING_RATE, seed=seed, eval_every=cfg["eval_every"])

    runs = _sweep.run_sweep(settings, cfg["values"], run_one, "init-scale sweep")
    summary = {arm: [_sweep.summarize(per_seed, THRESHOLD, TARGET) for per_seed in per_value]
               for arm, per_value in runs.items()}
    derived = {arm: derive(cfg["values"], summaries) for arm, summaries in summary.items()}
    best_vs_best = paired_difference(
        *([run["final_accuracy"] for run in runs[arm][cfg["values"].index(derived[arm]["best_scale"])]]
          for arm in ("batchnorm", "plain")))
    table = _sweep.table(cfg["values"], summary, "init scale")
    table["columns"] += [f"steps to {TARGET:.0%} {arm.label}" for arm in _sweep.ARMS]
    for row, index in zip(table["rows"], range(len(cfg["values"])), strict=True):
        row += [fmt(summary[arm.name][index]["steps_to_target"], ".0f") for arm in _sweep.ARMS]
    table["note"] = (f"Final test and validation accuracy over {cfg['steps']} SGD steps at lr={LEARNING_RATE:g} "
                     f"(the best scale per arm is the one with the highest mean final validation accuracy; at those "
                     f"scales BN − plain final test accuracy: {describe(best_vs_best)}); steps to {TARGET:.0%}: "
                     "the first evaluated "
                     "step at or above it, mean over the seeds that "
                     f"got there. A failed seed stayed below {THRESHOLD:.0%} within the step budget at this one "
                     "learning rate; another rate or longer training might rescue it. Scales that train: " + "; ".join(
                         f"{arm.label} {_span(derived[arm.name]['trains'])}" for arm in _sweep.ARMS) + ".")
    validation = {**validation, "used_for": "each arm's best init scale (highest mean final validation accuracy); "
                                            "the test part only reports"}
    return {"config": cfg, "validation": validation, "table": table,
            "measured": measured(derived, cfg["values"], best_vs_best), "derived": derived,
            "best_vs_best": best_vs_best, "summary": summary, "runs": runs}


def derive(values: list[float], summaries: list[dict]) -> dict:
    """Per arm: the longest contiguous range of scales where every seed trains, its width, and the best scale: the
    one with the highest mean final *validation* accuracy (:func:`normkit.experiments._sweep.best_value`), whose test
    accuracy is reported.

    Examples:
        >>> ok = {"final_accuracy": {"mean": 0.9, "values": [0.9]}, "final_val_accuracy": {"values": [0.91]},
        ...       "reliable": True, "outcomes": ["trained"]}
        >>> bad = {"final_accuracy": {"mean": 0.1, "values": [0.1]}, "final_val_accuracy": {"values": [0.1]},
        ...        "reliable": False, "outcomes": ["failed"]}
        >>> derive([0.1, 1.0, 10.0], [bad, ok, ok])["trains"]
        [1.0, 10.0]
    """
    span = _sweep.reliable_range(values, [s["reliable"] for s in summaries])
    best, best_summary = _sweep.best_value(values, summaries)
    return {"trains": None if span is None else list(span),
            "decades": None if span is None else math.log10(span[1] / span[0]),
            "best_scale": best, "best_final_val_accuracy": best_summary["final_val_accuracy"],
            "best_final_accuracy": best_summary["final_accuracy"]}


def _span(span: list[float] | None) -> str:
    return "none in the sweep" if span is None else f"{span[0]:g} to {span[1]:g}"


def measured(derived: dict, values: list[float], best_vs_best: dict | None = None) -> str:
    """The one-sentence verdict, computed from the derived numbers whichever way they went.

    Args:
        derived: ``{"plain": derive(...), "batchnorm": derive(...)}``.
        values: the swept scales (to tell when a range reaches the edge of the sweep).
        best_vs_best: the paired difference BN − plain of final test accuracy, each arm at its best scale on
            validation (:func:`~normkit.experiments._compare.paired_difference`), or ``None`` to leave it out.

    Returns:
        A sentence naming both ranges, their widths in decades, whether that agrees with the article, the best
        scale per arm on validation with its test accuracy, and the difference between the two.

    Examples:
        >>> from normkit.experiments._training import mean_std
        >>> arm = lambda trains, scale, acc: {"trains": trains, "decades": math.log10(trains[1] / trains[0]),
        ...                                   "best_scale": scale, "best_final_accuracy": mean_std(acc)}
        >>> wide = {"plain": arm([1.0, 3.0], 3.0, [0.97, 0.98]), "batchnorm": arm([0.001, 10.0], 0.1, [0.98, 0.99])}
        >>> diff = {"mean": 0.01, "ci95": [-0.02, 0.04], "verdict": "none"}
        >>> print(measured(wide, [0.001, 0.1, 1.0, 3.0, 10.0, 30.0], diff))  # doctest: +NORMALIZE_WHITESPACE
        Every seed trained for init scales 0.001 to 10 (4.0 decades, reaching the bottom of the sweep) with BN and
        for init scales 1 to 3 (0.5 decades) without: a wider range with BN, in line with the article; best scale
        on validation without BN 3 (final test accuracy 0.975 ± 0.007); with BN 0.1 (final test accuracy 0.985 ±
        0.007); at those scales BN − plain: no difference detected (+1.0 points, 95% CI -2.0 to +4.0).
        >>> narrow = {"plain": wide["batchnorm"], "batchnorm": wide["plain"]}
        >>> print(measured(narrow, [0.001, 0.1, 1.0, 3.0, 10.0, 30.0]))  # doctest: +NORMALIZE_WHITESPACE
        Every seed trained for init scales 1 to 3 (0.5 decades) with BN and for init scales 0.001 to 10 (4.0 decades,
        reaching the bottom of the sweep) without: a narrower range with BN, contrary to the article; best scale on
        validation without BN 0.1 (final test accuracy 0.985 ± 0.007); with BN 3 (final test accuracy 0.975 ±
        0.007).
    """
    plain, bn = derived["plain"], derived["batchnorm"]

    def span_text(arm: dict) -> str:
        if arm["trains"] is None:
            return "at no scale of the sweep"
        low, high = arm["trains"]
        edge = [side for side, hit in (("bottom", low == min(values)), ("top", high == max(values))) if hit]
        reach = f", reaching the {' and '.join(edge)} of the sweep" if edge else ""
        return f"for init scales {low:g} to {high:g} ({arm['decades']:.1f} decades{reach})"

    best = "; ".join(f"{label} {derived[arm]['best_scale']:g} (final test accuracy "
                     f"{fmt(derived[arm]['best_final_accuracy'])})"
                     for arm, label in (("plain", "without BN"), ("batchnorm", "with BN")))
    if best_vs_best is not None:
        best += f"; at those scales BN − plain: {describe(best_vs_best)}"
    width = {name: (-1.0 if arm["decades"] is None else arm["decades"]) for name, arm in derived.items()}
    if bn["trains"] is None and plain["trains"] is None:
        return ("Neither arm trained at any scale of the sweep, so the data cannot test the claim; best scale on "
                f"validation {best}.")
    if width["batchnorm"] > width["plain"]:
        verdict = "a wider range with BN, in line with the article"
    elif width["batchnorm"] == width["plain"]:
        verdict = "an equally wide range, so the data does not show the lower sensitivity the article claims"
    else:
        verdict = "a narrower range with BN, contrary to the article"
    return (f"Every seed trained {span_text(bn)} with BN and {span_text(plain)} without: {verdict}; "
            f"best scale on validation {best}.")


def plot(result: dict, path) -> None:
    """Final test accuracy against the init scale (log x), with and without BN, mean ± std over the seeds."""
    derived = result["derived"]
    title = (f"Init scales that train: {_span(derived['batchnorm']['trains'])} with BN, "
             f"{_span(derived['plain']['trains'])} without")
    _sweep.plot_sweep(result, path, xlabel=f"init scale (× torch default weights, log scale); SGD lr={LEARNING_RATE:g}",
                      title=f"{title}\n(MLP on digits, mean ± std over {len(result['seeds'])} seeds)")
