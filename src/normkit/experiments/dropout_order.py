"""``normkit experiment dropout-order``: batch norm before or after dropout?

A wide MLP (three hidden layers of 256 ReLU units) on a small MNIST-1D training set (300 examples), a regime where
plain BN overfits and dropout can help, in four arms: no dropout (linear -> BN -> ReLU), BN before dropout
(linear -> BN -> ReLU -> dropout), BN after dropout (linear -> ReLU -> dropout -> BN), and Li et al.'s arm (2019): no
dropout between BN layers, one dropout only after the last BN block, before the output layer. All arms share the
seed, the initial linear weights, the batches, the optimizer and the learning rate. Each dropout arm runs at every
rate of a small grid and keeps the rate with the best mean final *validation* accuracy; the comparisons use the test
accuracy of each arm at its own chosen rate, paired by seed, with a 95 % CI.

The mechanism behind the article's rule is the *variance shift* (Li et al. 2019): in training, inverted dropout
inflates the variance of what follows it, so a BN layer fed by dropout stores a running variance that is too large
for inference, where dropout is off. We measure it directly: for every BN layer, the ratio of its stored running
variance to the variance of its actual input in eval mode on the test set (1 = no shift). We also report the eval
test accuracy after recalibrating the statistics with dropout off (:func:`normkit.tools.recalibrate` in eval mode),
which shows how much of any accuracy loss the shift explains.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..data import load_mnist1d
from ..tools import recalibrate
from . import _plotting
from ._compare import describe, paired_difference
from ._harness import Settings
from ._selection import carve, select_on_validation
from ._training import accuracy, fmt, mean_std, mlp, train

NAME = "dropout-order"
TITLE = "batch norm before or after dropout"
CLAIM = "Place batch norm before dropout, never after it, so as not to disturb the normalization."
SEEDS = 8
ORDERS = {"no-dropout": ("linear", "norm", "act"), "bn-before-dropout": ("linear", "norm", "act", "dropout"),
          "bn-after-dropout": ("linear", "act", "dropout", "norm"),
          "li-dropout-after-last-bn": ("linear", "norm", "act")}
LABELS = {"no-dropout": "no dropout (BN → ReLU)", "bn-before-dropout": "BN before dropout (BN → ReLU → drop)",
          "bn-after-dropout": "BN after dropout (ReLU → drop → BN)",
          "li-dropout-after-last-bn": "dropout only after the last BN (Li et al.)"}
COMPARISONS = {"dropout-helps": ("bn-before-dropout", "no-dropout"),
               "before-vs-after": ("bn-before-dropout", "bn-after-dropout"),
               "li-vs-after": ("li-dropout-after-last-bn", "bn-after-dropout"),
               "li-vs-before": ("li-dropout-after-last-bn", "bn-before-dropout")}
DROPOUT_ARMS = ("bn-before-dropout", "bn-after-dropout", "li-dropout-after-last-bn")
FULL = {"steps": 200, "eval_every": 50, "train_examples": 300, "rates": [0.1, 0.3, 0.5]}
QUICK = {"steps": 20, "eval_every": 10, "train_examples": 300, "rates": [0.1, 0.5]}
CONFIG = {"dataset": "MNIST-1D generated locally with seed 42: the first 300 of the 3200 training examples left after "
                     "the validation part (800 validation, 1000 test), 40 features",
          "regime": "300 training examples and 256 units per layer, set by hand from pilot runs so that BN without "
                    "dropout fits its training set within ~100 steps (overfits) and dropout has something to fix; "
                    "in a pilot with all 3200 training examples (500 constant-rate steps, 2 seeds) dropout 0.3 "
                    "lowered validation accuracy from 0.65 to 0.56 instead",
          "model": "MLP 40 -> 256 -> 256 -> 256 -> 10, BN in every hidden block, ReLU, order per arm",
          "hidden": [256, 256, 256], "optimizer": "SGD", "momentum": 0.9, "lr": 0.05, "schedule": "cosine",
          "batch_size": 64,
          "dropout_choice": "each dropout arm runs at every rate of 'rates' with every seed and keeps the rate with "
                            "the best mean final validation accuracy (normkit.experiments._selection); its test "
                            "numbers at that rate are reported",
          "variance_shift": "per BN layer: sum over channels of running_var / sum over channels of the unbiased "
                            "variance of the layer's input in eval mode on the test set; mean over the BN layers",
          "recalibration": "normkit.tools.recalibrate on the training examples, model in eval mode (dropout off)"}


def variance_shift(model: nn.Module, x: torch.Tensor) -> list[float]:
    """Per BN layer: its running variance over the variance its input actually has in eval mode (1 = no shift).

    Each layer's ratio pools the channels (sum of running variances over sum of input variances), so that a dead
    channel with zero variance cannot make it infinite.

    Args:
        model: a trained model with batch norm layers; run once on ``x`` in eval mode (its mode is restored).
        x: the inputs (e.g. the test set), one batch.

    Returns:
        One ratio per batch norm layer, in ``model.modules()`` order.

    Examples:
        >>> bn = nn.BatchNorm1d(2).eval()
        >>> bn.running_var.fill_(2.0)
        tensor([2., 2.])
        >>> x = torch.tensor([[1.0, -1.0], [-1.0, 1.0], [1.0, 1.0], [-1.0, -1.0]])  # unbiased variance 4/3
        >>> [round(r, 3) for r in variance_shift(nn.Sequential(bn), x)]
        [1.5]
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm)]
    inputs: dict[int, torch.Tensor] = {}
    handles = [layer.register_forward_pre_hook(lambda module, args: inputs.__setitem__(id(module), args[0].detach()))
               for layer in layers]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [float(layer.running_var.sum() / inputs[id(layer)].var(dim=0).sum()) for layer in layers]


