"""``normkit experiment convergence``: does batch norm reach a target accuracy in fewer steps, each arm tuned?

A small CNN on the 8x8 digits, trained with and without batch norm after every convolution: same seeds, same initial
convolution weights, same batches. Each arm trains at every learning rate of one grid; the rate of each arm is chosen
on the validation part (fewest validation steps to the target, then final validation accuracy), and the chosen arms
are compared on the test part: steps to the target (a ratio with its 95 % CI) and final accuracy (a difference with
its CI, which tests the article's "2-5 % higher accuracy"). The shared-rate comparison of the same runs is reported
beside it, to show how an untuned baseline inflates the ratio.
"""

from __future__ import annotations

from pathlib import Path

from ..data import load_digits
from . import _plotting
from ._compare import describe, describe_ratio, paired_difference, paired_ratio
from ._harness import Settings
from ._selection import carve, select_on_validation
from ._training import cnn, fmt, mean_std, steps_to, train

NAME = "convergence"
TITLE = "steps to a target accuracy, with and without batch norm"
CLAIM = ("Batch norm trains faster: the same network reaches the same accuracy in far fewer steps (the original paper: "
         "14x fewer on ImageNet), and ends 2-5 % more accurate.")
ARMS = {"none": "without BN", "bn": "with BN"}
FULL = {"lrs": [0.02, 0.05, 0.1, 0.2, 0.4, 0.8], "steps": 800, "eval_every": 25, "shared_lr": 0.02}
QUICK = {"lrs": [0.05, 0.2], "steps": 30, "eval_every": 10, "shared_lr": 0.05}
CONFIG = {"dataset": "sklearn digits 8x8 (1078 train / 269 validation / 450 test), pixels / 16", "channels": [16, 32],
          "model": "conv3x3(16) -> [BN] -> ReLU -> conv3x3 stride 2 (32) -> [BN] -> ReLU -> global avg pool -> linear",
          "optimizer": "SGD", "momentum": 0.9, "batch_size": 32, "target": 0.9}


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


def compare(plain_runs: list[dict], bn_runs: list[dict], config: dict) -> dict:
    """Test-set comparison of two arms (one run dict per seed each): steps to the target and final accuracy.

    A seed where the plain arm never reached the target counts the whole budget (the ratio is then a lower bound);
    a seed where BN never reached it drops out of the ratio.
    """
    target, steps = config["target"], config["steps"]
    plain_steps = [steps_to(run, target) for run in plain_runs]
    bn_steps = [steps_to(run, target) for run in bn_runs]
    lower_bound = any(p is None and b is not None for p, b in zip(plain_steps, bn_steps, strict=True))
    ratio = paired_ratio([steps if p is None else p for p in plain_steps], bn_steps)
    return {"steps_to_target": {"none": mean_std(plain_steps), "bn": mean_std(bn_steps)},
            "final_accuracy": {"none": mean_std([r["final_accuracy"] for r in plain_runs]),
                               "bn": mean_std([r["final_accuracy"] for r in bn_runs])},
            "ratio": {**ratio, "lower_bound": lower_bound},
            "accuracy_gain": paired_difference([r["final_accuracy"] for r in bn_runs],
                                               [r["final_accuracy"] for r in plain_runs])}


