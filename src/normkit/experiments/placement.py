"""``normkit experiment placement``: batch norm before or after the activation?

An MLP (three hidden layers of 100 units) on MNIST-1D with batch norm in every hidden block, either
linear -> BN -> activation (the classic placement) or linear -> activation -> BN, for ReLU and for sigmoid units.
Within an activation both placements share the seed, the initial linear weights, the batches, the optimizer and the
learning rate; only the order of the layers differs. Reported: test accuracy vs step, final test accuracy, steps to
a target accuracy, and the paired difference (before - after) per seed.
"""

from __future__ import annotations

from pathlib import Path

from ..data import load_mnist1d
from . import _plotting
from ._compare import describe, paired_difference
from ._harness import Settings
from ._selection import carve
from ._training import fmt, mean_std, mlp, train

NAME = "placement"
TITLE = "batch norm before or after the activation"
CLAIM = ("Place batch norm between the linear layer and the activation (Linear -> BN -> activation); the classic "
         "order is preferable in most cases to Linear -> activation -> BN.")
SEEDS = 8
ACTIVATIONS = {"relu": "ReLU", "sigmoid": "sigmoid"}
PLACEMENTS = {"before": ("linear", "norm", "act"), "after": ("linear", "act", "norm")}
LABELS = {"before": "linear → BN → act (before)", "after": "linear → act → BN (after)"}
FULL = {"steps": 1000, "eval_every": 50}
QUICK = {"steps": 20, "eval_every": 10}
CONFIG = {"dataset": "MNIST-1D (3200 train / 800 validation / 1000 test, 40 features), generated locally with seed 42",
          "model": "MLP 40 -> 100 -> 100 -> 100 -> 10, BN in every hidden block, order per arm",
          "hidden": [100, 100, 100], "optimizer": "SGD", "momentum": 0.9, "lr": 0.05, "batch_size": 64,
          "target": 0.55}
OUTCOMES = {"first": "before", "second": "after", "none": "none"}


def placement_difference(arms: dict[str, list[dict]]) -> dict:
    """Per seed, before vs after: the final-accuracy difference (before - after) and the speed difference (steps to
    the target after - before, positive when BN before the activation got there sooner), each with its 95 % CI and a
    verdict ``"before"``, ``"after"`` or ``"none"`` (no difference detected).

    Examples:
        >>> runs = lambda *accs: [{"final_accuracy": a, "steps_to_target": 100} for a in accs]
        >>> placement_difference({"before": runs(0.6, 0.62, 0.61), "after": runs(0.7, 0.71, 0.70)})["verdict"]
        'after'
    """
    accuracy = paired_difference([r["final_accuracy"] for r in arms["before"]],
                                 [r["final_accuracy"] for r in arms["after"]])
    speed = paired_difference([r["steps_to_target"] for r in arms["after"]],
                              [r["steps_to_target"] for r in arms["before"]])
    return {**accuracy, "verdict": OUTCOMES[accuracy["verdict"]],
            "speed": {**speed, "verdict": OUTCOMES[speed["verdict"]]}}


def run(settings: Settings) -> dict:
    """Train both placements for each activation and every seed; see the module docstring."""
    config = {**CONFIG, **(QUICK if settings.quick else FULL)}
    split, validation = carve(load_mnist1d())
    per_seed: dict[str, dict[str, list[dict]]] = {act: {p: [] for p in PLACEMENTS} for act in ACTIVATIONS}
    for seed in settings.seeds:
        for act in ACTIVATIONS:
            for placement, order in PLACEMENTS.items():
                advance = settings.progress(f"{ACTIVATIONS[act]}, BN {placement}, seed {seed}", config["steps"])
                model = mlp(split.num_features, split.num_classes, config["hidden"], norm="bn", act=act,
                            order=order, seed=seed)
                history = train(model, split, steps=config["steps"], batch_size=config["batch_size"],
                                lr=config["lr"], momentum=config["momentum"], seed=seed,
                                eval_every=config["eval_every"], on_step=advance)
                per_seed[act][placement].append({"seed": seed, **history.as_dict(),
                                                 "steps_to_target": history.steps_to(config["target"])})
    summary = {act: {placement: {"final_accuracy": mean_std([r["final_accuracy"] for r in runs]),
                                 "steps_to_target": mean_std([r["steps_to_target"] for r in runs])}
                     for placement, runs in arms.items()}
               for act, arms in per_seed.items()}
    differences = {act: placement_difference(arms) for act, arms in per_seed.items()}
    validation = {**validation, "used_for": "nothing is selected (one learning rate fixed in advance for every "
                                            "arm); the validation part is held out so the test part only reports"}
    return {"config": config, "validation": validation, "per_seed": per_seed, "summary": summary,
            "differences": differences, "table": table(summary, differences, config),
            "measured": measured(summary, differences, config["target"])}


def table(summary: dict, differences: dict, config: dict) -> dict:
    """One row per activation and placement; the paired differences sit on the 'before' row."""
    rows = []
    for act, label in ACTIVATIONS.items():
        diff = differences[act]
        for placement in PLACEMENTS:
            stats = summary[act][placement]
            first = placement == "before"
            rows.append([label, LABELS[placement], fmt(stats["final_accuracy"]),
                         fmt(stats["steps_to_target"], ".0f", missing=f"not within {config['steps']}"),
                         describe(diff) if first else "",
                         describe(diff["speed"], scale=1, unit=" steps", spec="+.0f") if first else ""])
    return {"columns": ["activation", "placement", "final test accuracy", f"steps to {config['target']:.0%}",
                        "accuracy, before − after (paired)", f"steps to {config['target']:.0%}, after − before"],
            "rows": rows,
            "note": "Paired per seed; a placement wins only when the 95 % confidence interval of the difference "
                    "excludes zero. Seeds where either placement never reached the target drop out of the steps "
                    "comparison."}


