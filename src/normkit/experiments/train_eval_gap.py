"""``normkit experiment train-eval-gap``: how much accuracy the EMA running statistics cost, by momentum, schedule
and training length.

A BN CNN on the 8x8 digits is trained at batch size 32 with SGD, under a constant learning rate and under cosine
decay, for 400 and for 1200 steps. At a few checkpoints the current weights are evaluated three ways, each on its own
copy so that nothing in the trained model moves:

- ``running``: eval mode with the running (EMA) statistics, what ``model.eval()`` gives, for every BN momentum;
- ``precise``: eval mode after precise-BN recalibration (:func:`normkit.tools.recalibrate`) over the training part,
  i.e. the exact population statistics of the current weights;
- ``batch``: training-mode forward over test batches of the training batch size (batch statistics, as in training).

Training never reads the running statistics, so the weights do not depend on the momentum: one run per seed,
schedule and length serves every momentum. A hook on each BN layer records the batch statistics of every training
step and keeps one EMA per momentum, with torch's update rule (``running = (1 - m) * running + m * batch``, unbiased
variance); the ``running`` evaluation loads each momentum's EMA into a copy. Under a constant rate the 400-step
numbers are the 1200-step run's checkpoint at 400 (the same trajectory); cosine decay needs its own run per length.
"""

from __future__ import annotations

import copy
import statistics
from collections.abc import Callable

import torch
from torch import nn

from ..data import Split, load_digits
from ..tools import recalibrate
from ._compare import describe, mean_ci, paired_difference
from ._harness import Settings
from ._selection import carve
from ._training import accuracy, cnn, fmt, mean_std, train

NAME = "train-eval-gap"
TITLE = "Train/inference discrepancy: running statistics vs precise BN vs batch statistics"
CLAIM = ("BN behaves differently in training (batch statistics) and inference (moving averages), which can cause "
         "problems; the remedy is to train long enough for the moving statistics to settle, with a Keras momentum of "
         "0.9-0.99 (torch 0.1-0.01).")
SEEDS = 8
METHODS = ("running", "precise", "batch")
LABELS = {"running": "eval, running statistics (EMA)", "precise": "eval after precise-BN recalibration",
          "batch": "batch statistics at test time (batches of 32)"}
SCHEDULES = ("constant", "cosine")
FULL = {"momenta": (0.01, 0.03, 0.1, 0.3, 0.9), "lengths": (400, 1200),
        "checkpoints": (10, 25, 50, 100, 200, 400, 800, 1200), "cosine_checkpoints": (100, 400, 1200),
        "recalibration_batches": None}
QUICK = {"momenta": (0.1, 0.9), "lengths": (4, 8), "checkpoints": (2, 4, 8), "cosine_checkpoints": (4, 8),
         "recalibration_batches": 4}
CHANNELS = (16, 32)
BATCH_SIZE = 32
LR = 0.1
SGD_MOMENTUM = 0.9
RECOMMENDED = (0.01, 0.1)  # the article's Keras momentum 0.9-0.99, in torch's convention
DEFAULT = 0.1  # torch's default momentum: the sentences lead with it


