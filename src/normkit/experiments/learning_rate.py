"""``normkit experiment learning-rate``: does batch norm tolerate higher learning rates?

The same ReLU MLP (three hidden layers of 100 units) on the digits, trained with plain SGD at every rate of a
log-spaced sweep, with and without a batch norm after each hidden linear layer. Both arms share the seed, the
initial linear weights and the exact sequence of batches. A rate is *stable* for an arm when no seed's loss became
non-finite and every seed ends above the accuracy threshold; the experiment reports the highest stable rate per arm.
The article's "30-50 % less training time" is measured as steps to a target accuracy: each arm at the rate that
reaches the target fastest on the validation part, compared on the test part per seed (the saving with its 95 % CI).
"""

from __future__ import annotations

from ..data import load_digits
from . import _sweep
from ._compare import mean_ci
from ._harness import Settings
from ._selection import carve, select_on_validation
from ._training import History, fmt, mlp, steps_to, train

NAME = "learning-rate"
TITLE = "the highest stable learning rate, with and without batch norm"
CLAIM = "Batch norm allows higher learning rates (which, the article says, can cut training time by 30-50%)."

HIDDEN = (100, 100, 100)
BATCH_SIZE = 64
THRESHOLD = 0.8
TARGET = 0.95
FULL = {"values": [0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], "steps": 600, "eval_every": 10}
QUICK = {"values": [0.1, 10.0], "steps": 20, "eval_every": 10}


def config(settings: Settings) -> dict:
    """Everything that defines the run: data, model, optimizer, sweep and the definition of "stable"."""
    sweep = QUICK if settings.quick else FULL
    return {"dataset": "digits (scikit-learn 8x8, pixels / 16; 1078 train / 269 validation / 450 test, split seed 0)",
            "model": f"MLP 64 -> {' -> '.join(map(str, HIDDEN))} -> 10, ReLU; with BN: BatchNorm1d after every hidden "
                     "linear layer, before the ReLU; torch default init",
            "optimizer": "SGD, no momentum, no weight decay, constant learning rate", "batch_size": BATCH_SIZE,
            **sweep, "swept": "learning rate", "threshold": THRESHOLD, "target": TARGET,
            "stable": f"a rate is stable for an arm when no seed's training loss became non-finite and every seed's "
                      f"final test accuracy (eval mode, after {sweep['steps']} steps) is at least {THRESHOLD:.0%}",
            "highest_stable": "the largest stable rate of the sweep, per arm",
            "best_rate": "the rate with the highest mean final validation accuracy, per arm (test accuracy reported)",
            "fastest_rate": f"the rate with the fewest mean validation steps to {TARGET:.0%}, per arm",
            "arms": {arm.name: arm.label for arm in _sweep.ARMS}}


def run(settings: Settings) -> dict:
    """Train both arms at every learning rate with every seed.

    Args:
        settings: quick or full, the seeds, the progress bar.

    Returns:
        The harness's ``config``, ``table``, ``measured``, plus ``runs`` (every seed's history), ``summary`` (per
        arm and rate) and ``derived`` (per arm: highest stable rate, best rate and its accuracy).
    """
    cfg = config(settings)
    split, validation = carve(load_digits())

    def run_one(arm: _sweep.Arm, lr: float, seed: int) -> History:
        model = mlp(split.num_features, split.num_classes, HIDDEN, norm=arm.norm, act="relu", seed=seed)
        return train(model, split, steps=cfg["steps"], batch_size=BATCH_SIZE, lr=lr, seed=seed,
                     eval_every=cfg["eval_every"])

    runs = _sweep.run_sweep(settings, cfg["values"], run_one, "learning-rate sweep")
    summary = {arm: [_sweep.summarize(per_seed, THRESHOLD, TARGET) for per_seed in per_value]
               for arm, per_value in runs.items()}
    derived = {arm: derive(cfg["values"], summaries) for arm, summaries in summary.items()}
    table = _sweep.table(cfg["values"], summary, "learning rate")
    highest = "; ".join(f"{arm.label} {_rate(derived[arm.name]['highest_stable'])}" for arm in _sweep.ARMS)
    speed = time_to_target(cfg["values"], runs, cfg)
    table["note"] = (f"Final test and validation accuracy over {cfg['steps']} SGD steps, evaluated every "
                     f"{cfg['eval_every']}. A seed that failed (below {THRESHOLD:.0%}) at a low rate was too slow for "
                     f"the step budget, at a high rate unstable. Highest stable rate: {highest}. Time to "
                     f"{TARGET:.0%}: {speed_text(speed)}.")
    return {"config": cfg, "validation": validation, "table": table,
            "measured": measured(derived, cfg["values"]) + f" Time to {TARGET:.0%}: {speed_text(speed)}.",
            "derived": derived, "time_to_target": speed, "summary": summary, "runs": runs}


def time_to_target(values: list[float], runs: dict, cfg: dict) -> dict:
    """Each arm at the rate that reaches the target fastest on validation; the test steps per seed and BN's saving.

    The saving per seed is ``1 - steps with BN / steps without`` (a seed whose plain arm never reached the target
    counts the whole budget, so its saving is a lower bound); reported as a mean with its 95 % CI.
    """
    chosen = {arm: select_on_validation(values, runs[arm], target=cfg["target"]) for arm in runs}
    steps = {arm: [steps_to(run, cfg["target"]) for run in runs[arm][chosen[arm]["index"]]] for arm in runs}
    plain = [cfg["steps"] if s is None else s for s in steps["plain"]]
    saving = mean_ci([None if b is None else 1 - b / p for p, b in zip(plain, steps["batchnorm"], strict=True)])
    return {"chosen": chosen, "test_steps": steps, "saving": {**saving, "verdict": (
        "none" if saving["ci95"] is None or saving["ci95"][0] <= 0 <= saving["ci95"][1] else
        "first" if saving["ci95"][0] > 0 else "second")}, "lower_bound": None in steps["plain"]}


