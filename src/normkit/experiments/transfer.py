"""``normkit experiment transfer``: what to do with batch norm when fine-tuning on a shifted domain with few labels.

An MLP with batch norm (three hidden layers of 100 ReLU units) is trained once per seed on the 8x8 digits (the
source domain), then moved to shifted target domains (:func:`normkit.data.shifted`: lower contrast, pixel noise,
rotation) where only a few labelled examples per class are available. Five strategies start from a copy of the same
pretrained model:

- no adaptation: the source model as it is;
- AdaBN alone: :func:`normkit.tools.adapt` on the unlabelled target training images, no training;
- freeze BN: :func:`normkit.tools.freeze`, then fine-tune the rest (the BN layers keep the source statistics);
- BN at 0.1x learning rate: :func:`normkit.tools.param_groups` with ``norm_lr_scale=0.1``, fine-tune everything;
- full fine-tuning: every parameter at the same learning rate, BN in training mode.

The fine-tuning arms share the labelled subset, the batches and the optimizer. Reported: target test accuracy per
strategy and shift.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ..data import Split, load_digits, shifted
from ..tools import adapt, freeze, param_groups
from . import _plotting
from ._compare import paired_difference
from ._harness import Settings
from ._training import accuracy, fmt, mean_std, mlp, train

NAME = "transfer"
TITLE = "batch norm strategies for fine-tuning on a shifted domain"
CLAIM = ("For transfer learning, either freeze the BN layers (keep the pretrained statistics), train them with a 10x "
         "smaller learning rate, or retrain everything when there is enough data; adapting BN statistics to the "
         "target domain (AdaBN) helps domain adaptation.")
STRATEGIES = {"none": "no adaptation", "adabn": "AdaBN only (no labels)", "freeze": "frozen BN + fine-tune",
              "bn-lr-0.1": "BN lr x0.1 + fine-tune", "full": "full fine-tune"}
TICKS = {"contrast": "contrast x{:g}", "offset": "offset {:+g}", "noise": "noise sd {:g}", "rotation": "rotation {:g}°"}
FINE_TUNED = ("freeze", "bn-lr-0.1", "full")
FULL = {"pretrain_steps": 600, "finetune_steps": 200, "eval_every": 50,
        "shifts": [["contrast", 0.3], ["noise", 0.4], ["rotation", 30.0]]}
QUICK = {"pretrain_steps": 30, "finetune_steps": 10, "eval_every": 10, "shifts": [["contrast", 0.3], ["noise", 0.4]]}
CONFIG = {"dataset": "sklearn digits 8x8 (1347 train / 450 test), pixels / 16; target = normkit.data.shifted(...)",
          "model": "MLP 64 -> 100 -> 100 -> 100 -> 10, linear -> BN -> ReLU", "hidden": [100, 100, 100],
          "pretrain": {"optimizer": "SGD", "momentum": 0.9, "lr": 0.05, "batch_size": 64},
          "finetune": {"optimizer": "SGD", "momentum": 0.9, "lr": 0.01, "batch_size": 32, "norm_lr_scale": 0.1},
          "labels_per_class": 10,
          "adabn_data": "all target training images, unlabelled (normkit.tools.adapt, population statistics)",
          "tie_margin": 0.01}


def few_labels(split: Split, per_class: int, seed: int) -> Split:
    """The split with its training part cut to ``per_class`` random examples of every class (test part unchanged).

    Args:
        split: the (target-domain) split.
        per_class: labelled examples kept per class.
        seed: seed of the choice; the same seed picks the same examples.

    Returns:
        A :class:`~normkit.data.Split` with ``per_class * num_classes`` training examples, class by class.

    Raises:
        ValueError: a class has fewer than ``per_class`` training examples.

    Examples:
        >>> from normkit.data import load_digits
        >>> small = few_labels(load_digits(), 5, seed=0)
        >>> tuple(small.x_train.shape), torch.bincount(small.y_train).tolist()
        ((50, 64), [5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    """
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split.y_train), generator=generator)
    chosen = []
    for label in range(split.num_classes):
        of_class = order[split.y_train[order] == label][:per_class]
        if len(of_class) < per_class:
            raise ValueError(f"few_labels: class {label} has {len(of_class)} training examples, expected at least "
                             f"{per_class}. Pass a smaller per_class.")
        chosen.append(of_class)
    indices = torch.cat(chosen)
    return replace(split, x_train=split.x_train[indices], y_train=split.y_train[indices])


def adapt_strategy(source: nn.Module, strategy: str, target: Split, labelled: Split, config: dict, seed: int,
                   advance) -> float:
    """Apply one strategy to a copy of the source model and return its target test accuracy."""
    model = copy.deepcopy(source)
    if strategy == "adabn":
        model = adapt(model, target.x_train)
    elif strategy in FINE_TUNED:
        tune = config["finetune"]
        groups = None
        if strategy == "freeze":
            model = freeze(model)
        elif strategy == "bn-lr-0.1":
            groups = param_groups(model, tune["lr"], norm_lr_scale=tune["norm_lr_scale"])
        train(model, labelled, steps=config["finetune_steps"], batch_size=tune["batch_size"], lr=tune["lr"],
              momentum=tune["momentum"], seed=seed, eval_every=config["eval_every"], param_groups=groups,
              on_step=advance)
    elif strategy != "none":
        raise ValueError(f"transfer: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}.")
    return accuracy(model, target.x_test, target.y_test)


def shift_key(kind: str, strength: float) -> str:
    """The JSON key of one target domain, e.g. ``"contrast 0.3"``."""
    return f"{kind} {strength:g}"


def run(settings: Settings) -> dict:
    """Pretrain once per seed, then apply every strategy to every shift; see the module docstring."""
    config = {**CONFIG, **(QUICK if settings.quick else FULL)}
    source = load_digits()
    shifts = {shift_key(kind, strength): shifted(source, kind, strength) for kind, strength in config["shifts"]}
    per_seed: dict[str, dict[str, list[float]]] = {name: {s: [] for s in STRATEGIES} for name in shifts}
    source_accuracy: list[float] = []
    for seed in settings.seeds:
        pre = config["pretrain"]
        advance = settings.progress(f"pretrain on source, seed {seed}", config["pretrain_steps"])
        model = mlp(source.num_features, source.num_classes, config["hidden"], norm="bn", seed=seed)
        history = train(model, source, steps=config["pretrain_steps"], batch_size=pre["batch_size"], lr=pre["lr"],
                        momentum=pre["momentum"], seed=seed, eval_every=config["pretrain_steps"], on_step=advance)
        source_accuracy.append(history.final_accuracy)
        for name, target in shifts.items():
            labelled = few_labels(target, config["labels_per_class"], seed)
            for strategy in STRATEGIES:
                advance = (settings.progress(f"{name}: {STRATEGIES[strategy]}, seed {seed}",
                                             config["finetune_steps"]) if strategy in FINE_TUNED else None)
                per_seed[name][strategy].append(adapt_strategy(model, strategy, target, labelled, config, seed,
                                                               advance))
    summary = {name: {s: mean_std(values) for s, values in arms.items()} for name, arms in per_seed.items()}
    overall = {s: mean_std([sum(per_seed[name][s][i] for name in shifts) / len(shifts)
                            for i in range(len(settings.seeds))]) for s in STRATEGIES}
    return {"config": config, "source_accuracy": mean_std(source_accuracy), "per_seed": per_seed,
            "summary": summary, "mean_over_shifts": overall,
            "table": table(summary, overall), "measured": measured(summary, overall, config["tie_margin"])}


def table(summary: dict, overall: dict) -> dict:
    """One row per strategy: target test accuracy per shift and the mean over the shifts."""
    rows = [[label, *(fmt(summary[name][strategy]) for name in summary), fmt(overall[strategy])]
            for strategy, label in STRATEGIES.items()]
    return {"columns": ["strategy", *(f"target accuracy, {name}" for name in summary), "mean over shifts"],
            "rows": rows, "note": "Target-domain test accuracy; every strategy starts from the same pretrained model "
                                  "per seed; the fine-tuned ones see the same labelled examples and batches."}


def best_strategies(arms: dict, tie_margin: float) -> str:
    """The best strategy of one shift, joined by ``≈`` with those whose mean is within ``tie_margin`` of it.

    Examples:
        >>> arms = {"none": {"mean": 0.5}, "adabn": {"mean": 0.9}, "freeze": {"mean": 0.8},
        ...         "bn-lr-0.1": {"mean": 0.905}, "full": {"mean": 0.7}}
        >>> best_strategies(arms, 0.01)
        'BN lr x0.1 + fine-tune ≈ AdaBN only (no labels)'
    """
    ranked = sorted(arms, key=lambda strategy: arms[strategy]["mean"], reverse=True)
    top = arms[ranked[0]]["mean"]
    return " ≈ ".join(STRATEGIES[s] for s in ranked if top - arms[s]["mean"] <= tie_margin)


def measured(summary: dict, overall: dict, tie_margin: float) -> str:
    """One sentence that says what the numbers show, whichever way they went.

    Examples:
        >>> stat = lambda *v: {"mean": sum(v) / len(v), "std": 0.0, "values": list(v)}
        >>> overall = {"none": stat(0.5, 0.5), "adabn": stat(0.7, 0.7), "freeze": stat(0.6, 0.62),
        ...            "bn-lr-0.1": stat(0.8, 0.8), "full": stat(0.8, 0.81)}
        >>> summary = {"noise 0.4": {s: overall[s] for s in overall}}
        >>> print(measured(summary, overall, 0.01))  # doctest: +NORMALIZE_WHITESPACE
        Mean target accuracy over 1 shift(s): no adaptation 50.0%, AdaBN only (no labels) 70.0%, frozen BN +
        fine-tune 61.0%, BN lr x0.1 + fine-tune 80.0%, full fine-tune 80.5%; best per shift: noise 0.4 -> full
        fine-tune ≈ BN lr x0.1 + fine-tune. Freezing BN (the article's option 1) trailed the best other fine-tuning
        strategy by 19.5 points, and BN lr x0.1 (option 2) vs full fine-tune (option 3) was a tie (-0.5 ± 0.7
        points).
    """
    means = ", ".join(f"{STRATEGIES[s]} {overall[s]['mean']:.1%}" for s in STRATEGIES)
    best = "; ".join(f"{name} -> {best_strategies(arms, tie_margin)}" for name, arms in summary.items())
    others = max(overall["bn-lr-0.1"]["mean"], overall["full"]["mean"])
    gap = overall["freeze"]["mean"] - others
    if gap < -tie_margin:
        freeze_text = f"trailed the best other fine-tuning strategy by {-100 * gap:.1f} points"
    elif gap > tie_margin:
        freeze_text = f"beat the other fine-tuning strategies by {100 * gap:.1f} points"
    else:
        freeze_text = "matched the other fine-tuning strategies"
    low_lr = paired_difference(overall["bn-lr-0.1"]["values"], overall["full"]["values"], tie_margin)
    low_lr_text = {"first": "was better", "second": "was worse", "tie": "was a tie"}[low_lr["verdict"]]
    return (f"Mean target accuracy over {len(summary)} shift(s): {means}; best per shift: {best}. Freezing BN (the "
            f"article's option 1) {freeze_text}, and BN lr x0.1 (option 2) vs full fine-tune (option 3) {low_lr_text} "
            f"({100 * low_lr['mean']:+.1f} ± {100 * low_lr['std']:.1f} points).")


def plot(result: dict, path: Path) -> None:
    """Target test accuracy per shift (groups) and strategy (bars, mean ± std), with the source accuracy."""
    import numpy as np

    summary = result["summary"]
    names = list(summary)
    fig, (ax,) = _plotting.figure(width=9.5, height=4.4)
    width = 0.8 / len(STRATEGIES)
    positions = np.arange(len(names))
    for index, (strategy, label) in enumerate(STRATEGIES.items()):
        stats = [summary[name][strategy] for name in names]
        ax.bar(positions + (index - (len(STRATEGIES) - 1) / 2) * width, [s["mean"] for s in stats], width,
               yerr=[s["std"] for s in stats], capsize=3, label=label)
    source = result["source_accuracy"]["mean"]
    ax.axhline(source, color="grey", linestyle="--", linewidth=1, label=f"source-domain accuracy {source:.1%}")
    ticks = [TICKS[kind].format(strength) for kind, strength in result["config"]["shifts"]]
    ax.set_xticks(positions, ticks)
    ax.set_xlabel("target domain (shift kind and strength)")
    ax.set_ylabel("target test accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small")
    labels = result["config"]["labels_per_class"]
    _plotting.save(fig, path, f"Digits MLP on shifted domains with {labels} labels per class: which BN strategy "
                              f"transfers best? (mean ± std, {len(result['seeds'])} seeds)")
