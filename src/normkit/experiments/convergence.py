"""``normkit experiment convergence``: does batch norm reach a target accuracy in fewer steps?

A small CNN on the 8x8 digits, trained with and without batch norm after every convolution: same seed, same initial
convolution weights, same batches, same optimizer and learning rate. Reported: test accuracy vs step and the steps
each arm needs to reach the target, per seed, and their ratio.
"""

from __future__ import annotations

from pathlib import Path

from ..data import load_digits
from . import _plotting
from ._harness import Settings
from ._training import cnn, fmt, mean_std, train

NAME = "convergence"
TITLE = "steps to a target accuracy, with and without batch norm"
CLAIM = ("Batch norm trains faster: the same network reaches the same accuracy in far fewer steps (the original paper: "
         "14x fewer on ImageNet).")
ARMS = {"none": "without BN", "bn": "with BN"}
FULL = {"steps": 2000, "eval_every": 25}
QUICK = {"steps": 30, "eval_every": 10}
CONFIG = {"dataset": "sklearn digits 8x8 (1347 train / 450 test), pixels / 16", "channels": [16, 32],
          "model": "conv3x3(16) -> [BN] -> ReLU -> conv3x3 stride 2 (32) -> [BN] -> ReLU -> global avg pool -> linear",
          "optimizer": "SGD", "momentum": 0.9, "lr": 0.02, "batch_size": 32, "target": 0.9}


def steps_ratio(plain: int | None, bn: int | None, steps: int) -> tuple[float | None, bool]:
    """The steps without BN over the steps with BN, and whether it is only a lower bound (plain never got there).

    Examples:
        >>> steps_ratio(300, 100, 1000), steps_ratio(None, 100, 1000), steps_ratio(300, None, 1000)
        ((3.0, False), (10.0, True), (None, False))
    """
    if bn is None:
        return None, False
    if plain is None:
        return steps / max(bn, 1), True
    return plain / max(bn, 1), False


def run(settings: Settings) -> dict:
    """Train both arms for every seed; see the module docstring."""
    schedule = QUICK if settings.quick else FULL
    config = {**CONFIG, **schedule}
    split = load_digits()
    per_seed: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for seed in settings.seeds:
        for arm in ARMS:
            advance = settings.progress(f"{ARMS[arm]}, seed {seed}", config["steps"])
            model = cnn((8, 8), split.num_classes, config["channels"], norm=arm, seed=seed)
            history = train(model, split, steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                            momentum=config["momentum"], seed=seed, eval_every=config["eval_every"], on_step=advance)
            per_seed[arm].append({"seed": seed, **history.as_dict(), "steps_to_target": history.steps_to(
                config["target"])})
    ratios = [steps_ratio(p["steps_to_target"], b["steps_to_target"], config["steps"])
              for p, b in zip(per_seed["none"], per_seed["bn"], strict=True)]
    summary = {arm: {"final_accuracy": mean_std([r["final_accuracy"] for r in runs]),
                     "steps_to_target": mean_std([r["steps_to_target"] for r in runs])}
               for arm, runs in per_seed.items()}
    ratio = mean_std([value for value, _ in ratios])
    lower_bound = any(bound for _, bound in ratios)
    rows = [[ARMS[arm], fmt(summary[arm]["final_accuracy"]),
             fmt(summary[arm]["steps_to_target"], ".0f", missing=f"not within {config['steps']}")]
            for arm in ARMS]
    ratio_text = fmt(ratio, ".1f", missing="n/a") + (" (lower bound)" if lower_bound else "")
    rows[0].append("baseline")
    rows[1].append(ratio_text)
    return {
        "config": config,
        "per_seed": per_seed,
        "summary": summary,
        "ratio": {**ratio, "per_seed": [value for value, _ in ratios], "lower_bound": lower_bound},
        "table": {"columns": ["arm", "final test accuracy", f"steps to {config['target']:.0%}",
                              "steps ratio (without / with BN)"], "rows": rows},
        "measured": measured(summary, ratio, lower_bound, config),
    }


def measured(summary: dict, ratio: dict, lower_bound: bool, config: dict) -> str:
    """One sentence that says what the numbers show, whichever way they went.

    Examples:
        >>> s = {"none": {"final_accuracy": {"mean": 0.8}}, "bn": {"final_accuracy": {"mean": 0.97}}}
        >>> measured(s, {"mean": 4.0, "std": 1.0, "n": 3}, False, {"target": 0.9, "steps": 1000})
        'With BN the CNN reached 90% test accuracy in 4.0 ± 1.0x fewer steps (final 97.0% vs 80.0%).'
        >>> measured(s, {"mean": None, "std": None, "n": 0}, False, {"target": 0.9, "steps": 1000})
        'With BN the CNN did not reach 90% within 1000 steps in every seed; no ratio (final 97.0% vs 80.0%).'
    """
    finals = f"final {summary['bn']['final_accuracy']['mean']:.1%} vs {summary['none']['final_accuracy']['mean']:.1%}"
    if ratio["mean"] is None or ratio["n"] < len(ratio.get("values", [None] * ratio["n"])):
        return (f"With BN the CNN did not reach {config['target']:.0%} within {config['steps']} steps in every seed; "
                f"no ratio ({finals}).")
    bound = "at least " if lower_bound else ""
    if ratio["mean"] >= 1:
        verdict = f"{bound}{ratio['mean']:.1f} ± {ratio['std']:.1f}x fewer steps"
    else:
        verdict = f"{1 / ratio['mean']:.1f}x more steps (BN was slower here)"
    return f"With BN the CNN reached {config['target']:.0%} test accuracy in {verdict} ({finals})."


def plot(result: dict, path: Path) -> None:
    """Test accuracy vs training step for both arms (mean ± std over the seeds), with the target line."""
    fig, (ax,) = _plotting.figure(width=6.0, height=4.0)
    for arm, label in ARMS.items():
        steps, mean, std = _plotting.curves_mean_std([run["curve"] for run in result["per_seed"][arm]])
        _plotting.band(ax, steps, mean, std, label=label)
    target = result["config"]["target"]
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel("training steps (batches of 32)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right")
    ratio = result["ratio"]
    if ratio["mean"] is None:
        message = f"BN did not reach {target:.0%} in every seed"
    else:
        bound = "at least " if ratio["lower_bound"] else ""
        message = f"BN reaches {target:.0%} in {bound}{ratio['mean']:.1f}x fewer steps"
    _plotting.save(fig, path, f"Small CNN on digits: {message} (mean ± std, {len(result['seeds'])} seeds)")