def build(order: str, features: int, classes: int, hidden, rate: float, seed: int) -> nn.Sequential:
    """The MLP of one arm; Li et al.'s arm is the no-dropout MLP with one dropout before its output layer (the same
    initial weights, since a dropout layer draws nothing at construction).

    Examples:
        >>> model = build("li-dropout-after-last-bn", 40, 10, (8,), 0.3, seed=0)
        >>> [type(m).__name__ for m in model]
        ['Linear', 'BatchNorm1d', 'ReLU', 'Dropout', 'Linear']
    """
    if order == "li-dropout-after-last-bn":
        layers = list(mlp(features, classes, hidden, norm="bn", order=ORDERS[order], seed=seed))
        return nn.Sequential(*layers[:-1], nn.Dropout(rate), layers[-1])
    return mlp(features, classes, hidden, norm="bn", order=ORDERS[order],
               dropout=0.0 if order == "no-dropout" else rate, seed=seed)


def run_arm(split, order: str, rate: float, seed: int, config: dict, advance) -> dict:
    """Train one arm at one dropout rate for one seed; measure its eval accuracy, variance shift and recalibrated
    accuracy."""
    model = build(order, split.num_features, split.num_classes, config["hidden"], rate, seed)
    history = train(model, split, steps=config["steps"], batch_size=config["batch_size"], lr=config["lr"],
                    momentum=config["momentum"], seed=seed, eval_every=config["eval_every"], on_step=advance,
                    schedule=config["schedule"])
    shifts = variance_shift(model, split.x_test)
    recalibrated = recalibrate(copy.deepcopy(model).eval(), split.x_train)
    return {"seed": seed, "dropout": rate, **history.as_dict(), "variance_shift_per_layer": shifts,
            "variance_shift": sum(shifts) / len(shifts),
            "recalibrated_accuracy": accuracy(recalibrated, split.x_test, split.y_test)}