class EmaBank:
    """The running statistics that every momentum in ``momenta`` would have given, from one training run.

    A forward pre-hook on each batch norm of ``model`` reads the input of every training-mode forward of that very
    module (copies made for evaluation do not count) and updates one EMA per momentum with torch's rule.
    """

    def __init__(self, model: nn.Module, momenta: tuple[float, ...]) -> None:
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
        self.state = {m: {name: (torch.zeros_like(layer.running_mean), torch.ones_like(layer.running_var))
                          for name, layer in self.layers.items()} for m in momenta}
        self.handles = [layer.register_forward_pre_hook(self._hook(name, layer)) for name, layer in self.layers.items()]

    def _hook(self, name: str, original: nn.Module) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            if module is not original or not module.training:
                return
            x = args[0].detach()
            dims = [d for d in range(x.dim()) if d != 1]
            mean, var = x.mean(dims), x.var(dims, unbiased=True)
            for momentum, layers in self.state.items():
                running_mean, running_var = layers[name]
                layers[name] = ((1 - momentum) * running_mean + momentum * mean,
                                (1 - momentum) * running_var + momentum * var)
        return hook

    def loaded(self, model: nn.Module, momentum: float) -> nn.Module:
        """A deep copy of ``model`` whose batch norms hold the running statistics of ``momentum``."""
        clone = copy.deepcopy(model)
        for name, module in clone.named_modules():
            if name in self.layers:
                module.running_mean.copy_(self.state[momentum][name][0])
                module.running_var.copy_(self.state[momentum][name][1])
        return clone

    def remove(self) -> None:
        """Detach the hooks."""
        for handle in self.handles:
            handle.remove()


def evaluate(model: nn.Module, bank: EmaBank, split: Split, batch_size: int,
             recalibration_batches: int | None = None) -> dict:
    """Test accuracy of ``model``'s current weights: running statistics per momentum, recalibrated, batch statistics.

    ``model`` (weights, buffers, mode) is left exactly as it was: every evaluation runs on a deep copy.

    Returns:
        ``{"running": {momentum: acc}, "precise": acc, "batch": acc}`` (momenta as strings, for JSON).
    """
    running = {str(m): accuracy(bank.loaded(model, m), split.x_test, split.y_test) for m in bank.state}
    recalibrated = recalibrate(copy.deepcopy(model), list(split.x_train.split(batch_size)),
                               num_batches=recalibration_batches)
    precise = accuracy(recalibrated, split.x_test, split.y_test)
    batch = accuracy(copy.deepcopy(model), split.x_test, split.y_test, training=True, batch_size=batch_size)
    return {"running": running, "precise": precise, "batch": batch}


def train_and_evaluate(split: Split, seed: int, schedule: str, steps: int, setup: dict,
                       advance: Callable[[int], None]) -> dict:
    """One training run; every checkpoint up to ``steps`` evaluated three ways (every momentum for ``running``)."""
    model = cnn((8, 8), 10, CHANNELS, norm="bn", seed=seed)
    bank = EmaBank(model, setup["momenta"])
    every = setup["checkpoints"] if schedule == "constant" else setup["cosine_checkpoints"]
    checkpoints = [c for c in every if c <= steps]
    points: list[dict] = []

    def on_step(step: int) -> None:
        if step in checkpoints:
            points.append({"step": step, **evaluate(model, bank, split, BATCH_SIZE, setup["recalibration_batches"])})
        advance(step)

    train(model, split, steps=steps, batch_size=BATCH_SIZE, lr=LR, seed=seed, momentum=SGD_MOMENTUM,
          eval_every=steps, on_step=on_step, schedule=schedule)
    bank.remove()
    return {"schedule": schedule, "steps": steps, "points": points}


def gap_at(run: dict, step: int, momentum: float) -> float:
    """Precise-BN minus running-statistics test accuracy, in points, at checkpoint ``step``."""
    point = next(p for p in run["points"] if p["step"] == step)
    return 100 * (point["precise"] - point["running"][str(momentum)])


def at(run: dict, step: int) -> dict:
    """The evaluation at checkpoint ``step`` of a run."""
    return next(p for p in run["points"] if p["step"] == step)


def cells(per_seed: list[dict], setup: dict) -> list[dict]:
    """Every (schedule, length) the experiment reports, with the run and checkpoint that give it, per seed."""
    out = []
    for schedule in SCHEDULES:
        for length in setup["lengths"]:
            key = f"constant-{max(setup['lengths'])}" if schedule == "constant" else f"cosine-{length}"
            out.append({"schedule": schedule, "steps": length, "runs": [seed["runs"][key] for seed in per_seed]})
    return out


