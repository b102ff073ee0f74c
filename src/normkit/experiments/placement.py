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
from ._compare import paired_difference
from ._harness import Settings
from ._training import fmt, mean_std, mlp, train

NAME = "placement"
TITLE = "batch norm before or after the activation"
CLAIM = ("Place batch norm between the linear layer and the activation (Linear -> BN -> activation); the classic "
         "order is preferable in most cases to Linear -> activation -> BN.")
ACTIVATIONS = {"relu": "ReLU", "sigmoid": "sigmoid"}
PLACEMENTS = {"before": ("linear", "norm", "act"), "after": ("linear", "act", "norm")}
LABELS = {"before": "linear → BN → act (before)", "after": "linear → act → BN (after)"}
FULL = {"steps": 1500, "eval_every": 50}
QUICK = {"steps": 20, "eval_every": 10}
CONFIG = {"dataset": "MNIST-1D (4000 train / 1000 test, 40 features), generated locally with seed 42",
          "model": "MLP 40 -> 100 -> 100 -> 100 -> 10, BN in every hidden block, order per arm",
          "hidden": [100, 100, 100], "optimizer": "SGD", "momentum": 0.9, "lr": 0.05, "batch_size": 64,
          "target": 0.6, "tie_margin": 0.01}


def placement_difference(arms: dict[str, list[dict]], tie_margin: float) -> dict:
    """The per-seed final-accuracy difference before - after, with ``"verdict"`` ``"before"``/``"after"``/``"tie"``.

    Examples:
        >>> runs = lambda *accs: [{"final_accuracy": a} for a in accs]
        >>> placement_difference({"before": runs(0.6, 0.62), "after": runs(0.7, 0.71)}, 0.01)["verdict"]
        'after'
    """
    diff = paired_difference([r["final_accuracy"] for r in arms["before"]],
                             [r["final_accuracy"] for r in arms["after"]], tie_margin)
    return {**diff, "verdict": {"first": "before", "second": "after", "tie": "tie"}[diff["verdict"]]}


def run(settings: Settings) -> dict:
    """Train both placements for each activation and every seed; see the module docstring."""
    config = {**CONFIG, **(QUICK if settings.quick else FULL)}
    split = load_mnist1d()
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
    differences = {act: placement_difference(arms, config["tie_margin"]) for act, arms in per_seed.items()}
    return {"config": config, "per_seed": per_seed, "summary": summary, "differences": differences,
            "table": table(summary, differences, config), "measured": measured(summary, differences, config["target"])}


def table(summary: dict, differences: dict, config: dict) -> dict:
    """One row per activation and placement; the paired difference sits on the 'before' row."""
    rows = []
    for act, label in ACTIVATIONS.items():
        diff = differences[act]
        for placement in PLACEMENTS:
            stats = summary[act][placement]
            rows.append([label, LABELS[placement], fmt(stats["final_accuracy"]),
                         fmt(stats["steps_to_target"], ".0f", missing=f"not within {config['steps']}"),
                         f"{100 * diff['mean']:+.1f} ± {100 * diff['std']:.1f} ({diff['verdict']})"
                         if placement == "before" else ""])
    return {"columns": ["activation", "placement", "final test accuracy", f"steps to {config['target']:.0%}",
                        "before − after (points, per seed)"], "rows": rows,
            "note": f"A placement wins only if its mean per-seed lead exceeds {config['tie_margin']:.0%} and one "
                    "standard deviation of the per-seed differences; otherwise 'tie'."}


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
        ...      "sigmoid": {"before": arm(0.65, 900), "after": arm(0.60, None)}}
        >>> d = {"relu": {"mean": 0.01, "std": 0.02, "verdict": "tie"},
        ...      "sigmoid": {"mean": 0.05, "std": 0.01, "verdict": "before"}}
        >>> print(measured(s, d))  # doctest: +NORMALIZE_WHITESPACE
        ReLU: 70.0% before vs 69.0% after the activation (+1.0 ± 2.0 points, within seed noise; 60% after 300
        steps vs 350 steps); sigmoid: 65.0% before vs 60.0% after (+5.0 ± 1.0 points, before wins; 60% after 900
        steps vs never) — the article's preference for BN before the activation holds for sigmoid only.
    """
    parts = []
    for index, (act, label) in enumerate(ACTIVATIONS.items()):
        diff, stats = differences[act], summary[act]
        outcome = {"tie": "within seed noise", "before": "before wins", "after": "after wins"}[diff["verdict"]]
        where = " the activation" if index == 0 else ""
        steps_text = " vs ".join(steps_phrase(stats[p]["steps_to_target"]) for p in PLACEMENTS)
        parts.append(f"{label}: {stats['before']['final_accuracy']['mean']:.1%} before vs "
                     f"{stats['after']['final_accuracy']['mean']:.1%} after{where} "
                     f"({100 * diff['mean']:+.1f} ± {100 * diff['std']:.1f} points, {outcome}; "
                     f"{target:.0%} after {steps_text})")
    winners = [ACTIVATIONS[act] for act in ACTIVATIONS if differences[act]["verdict"] == "before"]
    losers = [ACTIVATIONS[act] for act in ACTIVATIONS if differences[act]["verdict"] == "after"]
    if len(winners) == len(ACTIVATIONS):
        verdict = "the article's preference for BN before the activation holds here"
    elif winners and not losers:
        verdict = f"the article's preference for BN before the activation holds for {' and '.join(winners)} only"
    elif losers and not winners:
        verdict = (f"on this data BN after the activation did better for {' and '.join(losers)}, against the "
                   "article's preference")
    elif losers:
        verdict = "the better placement depends on the activation, as the article's 'task-dependent' caveat allows"
    else:
        verdict = "no placement is measurably better here, so the article's preference is not supported on this data"
    return "; ".join(parts) + f" — {verdict}."


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