def run(settings: Settings) -> dict:
    """Train every arm at every rate for every seed, pick each dropout arm's rate on validation, compare the arms
    on test; see the module docstring."""
    config = {**CONFIG, **(QUICK if settings.quick else FULL)}
    split, validation = carve(load_mnist1d())
    n = config["train_examples"]
    split = replace(split, x_train=split.x_train[:n], y_train=split.y_train[:n])
    rates = config["rates"]
    grid = {order: [0.0] if order == "no-dropout" else rates for order in ORDERS}
    sweep: dict[str, list[list[dict]]] = {order: [[] for _ in grid[order]] for order in ORDERS}
    for seed in settings.seeds:
        for order in ORDERS:
            for index, rate in enumerate(grid[order]):
                advance = settings.progress(f"{order}, p={rate:g}, seed {seed}", config["steps"])
                sweep[order][index].append(run_arm(split, order, rate, seed, config, advance))
    selection = {order: select_on_validation(rates, sweep[order]) for order in DROPOUT_ARMS}
    chosen = {order: selection[order]["value"] if order in selection else 0.0 for order in ORDERS}
    per_seed = {order: sweep[order][selection[order]["index"] if order in selection else 0] for order in ORDERS}
    summary = {name: {metric: mean_std([r[metric] for r in runs])
                      for metric in ("final_accuracy", "final_val_accuracy", "variance_shift",
                                     "recalibrated_accuracy")}
               for name, runs in per_seed.items()}
    differences = {name: paired_difference([r["final_accuracy"] for r in per_seed[first]],
                                           [r["final_accuracy"] for r in per_seed[second]])
                   for name, (first, second) in COMPARISONS.items()}
    validation = {**validation, "train_examples_used": n,
                  "used_for": f"each dropout arm's rate (grid {', '.join(map(str, rates))}, mean final validation "
                              "accuracy); the test part only reports"}
    rate_sweep = {order: {f"{rate:g}": {metric: [run[metric] for run in sweep[order][index]]
                                        for metric in ("final_val_accuracy", "final_accuracy", "variance_shift")}
                          for index, rate in enumerate(rates)}
                  for order in DROPOUT_ARMS}
    return {"config": config, "validation": validation, "dropout_rate": selection, "per_seed": per_seed,
            "rate_sweep": rate_sweep, "summary": summary, "differences": differences,
            "table": table(summary, differences, chosen, selection, len(config["hidden"])),
            "measured": measured(summary, differences, chosen)}


def table(summary: dict, differences: dict, chosen: dict, selection: dict, layers: int) -> dict:
    """One row per arm (at its chosen rate): validation and eval test accuracy, variance shift, accuracy after
    recalibration; then the paired comparisons."""
    rows = [[LABELS[order], f"{chosen[order]:g}", fmt(stats["final_val_accuracy"]), fmt(stats["final_accuracy"]),
             fmt(stats["variance_shift"], ".2f"), fmt(stats["recalibrated_accuracy"])]
            for order, stats in summary.items()]
    rows += [[f"{LABELS[first]} − {LABELS[second]}", "", "", describe(differences[name]), "", ""]
             for name, (first, second) in COMPARISONS.items()]
    grid = "; ".join(f"{LABELS[order]} " + ", ".join(f"{score['value']:g}: {score['validation_accuracy']:.3f}"
                                                     for score in selection[order]["scores"])
                     for order in selection)
    return {"columns": ["arm (or paired difference of test accuracy)", "dropout rate (chosen on validation)",
                        "validation accuracy", "test accuracy (eval)", "running var / eval input var",
                        "test accuracy after recalibration"], "rows": rows,
            "note": f"Each dropout arm's rate is the one with the best mean final validation accuracy (per rate: "
                    f"{grid}). Variance ratio: mean over the {layers} BN layers; 1.00 means the stored statistics "
                    "match what the layer sees at inference. With BN before dropout the BN layers after the first "
                    "still follow a dropout (dropout -> linear -> BN), hence ratios above 1 there too (per layer in "
                    "the JSON). Differences are paired per seed with a 95 % CI; an arm wins only when the interval "
                    "excludes zero."}