def summarize(per_seed: list[dict], setup: dict) -> dict:
    """Per schedule and length: each method's end accuracy and, per momentum, the end gap (mean and 95 % CI)."""
    summary: dict = {schedule: {} for schedule in SCHEDULES}
    for cell in cells(per_seed, setup):
        step, runs = cell["steps"], cell["runs"]
        summary[cell["schedule"]][str(step)] = {
            "precise": mean_std([at(run, step)["precise"] for run in runs]),
            "batch": mean_std([at(run, step)["batch"] for run in runs]),
            "running": {str(m): mean_std([at(run, step)["running"][str(m)] for run in runs])
                        for m in setup["momenta"]},
            "gap": {str(m): mean_ci([gap_at(run, step, m) for run in runs]) for m in setup["momenta"]}}
    return summary


def momentum_comparison(per_seed: list[dict], setup: dict, schedule: str, length: int) -> dict:
    """The momentum with the smallest mean end gap, and its paired difference to torch's default 0.1."""
    runs = next(c["runs"] for c in cells(per_seed, setup) if c["schedule"] == schedule and c["steps"] == length)
    gaps = {m: [gap_at(run, length, m) for run in runs] for m in setup["momenta"]}
    smallest = min(setup["momenta"], key=lambda m: abs(statistics.fmean(gaps[m])))
    reference = DEFAULT if DEFAULT in setup["momenta"] else setup["momenta"][0]
    return {"smallest": smallest, "reference": reference,
            "difference": paired_difference(gaps[reference], gaps[smallest])}


def shrinking(per_seed: list[dict], setup: dict, momentum: float) -> list[dict]:
    """The constant-rate gap of ``momentum`` at every checkpoint of the long run (mean and 95 % CI)."""
    key = f"constant-{max(setup['lengths'])}"
    steps = [p["step"] for p in per_seed[0]["runs"][key]["points"]]
    return [{"step": step, **mean_ci([gap_at(seed["runs"][key], step, momentum) for seed in per_seed])}
            for step in steps]


def gap_text(stat: dict) -> str:
    """A gap (points) with its 95 % CI, saying when the interval includes zero.

    Examples:
        >>> gap_text({"mean": 1.7, "ci95": [-0.1, 3.5], "verdict": "none"})
        '+1.7 points (95% CI -0.1 to +3.5, indistinguishable from zero)'
        >>> gap_text({"mean": 5.3, "ci95": [3.0, 7.6], "verdict": "first"})
        '+5.3 points (95% CI +3.0 to +7.6)'
    """
    if stat.get("ci95") is None:
        return f"{stat['mean']:+.1f} points (one seed, no CI)"
    low, high = stat["ci95"]
    zero = ", indistinguishable from zero" if stat["verdict"] == "none" else ""
    return f"{stat['mean']:+.1f} points (95% CI {low:+.1f} to {high:+.1f}{zero})"


def trend_text(trend: list[dict], tolerance: float = 0.5) -> str:
    """How the constant-rate gap moves over the checkpoints from step 50 on: its path, where it peaks, whether it
    shrinks after the peak (each step at most ``tolerance`` points above the one before), and from which step on
    every interval includes zero.

    Examples:
        >>> ci = lambda m, low, high: {"mean": m, "ci95": [low, high],
        ...                            "verdict": "none" if low <= 0 <= high else "first"}
        >>> trend = [{"step": 50, **ci(11.0, 5, 17)}, {"step": 100, **ci(12.0, 6, 18)}, {"step": 400, **ci(1.7, -0.1,
        ...          3.5)}, {"step": 1200, **ci(0.1, -0.3, 0.4)}]
        >>> print(trend_text(trend))  # doctest: +NORMALIZE_WHITESPACE
        Under the constant rate the mean gap goes +11.0 → +12.0 → +1.7 → +0.1 points at steps 50, 100, 400, 1200:
        it peaks at step 100 and shrinks after it, indistinguishable from zero from step 400 on.
    """
    shown = [point for point in trend if point["step"] >= 50] or list(trend)
    path = " → ".join(f"{p['mean']:+.1f}" for p in shown)
    peak = max(range(len(shown)), key=lambda i: shown[i]["mean"])
    after = [p["mean"] for p in shown[peak:]]
    shrinks = all(b <= a + tolerance for a, b in zip(after, after[1:], strict=False)) and after[-1] < after[0]
    zero_from = next((shown[i]["step"] for i in range(len(shown))
                      if all(p["verdict"] == "none" for p in shown[i:])), None)
    shape = (f"it peaks at step {shown[peak]['step']} and shrinks after it" if shrinks and peak < len(shown) - 1 else
             f"it peaks at step {shown[peak]['step']} and does not shrink steadily after it")
    zero = (f", indistinguishable from zero from step {zero_from} on" if zero_from is not None else
            ", still above zero at the end")
    return (f"Under the constant rate the mean gap goes {path} points at steps "
            f"{', '.join(str(p['step']) for p in shown)}: {shape}{zero}.")