def run(settings: Settings) -> dict:
    """Train both arms at every learning rate for every seed; see the module docstring."""
    schedule = QUICK if settings.quick else FULL
    config = {**CONFIG, **schedule}
    split, validation = carve(load_digits())
    runs: dict[str, list[list[dict]]] = {arm: [] for arm in ARMS}
    for arm in ARMS:
        for lr in config["lrs"]:
            advance = settings.progress(f"{ARMS[arm]}, lr {lr:g}", config["steps"] * len(settings.seeds))
            per_seed = []
            for index, seed in enumerate(settings.seeds):
                model = cnn((8, 8), split.num_classes, config["channels"], norm=arm, seed=seed)
                history = train(model, split, steps=config["steps"], batch_size=config["batch_size"], lr=lr,
                                momentum=config["momentum"], seed=seed, eval_every=config["eval_every"],
                                on_step=lambda step, _i=index, _a=advance: _a(_i * config["steps"] + step))
                per_seed.append({"seed": seed, "lr": lr, **history.as_dict()})
            runs[arm].append(per_seed)
    per_arm_lr = {arm: select_on_validation(config["lrs"], runs[arm], target=config["target"]) for arm in ARMS}
    tuned = compare(runs["none"][per_arm_lr["none"]["index"]], runs["bn"][per_arm_lr["bn"]["index"]], config)
    shared_index = config["lrs"].index(config["shared_lr"])
    shared = compare(runs["none"][shared_index], runs["bn"][shared_index], config)
    per_seed = {arm: runs[arm][per_arm_lr[arm]["index"]] for arm in ARMS}
    return {"config": config, "validation": validation, "per_arm_lr": per_arm_lr, "per_seed": per_seed,
            "runs": runs, "tuned": tuned, "shared_lr": shared, "ratio": tuned["ratio"],
            "table": table(tuned, shared, per_arm_lr, config),
            "measured": measured(tuned, shared, per_arm_lr, config)}


def table(tuned: dict, shared: dict, per_arm_lr: dict, config: dict) -> dict:
    """Rows: each arm at its validation-chosen rate, then both at the shared rate."""
    edges = [ARMS[arm] for arm in ARMS if per_arm_lr[arm]["index"] in (0, len(config["lrs"]) - 1)]
    edge = f" The rate chosen {' and '.join(edges)} lies at the grid's edge." if edges else ""
    rows = []
    for label, comparison, lrs in (("each at its best lr", tuned, {a: per_arm_lr[a]["value"] for a in ARMS}),
                                   ("same lr for both", shared, dict.fromkeys(ARMS, config["shared_lr"]))):
        for arm in ARMS:
            row = [f"{ARMS[arm]}, {label}", f"{lrs[arm]:g}", fmt(comparison["final_accuracy"][arm]),
                   fmt(comparison["steps_to_target"][arm], ".0f", missing=f"not within {config['steps']}")]
            if arm == "none":
                row += ["baseline", "baseline"]
            else:
                bound = " (lower bound)" if comparison["ratio"]["lower_bound"] else ""
                row += [describe_ratio(comparison["ratio"]) + bound, describe(comparison["accuracy_gain"])]
            rows.append(row)
    return {"columns": ["arm", "learning rate", "final test accuracy", f"test steps to {config['target']:.0%}",
                        "steps ratio (without / with BN)", "accuracy gain of BN (paired)"], "rows": rows,
            "note": (f"Learning rates from {', '.join(f'{lr:g}' for lr in config['lrs'])}, chosen per arm on the "
                     "validation part (fewest validation steps to the target, then final validation accuracy); the "
                     "test part only reports. The shared-rate rows reuse the same runs at lr "
                     f"{config['shared_lr']:g}. Ratios are geometric means over the seeds with a 95 % t interval on "
                     f"the log scale; {config['steps']} SGD steps, evaluated every {config['eval_every']}.{edge}")}