def measured(summary: dict, differences: dict, chosen: dict) -> str:
    """One sentence that says what the numbers show, whichever way they went.

    Args:
        summary: per arm, ``mean_std`` of ``final_accuracy``, ``variance_shift`` and ``recalibrated_accuracy``.
        differences: per name in :data:`COMPARISONS`, a :func:`~normkit.experiments._compare.paired_difference`.
        chosen: per arm, the dropout rate chosen on validation (0 for the no-dropout arm).

    Returns:
        The sentence.

    Examples:
        >>> stat = lambda m: {"mean": m, "std": 0.0}
        >>> arm = lambda acc, ratio, recal: {"final_accuracy": stat(acc), "variance_shift": stat(ratio),
        ...                                  "recalibrated_accuracy": stat(recal)}
        >>> summary = {"no-dropout": arm(0.40, 1.0, 0.40), "bn-before-dropout": arm(0.42, 1.2, 0.42),
        ...            "bn-after-dropout": arm(0.38, 2.1, 0.41), "li-dropout-after-last-bn": arm(0.43, 1.0, 0.43)}
        >>> chosen = {"no-dropout": 0.0, "bn-before-dropout": 0.3, "bn-after-dropout": 0.1,
        ...           "li-dropout-after-last-bn": 0.5}
        >>> yes = lambda m: {"mean": m, "ci95": [m - 0.01, m + 0.01], "verdict": "first" if m > 0 else "second"}
        >>> no = lambda m: {"mean": m, "ci95": [m - 0.02, m + 0.02], "verdict": "none"}
        >>> d = {"dropout-helps": yes(0.02), "before-vs-after": yes(0.04), "li-vs-after": yes(0.05),
        ...      "li-vs-before": no(0.01)}
        >>> print(measured(summary, d, chosen))  # doctest: +NORMALIZE_WHITESPACE
        With each arm's dropout rate chosen on validation (0.3 with BN before dropout, 0.1 with BN after it, 0.5
        after the last BN), dropout helped in this regime (BN before dropout vs none: +2.0 points (95% CI +1.0 to
        +3.0)); BN after dropout stored a running variance 2.10x the variance it sees at inference (1.20x with BN
        before dropout, 1.00x with Li et al.'s dropout after the last BN) and reached 38.0% eval test accuracy vs
        42.0% with BN before dropout (before − after: +4.0 points (95% CI +3.0 to +5.0)) and 43.0% with Li et al.'s
        arm (Li − after: +5.0 points (95% CI +4.0 to +6.0)); recalibrating BN after dropout with dropout off gives
        41.0% — the article's rule holds here.
        >>> d = {"dropout-helps": no(0.0), "before-vs-after": no(0.004), "li-vs-after": no(-0.002),
        ...      "li-vs-before": no(-0.006)}
        >>> print(measured(summary, d, chosen))  # doctest: +NORMALIZE_WHITESPACE
        With each arm's dropout rate chosen on validation (0.3 with BN before dropout, 0.1 with BN after it, 0.5
        after the last BN), dropout made no detectable difference in this regime (BN before dropout vs none: no
        difference detected (+0.0 points, 95% CI -2.0 to +2.0)); BN after dropout stored a running variance 2.10x
        the variance it sees at inference (1.20x with BN before dropout, 1.00x with Li et al.'s dropout after the
        last BN) and reached 38.0% eval test accuracy vs 42.0% with BN before dropout (before − after: no
        difference detected (+0.4 points, 95% CI -1.6 to +2.4)) and 43.0% with Li et al.'s arm (Li − after: no
        difference detected (-0.2 points, 95% CI -2.2 to +1.8)); recalibrating BN after dropout with dropout off
        gives 41.0% — the order made no detectable difference to accuracy here, despite the variance shift.
    """
    before, after = summary["bn-before-dropout"], summary["bn-after-dropout"]
    li = summary["li-dropout-after-last-bn"]
    helps = differences["dropout-helps"]
    regime = {"first": "dropout helped in this regime", "second": "dropout hurt in this regime",
              "none": "dropout made no detectable difference in this regime"}[helps["verdict"]]
    order = differences["before-vs-after"]
    verdict = {"first": "the article's rule holds here",
               "none": "the order made no detectable difference to accuracy here, despite the variance shift",
               "second": "on this data BN after dropout did better, against the article's rule"}[order["verdict"]]
    rates = (f"{chosen['bn-before-dropout']:g} with BN before dropout, {chosen['bn-after-dropout']:g} with BN after "
             f"it, {chosen['li-dropout-after-last-bn']:g} after the last BN")
    return (f"With each arm's dropout rate chosen on validation ({rates}), {regime} (BN before dropout vs none: "
            f"{describe(helps)}); BN after dropout stored a running variance {after['variance_shift']['mean']:.2f}x "
            f"the variance it sees at inference ({before['variance_shift']['mean']:.2f}x with BN before dropout, "
            f"{li['variance_shift']['mean']:.2f}x with Li et al.'s dropout after the last BN) and reached "
            f"{after['final_accuracy']['mean']:.1%} eval test accuracy vs {before['final_accuracy']['mean']:.1%} with "
            f"BN before dropout (before − after: {describe(order)}) and {li['final_accuracy']['mean']:.1%} with Li "
            f"et al.'s arm (Li − after: {describe(differences['li-vs-after'])}); recalibrating BN after dropout with "
            f"dropout off gives {after['recalibrated_accuracy']['mean']:.1%} — {verdict}.")