def measured_sentence(summary: dict, comparisons: dict, trend: list[dict], setup: dict) -> str:
    """One sentence: the gap at torch's default momentum per schedule and length, how it moves with training, and
    which momentum gives the smallest end gap per schedule, all with 95 % CIs.

    Examples:
        >>> ci = lambda mean, low, high: {"mean": mean, "ci95": [low, high], "verdict": "none" if low <= 0 <= high
        ...                                else "first"}
        >>> summary = {"constant": {"400": {"gap": {"0.1": ci(5.3, 3.0, 7.6)}},
        ...                         "1200": {"gap": {"0.1": ci(2.0, 0.5, 3.5)}}},
        ...            "cosine": {"400": {"gap": {"0.1": ci(0.2, -0.3, 0.7)}},
        ...                       "1200": {"gap": {"0.1": ci(0.1, -0.2, 0.4)}}}}
        >>> comparisons = {"constant": {"smallest": 0.9, "reference": 0.1, "difference": ci(5.0, 2.0, 8.0)},
        ...                "cosine": {"smallest": 0.1, "reference": 0.1, "difference": ci(0.0, 0.0, 0.0)}}
        >>> trend = [{"step": 100, **ci(4.2, 2.0, 6.4)}, {"step": 400, **ci(5.3, 3.0, 7.6)},
        ...          {"step": 1200, **ci(2.0, 0.5, 3.5)}]
        >>> print(measured_sentence(summary, comparisons, trend, {"lengths": (400, 1200)}))
        ... # doctest: +NORMALIZE_WHITESPACE
        At torch momentum 0.1 (Keras 0.9) the gap (precise BN minus running statistics) is +5.3 points (95% CI +3.0
        to +7.6) after 400 steps and +2.0 points (95% CI +0.5 to +3.5) after 1200 under a constant learning rate;
        under cosine decay it is +0.2 points (95% CI -0.3 to +0.7, indistinguishable from zero) after 400 and +0.1
        points (95% CI -0.2 to +0.4, indistinguishable from zero) after 1200: decaying the rate closes the gap,
        whatever the momentum. Under the constant rate the mean gap goes +4.2 → +5.3 → +2.0 points at steps 100,
        400, 1200: it peaks at step 400 and shrinks after it, still above zero at the end. Smallest end gap:
        constant at momentum 0.9 (Keras 0.1; vs 0.1: +5.0 points (95% CI +2.0 to +8.0)), outside the article's Keras
        0.9-0.99; cosine at 0.1.
    """
    short, long = min(setup["lengths"]), max(setup["lengths"])
    lead = str(DEFAULT)

    def gap(schedule: str, length: int) -> str:
        return gap_text(summary[schedule][str(length)]["gap"][lead])

    closed = all(summary["cosine"][str(n)]["gap"][lead]["verdict"] == "none" for n in (short, long))
    open_ = any(summary["constant"][str(n)]["gap"][lead]["verdict"] != "none" for n in (short, long))
    lesson = (": decaying the rate closes the gap, whatever the momentum" if closed and open_ else
              ": the gap stays under cosine decay as well" if not closed else "")
    text = (f"At torch momentum {lead} (Keras {1 - DEFAULT:g}) the gap (precise BN minus running statistics) is "
            f"{gap('constant', short)} after {short} steps and {gap('constant', long)} after {long} under a constant "
            f"learning rate; under cosine decay it is {gap('cosine', short)} after {short} and "
            f"{gap('cosine', long)} after {long}{lesson}.")
    text += " " + trend_text(trend)
    parts = []
    for schedule, comparison in comparisons.items():
        smallest = comparison["smallest"]
        inside = "inside" if RECOMMENDED[0] <= smallest <= RECOMMENDED[1] else "outside"
        if smallest == comparison["reference"]:
            parts.append(f"{schedule} at {smallest:g}")
        else:
            parts.append(f"{schedule} at momentum {smallest:g} (Keras {1 - smallest:g}; vs "
                         f"{comparison['reference']:g}: {describe(comparison['difference'], scale=1)}), {inside} the "
                         "article's Keras 0.9-0.99")
    return text + " Smallest end gap: " + "; ".join(parts) + "."