def measured(tuned: dict, shared: dict, per_arm_lr: dict, config: dict) -> str:
    """One sentence: the tuned ratio and accuracy gain with their CIs, set against the article and the shared rate.

    Examples:
        >>> arm = lambda a: {"final_accuracy": {"none": {"mean": 0.96}, "bn": {"mean": 0.98}}}
        >>> tuned = {**arm(0), "ratio": {"mean": 2.3, "ci95": [1.8, 2.9], "n": 3, "verdict": "first",
        ...          "lower_bound": False}, "accuracy_gain": {"mean": 0.014, "ci95": [0.01, 0.018], "verdict": "first"}}
        >>> shared = {**arm(0), "ratio": {"mean": 6.5, "ci95": [4.0, 10.0], "n": 3, "verdict": "first",
        ...           "lower_bound": False}, "accuracy_gain": {"mean": 0.03, "ci95": [0.0, 0.06], "verdict": "none"}}
        >>> lrs = {"none": {"value": 0.2}, "bn": {"value": 0.1}}
        >>> measured(tuned, shared, lrs, {"target": 0.9, "shared_lr": 0.02})  # doctest: +NORMALIZE_WHITESPACE
        'Each arm at its validation-chosen learning rate (0.2 without BN, 0.1 with), BN reached 90% test accuracy in
        2.3x (95% CI 1.8-2.9x) fewer steps and ended +1.4 points (95% CI +1.0 to +1.8) more accurate (final 98.0%
        vs 96.0%): faster, as the article says, and below its 2-5 % gain. With both arms at lr 0.02 the ratio would
        read 6.5x: an untuned baseline inflates it.'
    """
    lrs = f"{per_arm_lr['none']['value']:g} without BN, {per_arm_lr['bn']['value']:g} with"
    ratio = tuned["ratio"]
    finals = (f"final {tuned['final_accuracy']['bn']['mean']:.1%} vs "
              f"{tuned['final_accuracy']['none']['mean']:.1%}")
    if ratio["mean"] is None:
        speed = f"BN did not reach {config['target']:.0%} in the seeds compared"
    elif ratio["verdict"] == "none":
        speed = f"the steps to {config['target']:.0%} differed by no detectable factor ({describe_ratio(ratio)})"
    elif ratio["mean"] >= 1:
        bound = "at least " if ratio["lower_bound"] else ""
        speed = f"BN reached {config['target']:.0%} test accuracy in {bound}{describe_ratio(ratio)} fewer steps"
    else:
        speed = f"BN needed {1 / ratio['mean']:.1f}x more steps to {config['target']:.0%} ({describe_ratio(ratio)})"
    gain = tuned["accuracy_gain"]
    if gain["verdict"] == "none":
        accuracy = f"its final accuracy differed by {describe(gain)} ({finals})"
    else:
        direction = "more" if gain["mean"] > 0 else "less"
        accuracy = f"ended {describe(gain)} {direction} accurate ({finals})"
    low, high = (None, None) if gain.get("ci95") is None else (100 * gain["ci95"][0], 100 * gain["ci95"][1])
    if low is not None and low >= 2 and high <= 5:
        claim = "within the article's 2-5 % gain"
    elif high is not None and high < 2:
        claim = "below its 2-5 % gain"
    elif low is not None and low > 5:
        claim = "above its 2-5 % gain"
    else:
        claim = "the interval overlaps the article's 2-5 % without settling it"
    faster = "faster, as the article says" if ratio["verdict"] == "first" else "not detectably faster"
    text = f"Each arm at its validation-chosen learning rate ({lrs}), {speed} and {accuracy}: {faster}, and {claim}."
    if shared["ratio"]["mean"] is not None and ratio["mean"] is not None:
        bound = "at least " if shared["ratio"]["lower_bound"] else ""
        text += (f" With both arms at lr {config['shared_lr']:g} the ratio would read {bound}"
                 f"{shared['ratio']['mean']:.1f}x"
                 + (": an untuned baseline inflates it." if shared["ratio"]["mean"] > ratio["mean"] else "."))
    return text


def plot(result: dict, path: Path) -> None:
    """Test accuracy vs training step for both arms at their chosen rates (mean ± std over the seeds)."""
    fig, (ax,) = _plotting.figure(width=6.4, height=4.2)
    for arm, label in ARMS.items():
        steps, mean, std = _plotting.curves_mean_std([run["curve"] for run in result["per_seed"][arm]])
        lr = result["per_arm_lr"][arm]["value"]
        _plotting.band(ax, steps, mean, std, label=f"{label} (lr {lr:g}, chosen on validation)")
    target = result["config"]["target"]
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel(f"training steps (batches of {result['config']['batch_size']})")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right", fontsize=8)
    ratio = result["ratio"]
    if ratio["mean"] is None:
        message = f"BN did not reach {target:.0%} in every seed"
    else:
        bound = "at least " if ratio["lower_bound"] else ""
        message = f"each arm at its best lr, BN reaches {target:.0%} in {bound}{ratio['mean']:.1f}x fewer steps"
    _plotting.save(fig, path, f"Small CNN on digits: {message} ({len(result['seeds'])} seeds)")