def speed_text(speed: dict) -> str:
    """The time-to-target finding, against the article's 30-50 %.

    Examples:
        >>> speed = {"chosen": {"plain": {"value": 0.3}, "batchnorm": {"value": 1.0}},
        ...          "test_steps": {"plain": [200, 180, 220], "batchnorm": [60, 50, 70]}, "lower_bound": False,
        ...          "saving": {"mean": 0.70, "ci95": [0.62, 0.78], "verdict": "first"}}
        >>> print(speed_text(speed))  # doctest: +NORMALIZE_WHITESPACE
        each arm at its fastest rate on validation (0.3 without BN, 1 with), BN needed 60 test steps vs 200, a saving
        of 70% (95% CI 62% to 78%), more than the article's 30-50%
    """
    saving = speed["saving"]
    lrs = f"{speed['chosen']['plain']['value']:g} without BN, {speed['chosen']['batchnorm']['value']:g} with"
    means = {arm: fmt(mean_ci(steps), ".0f").split(" ± ")[0] for arm, steps in speed["test_steps"].items()}
    head = f"each arm at its fastest rate on validation ({lrs}), BN needed {means['batchnorm']} test steps vs " \
           f"{means['plain']}"
    if saving["mean"] is None:
        return head + "; no seed pair to compare"
    if saving["ci95"] is None:
        return head + f", a saving of {saving['mean']:.0%} (one seed, no CI)"
    low, high = saving["ci95"]
    text = f"{saving['mean']:.0%} (95% CI {low:.0%} to {high:.0%})" + (" or more" if speed["lower_bound"] else "")
    if saving["verdict"] == "none":
        return head + f": no saving detected ({text})"
    if saving["verdict"] == "second":
        return head + f": BN took longer ({text} saving)"
    where = ("within the article's 30-50%" if low >= 0.3 and high <= 0.5 else
             "more than the article's 30-50%" if low > 0.5 else
             "less than the article's 30-50%" if high < 0.3 else "overlapping the article's 30-50%")
    return head + f", a saving of {text}, {where}"


def derive(values: list[float], summaries: list[dict]) -> dict:
    """Per arm: the highest stable rate and the rate with the best mean final accuracy.

    Examples:
        >>> ok = {"final_accuracy": {"mean": 0.9, "values": [0.9]}, "final_val_accuracy": {"values": [0.91]},
        ...       "reliable": True, "outcomes": ["trained"]}
        >>> bad = {"final_accuracy": {"mean": 0.1, "values": [0.1]}, "final_val_accuracy": {"values": [0.1]},
        ...        "reliable": False, "outcomes": ["failed"]}
        >>> derive([0.1, 1.0], [ok, bad])["highest_stable"]
        0.1
    """
    best, best_summary = _sweep.best_value(values, summaries)
    return {"highest_stable": _sweep.highest_reliable(values, [s["reliable"] for s in summaries]),
            "best_rate": best, "best_final_accuracy": best_summary["final_accuracy"]}


def _rate(value: float | None) -> str:
    return "none in the sweep" if value is None else f"lr={value:g}"


def measured(derived: dict, values: list[float]) -> str:
    """The one-sentence verdict, computed from the derived numbers whichever way they went.

    Args:
        derived: ``{"plain": derive(...), "batchnorm": derive(...)}``.
        values: the swept rates (to tell when a stable rate is the top of the sweep).

    Returns:
        A sentence naming both highest stable rates, whether that agrees with the article, and the best accuracies.
    """
    plain, bn = derived["plain"]["highest_stable"], derived["batchnorm"]["highest_stable"]

    def limit(rate: float | None) -> str:
        top = " (the top of the sweep, so the true limit is higher)" if rate == max(values) else ""
        return _rate(rate) + top

    if bn is None and plain is None:
        verdict = "neither arm trained stably at any rate of the sweep, so the data cannot test the claim"
    elif bn is None:
        verdict = f"only the arm without BN trained stably (up to {_rate(plain)}), contrary to the article"
    elif plain is None:
        verdict = f"only the arm with BN trained stably (up to {limit(bn)}), in line with the article"
    elif bn > plain:
        verdict = (f"the highest stable learning rate was {limit(bn)} with BN vs {limit(plain)} without, "
                   f"{bn / plain:g}x higher, in line with the article")
    elif bn == plain:
        verdict = (f"the highest stable learning rate was the same with and without BN ({limit(bn)}), "
                   "so the data does not show the higher rates the article claims")
    else:
        verdict = (f"the highest stable learning rate was {limit(bn)} with BN vs {limit(plain)} without, "
                   "lower with BN, contrary to the article")
    best = "; ".join(f"{label} lr={derived[arm]['best_rate']:g} (final test accuracy "
                     f"{fmt(derived[arm]['best_final_accuracy'])})"
                     for arm, label in (("plain", "without BN"), ("batchnorm", "with BN")))
    return f"With plain SGD {verdict}; best rate on validation {best}."


def plot(result: dict, path) -> None:
    """Final test accuracy against the learning rate (log x), with and without BN, mean ± std over the seeds."""
    derived = result["derived"]
    title = (f"Highest stable learning rate: {_rate(derived['batchnorm']['highest_stable'])} with BN, "
             f"{_rate(derived['plain']['highest_stable'])} without")
    _sweep.plot_sweep(result, path, xlabel="learning rate (plain SGD, log scale)",
                      title=f"{title}\n(MLP on digits, mean ± std over {len(result['seeds'])} seeds)")