def run(settings: Settings) -> dict:
    """Train per seed one constant-rate run (the longest length) and one cosine run per length, evaluating every
    checkpoint three ways; see the module docstring."""
    setup = QUICK if settings.quick else FULL
    split, validation = carve(load_digits())
    lengths = setup["lengths"]
    plan = [("constant", max(lengths)), *(("cosine", n) for n in lengths)]
    total = len(settings.seeds) * sum(n for _, n in plan)
    advance = settings.progress(f"{NAME}: {len(plan)} runs per seed", total)
    per_seed, done = [], 0
    for seed in settings.seeds:
        runs = {}
        for schedule, steps in plan:
            runs[f"{schedule}-{steps}"] = train_and_evaluate(
                split, seed, schedule, steps, setup, lambda step, _done=done: advance(_done + step))
            done += steps
        per_seed.append({"seed": seed, "runs": runs})
    summary = summarize(per_seed, setup)
    comparisons = {schedule: momentum_comparison(per_seed, setup, schedule, max(lengths)) for schedule in SCHEDULES}
    lead = DEFAULT if DEFAULT in setup["momenta"] else setup["momenta"][0]
    trend = shrinking(per_seed, setup, lead)
    config = {
        "data": "digits 8x8 (1078 train / 269 validation / 450 test)",
        "model": f"cnn((8, 8), 10, channels={list(CHANNELS)}, norm='bn'): conv3 -> BatchNorm2d -> ReLU per stage, "
                 "global average pool, linear",
        "momenta": list(setup["momenta"]), "lengths": list(lengths), "checkpoints": list(setup["checkpoints"]),
        "cosine_checkpoints": list(setup["cosine_checkpoints"]),
        "schedules": {"constant": f"SGD lr {LR} throughout", "cosine": f"SGD lr {LR} decayed to 0 by the last step"},
        "momentum_convention": "torch: running = (1 - m) * running + m * batch (unbiased variance); Keras = 1 - m",
        "batch_size": BATCH_SIZE, "optimizer": f"SGD, momentum {SGD_MOMENTUM}, no weight decay",
        "running_statistics": "one EMA per momentum from the batch statistics of every training step (forward "
                              "pre-hooks), loaded into a copy for evaluation; the weights do not depend on momentum",
        "precise_bn": f"normkit.tools.recalibrate over the training part in batches of {BATCH_SIZE} "
                      "(estimator='population')",
        "recalibration_batches": setup["recalibration_batches"] or "all",
        "batch_statistics": f"train-mode forward over the test set in batches of {BATCH_SIZE}, on a copy",
    }
    validation = {**validation, "used_for": "nothing is selected (learning rate and schedules fixed in advance); "
                                            "the test part only reports"}
    return {"config": config, "validation": validation, "table": table(summary, setup), "summary": summary,
            "cosine": summary["cosine"], "constant": summary["constant"], "momentum_comparison": comparisons,
            "trend": trend, "measured": measured_sentence(summary, comparisons, trend, setup), "per_seed": per_seed}