def steps_phrase(stat: dict) -> str:
    """How many steps a placement needed to reach the target, for the measured sentence.

    Examples:
        >>> steps_phrase(mean_std([300, 400])), steps_phrase(mean_std([300, None])), steps_phrase(mean_std([None]))
        ('350 steps', '300 steps (1/2 seeds)', 'never')
    """
    if stat["mean"] is None:
        return "never"
    seeds = "" if stat["n"] == len(stat["values"]) else f" ({stat['n']}/{len(stat['values'])} seeds)"
    return f"{stat['mean']:.0f} steps{seeds}"


def measured(summary: dict, differences: dict, target: float = 0.6) -> str:
    """One sentence that says what the numbers show, whichever way they went.

    Examples:
        >>> arm = lambda acc, steps: {"final_accuracy": {"mean": acc}, "steps_to_target": mean_std([steps])}
        >>> s = {"relu": {"before": arm(0.70, 300), "after": arm(0.69, 350)},
        ...      "sigmoid": {"before": arm(0.65, 900), "after": arm(0.60, 700)}}
        >>> none = {"mean": 0.01, "ci95": [-0.01, 0.03], "verdict": "none"}
        >>> d = {"relu": {**none, "speed": {"mean": 50, "ci95": [-20, 120], "verdict": "none"}},
        ...      "sigmoid": {"mean": 0.05, "ci95": [0.02, 0.08], "verdict": "before",
        ...                  "speed": {"mean": -200, "ci95": [-300, -100], "verdict": "after"}}}
        >>> print(measured(s, d))  # doctest: +NORMALIZE_WHITESPACE
        ReLU: 70.0% before vs 69.0% after the activation (no difference detected (+1.0 points, 95% CI -1.0 to
        +3.0)); 60% after 300 steps vs 350 steps (no difference detected); sigmoid: 65.0% before vs 60.0% after
        (+5.0 points (95% CI +2.0 to +8.0)); 60% after 900 steps vs 700 steps (after faster by 200 steps, 95% CI
        100 to 300) — BN before the activation ended more accurate for sigmoid only, as the article prefers; BN
        after it reached 60% sooner for sigmoid.
    """
    parts = []
    for index, (act, label) in enumerate(ACTIVATIONS.items()):
        diff, stats = differences[act], summary[act]
        where = " the activation" if index == 0 else ""
        steps_text = " vs ".join(steps_phrase(stats[p]["steps_to_target"]) for p in PLACEMENTS)
        parts.append(f"{label}: {stats['before']['final_accuracy']['mean']:.1%} before vs "
                     f"{stats['after']['final_accuracy']['mean']:.1%} after{where} ({describe(diff)}); "
                     f"{target:.0%} after {steps_text} ({_speed(diff['speed'])})")
    winners = [ACTIVATIONS[act] for act in ACTIVATIONS if differences[act]["verdict"] == "before"]
    losers = [ACTIVATIONS[act] for act in ACTIVATIONS if differences[act]["verdict"] == "after"]
    if len(winners) == len(ACTIVATIONS):
        verdict = "BN before the activation ended more accurate, as the article prefers"
    elif winners and not losers:
        verdict = (f"BN before the activation ended more accurate for {' and '.join(winners)} only, as the "
                   "article prefers")
    elif losers and not winners:
        verdict = f"BN after the activation ended more accurate for {' and '.join(losers)}, against the article"
    elif losers:
        verdict = ("the more accurate placement depends on the activation, as the article's 'task-dependent' "
                   "caveat allows")
    else:
        verdict = "no difference in final accuracy detected, so the data neither supports nor refutes the article"
    faster = {side: [ACTIVATIONS[a] for a in ACTIVATIONS if differences[a]["speed"]["verdict"] == side]
              for side in ("before", "after")}
    speed = "; ".join(f"BN {side} it reached {target:.0%} sooner for {' and '.join(acts)}"
                      for side, acts in faster.items() if acts)
    return "; ".join(parts) + f" — {verdict}" + (f"; {speed}." if speed else ".")


def _speed(stat: dict) -> str:
    if stat["mean"] is None:
        return "no seed reached it with both placements"
    if stat["verdict"] == "none":
        return "no difference detected"
    side, amount = ("before", stat["mean"]) if stat["verdict"] == "before" else ("after", -stat["mean"])
    low, high = sorted(abs(v) for v in stat["ci95"])
    return f"{side} faster by {amount:.0f} steps, 95% CI {low:.0f} to {high:.0f}"


def plot(result: dict, path: Path) -> None:
    """Test accuracy vs training step, one panel per activation, one band (mean ± std) per placement."""
    fig, axes = _plotting.figure(ncols=len(ACTIVATIONS), width=5.0, height=4.0)
    target = result["config"]["target"]
    for ax, (act, label) in zip(axes, ACTIVATIONS.items(), strict=True):
        for placement in PLACEMENTS:
            steps, mean, std = _plotting.curves_mean_std([run["curve"] for run in result["per_seed"][act][placement]])
            _plotting.band(ax, steps, mean, std, label=LABELS[placement])
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
        ax.set_title(f"{label} units")
        ax.set_xlabel(f"training steps (batches of {result['config']['batch_size']})")
        ax.set_ylabel("test accuracy (eval mode)")
        ax.set_ylim(0, 1)
        ax.legend(loc="lower right", fontsize="small")
    _plotting.save(fig, path, f"MLP on MNIST-1D: does BN before the activation train better? "
                              f"(mean ± std, {len(result['seeds'])} seeds)")