def plot(result: dict, path: Path) -> None:
    """Eval test accuracy and variance shift per arm (at its chosen rate): mean ± std over the seeds, and every seed
    as a grey dot."""
    import numpy as np

    summary = result["summary"]
    fig, (acc_ax, shift_ax) = _plotting.figure(ncols=2, width=5.4, height=4.6)
    positions = np.arange(len(ORDERS))
    rate = {order: result["dropout_rate"][order]["value"] for order in DROPOUT_ARMS}
    names = ["no dropout", f"BN → drop\np={rate['bn-before-dropout']:g}",
             f"drop → BN\np={rate['bn-after-dropout']:g}",
             f"drop after last\nBN (Li), p={rate['li-dropout-after-last-bn']:g}"]
    colors = ["tab:gray", "tab:blue", "tab:red", "tab:green"]
    for ax, metric in ((acc_ax, "final_accuracy"), (shift_ax, "variance_shift")):
        stats = [summary[order][metric] for order in ORDERS]
        for position, stat, color in zip(positions, stats, colors, strict=True):
            ax.errorbar([position], [stat["mean"]], yerr=[stat["std"]], marker="o", markersize=8, capsize=5,
                        color=color, linestyle="none")
        for position, run_values in zip(positions, [[r[metric] for r in result["per_seed"][o]] for o in ORDERS],
                                        strict=True):
            ax.plot([position + 0.15] * len(run_values), run_values, linestyle="none", marker=".", color="grey",
                    alpha=0.6)
        ax.set_xticks(positions, names, fontsize=8)
        ax.set_xlim(-0.5, len(ORDERS) - 0.5)
    acc_ax.set_ylabel("test accuracy (eval mode): mean ± std, grey dots per seed")
    acc_ax.set_title("accuracy at inference")
    shift_ax.axhline(1.0, color="black", linewidth=0.8)
    shift_ax.set_ylabel("running var / eval-mode input var (1 = no shift)")
    shift_ax.set_ylim(bottom=0)
    shift_ax.set_title("variance shift of the BN layers")
    _plotting.save(fig, path, f"Wide MLP, {result['config']['train_examples']} MNIST-1D examples, each arm's dropout "
                              f"rate p chosen on validation: where should dropout go? (mean ± std, "
                              f"{len(result['seeds'])} seeds)")