def table(summary: dict, setup: dict) -> dict:
    """One row per schedule, length and momentum."""
    rows = []
    for schedule in SCHEDULES:
        for length in setup["lengths"]:
            cell = summary[schedule][str(length)]
            for momentum in setup["momenta"]:
                key = str(momentum)
                rows.append([schedule, str(length), f"{momentum:g} (Keras {1 - momentum:g})",
                             fmt(cell["running"][key]), fmt(cell["precise"]), fmt(cell["batch"]),
                             describe(cell["gap"][key], scale=1)])
    return {"columns": ["schedule", "steps", "BN momentum (torch)", LABELS["running"], LABELS["precise"],
                        LABELS["batch"], "gap precise − running (points)"], "rows": rows,
            "note": "Test accuracy at the end of training (mean ± std over the seeds); the gap is precise-BN minus "
                    "running-statistics accuracy in points, mean over the seeds with its 95 % CI. Precise BN and "
                    "batch statistics do not depend on the momentum."}


def plot(result: dict, path) -> None:
    """Left: the end gap vs momentum per schedule and length (95 % CI bars); right: the gap at torch's default
    momentum vs step, constant vs cosine, for the longest length."""
    import numpy as np

    from ._plotting import band, figure, save

    config = result["config"]
    momenta, long = config["momenta"], max(config["lengths"])
    fig, (left, right) = figure(ncols=2, width=5.8, height=4.4)
    for schedule, style in zip(SCHEDULES, ("-", "--"), strict=True):
        for length, marker in zip(config["lengths"], ("o", "s"), strict=True):
            gaps = [result["summary"][schedule][str(length)]["gap"][str(m)] for m in momenta]
            mean = np.array([g["mean"] for g in gaps])
            low = np.array([g["mean"] - g["ci95"][0] if g["ci95"] else 0.0 for g in gaps])
            high = np.array([g["ci95"][1] - g["mean"] if g["ci95"] else 0.0 for g in gaps])
            left.errorbar(momenta, mean, yerr=[low, high], linestyle=style, marker=marker, capsize=3,
                          label=f"{schedule}, {length} steps")
    left.axhline(0.0, color="black", linewidth=0.8)
    left.set_xscale("log")
    left.set_xticks(momenta, [f"{m:g}" for m in momenta])
    left.minorticks_off()
    left.set_xlabel("BN momentum, torch convention (log scale)")
    left.set_ylabel("end gap: precise BN − running stats (points)")
    left.legend(fontsize=7)
    lead = str(DEFAULT) if DEFAULT in momenta else str(momenta[0])
    ticks = [p["step"] for p in result["per_seed"][0]["runs"][f"constant-{long}"]["points"]]
    for schedule in SCHEDULES:
        runs = [seed["runs"][f"{schedule}-{long}"] for seed in result["per_seed"]]
        steps = [p["step"] for p in runs[0]["points"]]
        values = np.array([[100 * (p["precise"] - p["running"][lead]) for p in run["points"]] for run in runs])
        std = values.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(len(steps))
        band(right, steps, values.mean(axis=0), std, label=f"{schedule} lr, momentum {lead}", marker=".")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xscale("log")
    right.set_xticks(ticks, [str(step) for step in ticks], fontsize=8)
    right.minorticks_off()
    right.set_xlabel("training step (log scale)")
    right.set_ylabel("gap: precise BN − running stats (points, ± std)")
    right.legend(fontsize=7)
    save(fig, path, f"What the EMA running statistics cost: by momentum, schedule and length "
                    f"({len(result['seeds'])} seeds)")
