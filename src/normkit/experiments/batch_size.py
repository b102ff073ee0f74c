"""``normkit experiment batch-size``: BN and its alternatives from 2 to 128 samples per batch, under two budgets.

The same small CNN on the 8x8 digits (conv 16 -> conv 32, stride 2, global average pool) with each norm after
every conv. Every arm of a seed starts from the same conv/linear weights (norm layers draw no random numbers) and
sees the same batch order. Two budgets, because each answers a different question:

- equal epochs (the GroupNorm paper's protocol): every batch size sees the same examples, so small batches take
  many more steps;
- equal steps: every batch size takes the same number of optimizer steps, so large batches see more examples.

Adam, with each norm's base learning rate chosen on the validation part from a small grid (at batch 32 under the
equal-step budget) and scaled with the square root of the batch size elsewhere (the rule for adaptive optimizers).
Test accuracy is measured in eval mode (running statistics for the batch-statistics norms), as a deployed model
would be used. InstanceNorm and Streaming BN of earlier versions were left out to pay for the second budget and the
learning-rate grid (both trailed every other norm at every batch size).
"""

from __future__ import annotations

import copy
import math

from torch import nn

from ..data import load_digits
from ..nn import BatchNorm2d, BatchRenorm2d, CrossIterationBatchNorm2d, GhostBatchNorm2d, GroupNorm
from ..tools import recalibrate
from ._compare import describe, paired_difference
from ._harness import Settings
from ._selection import carve, select_on_validation
from ._training import accuracy, cnn, fmt, mean_std, train

NAME = "batch-size"
TITLE = "Small batches: BN vs GroupNorm, LayerNorm and friends"
CLAIM = ("Below about 8 samples per batch BN's statistics become unreliable and accuracy suffers; batch-independent "
         "norms (GroupNorm, LayerNorm) are then the better choice, and 16-32 samples per batch are enough for BN.")

SEEDS = 3
NORMS = ("BN", "GN", "LN", "BatchRenorm", "Ghost BN", "Cross-iteration BN")
BATCH_INDEPENDENT = ("GN", "LN")
BUDGETS = {"equal_epochs": "equal epochs", "equal_steps": "equal steps"}
FULL = {"batch_sizes": (2, 8, 32, 128), "epochs": 2.0, "min_steps": 60, "equal_steps": 300,
        "lr_grid": (0.001, 0.003, 0.01, 0.03)}
QUICK = {"batch_sizes": (4, 32), "epochs": 0.03, "min_steps": 3, "equal_steps": 4, "lr_grid": (0.01, 0.03)}
CHANNELS = (16, 32)
BASE_BATCH = 32  # the batch size at which each norm's learning rate is tuned; square-root scaling elsewhere
OPTIMIZER = "adam"
GN_CHANNELS_PER_GROUP = 4
GHOST_BATCH = 8
CBN_WINDOW = 4
WARMUP_FRACTION = 0.1  # BatchRenorm's r/d warm-up and cross-iteration BN's burn-in, as a fraction of the steps
RENORM_RMAX, RENORM_DMAX = 3.0, 5.0
CIBN_NOTE = ("Cross-iteration BN: where its eval accuracy collapses on some seeds, training did not fail (the "
             "JSON's batch_statistics_accuracy and recalibrated_accuracy of the same weights stay high); its running "
             "statistics (the current batch's EMA, as in the official code) do not match the pooled, "
             "weight-compensated statistics the network was trained with: the activations drift quickly between "
             "iterations under CIBN's training and an EMA over the last ~1/momentum batches lags them (a shorter EMA "
             "also fixes it). Recalibrate (normkit.tools.recalibrate) "
             "before evaluating a CIBN model: the row 'Cross-iteration BN after precise BN' shows what that recovers.")


def norm_module(norm: str, channels: int, conv: nn.Module, steps: int) -> nn.Module:
    """The norm layer of arm ``norm`` for ``channels`` channels after ``conv``, configured for ``steps`` steps.

    Args:
        norm: one of :data:`NORMS`.
        channels: the channel count.
        conv: the preceding convolution (cross-iteration BN compensates for its weight).
        steps: the run's optimizer steps (BatchRenorm's schedule and cross-iteration BN's burn-in scale with it).

    Returns:
        A fresh layer with unit weight and zero bias.
    """
    warmup = max(1, round(WARMUP_FRACTION * steps))
    makers = {
        "BN": lambda: BatchNorm2d(channels),
        "GN": lambda: GroupNorm(channels // GN_CHANNELS_PER_GROUP, channels),
        "LN": lambda: GroupNorm(1, channels),
        # Ioffe 2017's schedule compressed to this run: r, d held at 1, 0 for the warm-up, then ramped to their
        # final bounds by half of the run.
        "BatchRenorm": lambda: BatchRenorm2d(channels, rmax=RENORM_RMAX, dmax=RENORM_DMAX, warmup_steps=warmup,
                                             rmax_ramp_end=max(warmup + 1, steps // 2),
                                             dmax_ramp_end=max(warmup + 1, steps // 2)),
        "Ghost BN": lambda: GhostBatchNorm2d(channels, GHOST_BATCH),
        "Cross-iteration BN": lambda: CrossIterationBatchNorm2d(channels, window=CBN_WINDOW, burn_in=warmup,
                                                                weight_of=conv),
    }
    if norm not in makers:
        raise ValueError(f"batch-size: unknown norm {norm!r}; expected one of {', '.join(NORMS)}.")
    return makers[norm]()


def build(norm: str, seed: int, steps: int) -> nn.Sequential:
    """The experiment's CNN with arm ``norm`` after every conv; the same ``seed`` gives the same conv/linear weights.

    Args:
        norm: one of :data:`NORMS`.
        seed: seed of the initial weights.
        steps: the run's optimizer steps (see :func:`norm_module`).

    Returns:
        The model: the ``cnn((8, 8), 10, CHANNELS, norm="bn")`` skeleton with each BN replaced by the arm's layer.
    """
    model = cnn((8, 8), 10, CHANNELS, norm="bn", seed=seed)
    for index, layer in enumerate(model):
        if isinstance(layer, BatchNorm2d):
            model[index] = norm_module(norm, layer.num_features, model[index - 1], steps)
    return model


def steps_for(batch_size: int, epochs: float, num_examples: int, min_steps: int = 1) -> int:
    """Optimizer steps that show ``epochs`` passes over ``num_examples`` examples in batches of ``batch_size``, and
    at least ``min_steps``."""
    return max(min_steps, round(epochs * num_examples / batch_size))


def learning_rate(batch_size: int, base: float) -> float:
    """Adam's learning rate scaled with the square root of the batch size: ``base * sqrt(batch / BASE_BATCH)``.

    Examples:
        >>> learning_rate(32, 0.01), learning_rate(128, 0.01)
        (0.01, 0.02)
    """
    return base * math.sqrt(batch_size / BASE_BATCH)


def steps_of(budget: str, batch_size: int, setup: dict, num_examples: int) -> int:
    """The optimizer steps of one budget at one batch size."""
    if budget == "equal_steps":
        return setup["equal_steps"]
    return steps_for(batch_size, setup["epochs"], num_examples, setup["min_steps"])


def one_run(split, norm: str, batch_size: int, steps: int, lr: float, seed: int) -> dict:
    """Train one arm once; the history as plain data. Cross-iteration BN also reports its test accuracy after
    precise-BN recalibration and with batch statistics (see :data:`CIBN_NOTE`)."""
    model = build(norm, seed, steps)
    history = train(model, split, steps=steps, batch_size=batch_size, lr=lr, seed=seed, optimizer=OPTIMIZER,
                    eval_every=steps)
    run = {"seed": seed, "lr": lr, "steps": steps, **history.as_dict()}
    if norm == "Cross-iteration BN":
        recalibrated = recalibrate(copy.deepcopy(model), list(split.x_train.split(batch_size)))
        run["recalibrated_accuracy"] = accuracy(recalibrated, split.x_test, split.y_test)
        run["batch_statistics_accuracy"] = accuracy(copy.deepcopy(model), split.x_test, split.y_test, training=True,
                                                    batch_size=batch_size)
    return run


def compare(runs: dict, sizes: tuple[int, ...]) -> dict:
    """Per batch size, paired over the seeds: BN minus GN, BN minus the batch-independent norm that did best on
    validation there, and BN's drop from the batch size where it did best on validation.

    Args:
        runs: ``runs[norm][str(size)]`` is the list of run dicts (one per seed).
        sizes: the batch sizes.
    """
    def acc(norm, size, part="final_accuracy"):
        return [r[part] for r in runs[norm][str(size)]]

    def val(norm, size):
        return sum(acc(norm, size, "final_val_accuracy")) / len(runs[norm][str(size)])

    best_size = max(sizes, key=lambda size: val("BN", size))
    out = {"bn_best_size": best_size, "per_size": {}}
    for size in sizes:
        independent = max(BATCH_INDEPENDENT, key=lambda norm: val(norm, size))
        out["per_size"][str(size)] = {
            "bn_minus_gn": paired_difference(acc("BN", size), acc("GN", size)),
            "best_independent": independent,
            "bn_minus_best_independent": paired_difference(acc("BN", size), acc(independent, size)),
            "bn_drop": paired_difference(acc("BN", best_size), acc("BN", size)),
            "best_norm": max(NORMS, key=lambda norm: val(norm, size))}
    return out


def measured_sentence(derived: dict, sizes: tuple[int, ...], steps: dict) -> str:
    """One sentence on what the numbers say about the claim, per budget, whichever way they went.

    Examples:
        >>> no = {"mean": 0.002, "ci95": [-0.01, 0.014], "verdict": "none"}
        >>> drop = {"mean": 0.04, "ci95": [0.02, 0.06], "verdict": "first"}
        >>> per = {"2": {"bn_drop": drop, "bn_minus_best_independent": {**drop, "mean": -0.03, "ci95": [-0.05,
        ...        -0.01], "verdict": "second"}, "best_independent": "GN", "best_norm": "GN"},
        ...        "32": {"bn_drop": no, "bn_minus_best_independent": no, "best_independent": "LN",
        ...               "best_norm": "BN"}}
        >>> derived = {"equal_steps": {"bn_best_size": 32, "per_size": per}}
        >>> print(measured_sentence(derived, (2, 32), {"equal_steps": {"2": 500, "32": 500}}))
        ... # doctest: +NORMALIZE_WHITESPACE
        Equal steps (500 steps at every size): at batch 2, BN's drop from its best batch size (32, on validation):
        +4.0 points (95% CI +2.0 to +6.0); BN minus GN (the better batch-independent norm on validation): -3.0
        points (95% CI -5.0 to -1.0); best norm on validation: GN; at batch 32, BN's drop: no difference detected
        (+0.2 points, 95% CI -1.0 to +1.4). This agrees with the article at batch 2.
    """
    parts = []
    verdicts = []
    smallest = sizes[0]
    for budget, result in derived.items():
        per = result["per_size"]
        small = per[str(smallest)]
        counts = sorted(set(steps[budget].values()))
        step_text = (f"{counts[0]} steps at every size" if len(counts) == 1 else
                     ", ".join(f"{steps[budget][str(size)]} at batch {size}" for size in sizes))
        text = (f"{BUDGETS[budget].capitalize()} ({step_text}): at batch {smallest}, BN's drop from its best batch "
                f"size ({result['bn_best_size']}, on validation): {describe(small['bn_drop'])}; BN minus "
                f"{small['best_independent']} (the better batch-independent norm on validation): "
                f"{describe(small['bn_minus_best_independent'])}; best norm on validation: {small['best_norm']}")
        enough = [size for size in sizes if 16 <= size <= 32 and str(size) in per]
        if enough:
            text += "; " + "; ".join(f"at batch {size}, BN's drop: {describe(per[str(size)]['bn_drop'])}"
                                     for size in enough)
        parts.append(text)
        drops = small["bn_drop"]["verdict"] == "first"
        loses = small["bn_minus_best_independent"]["verdict"] == "second"
        verdicts.append("agrees with the article" if drops and loses else
                        "partly agrees with the article" if drops or loses else
                        "does not show the article's small-batch penalty")
    summary = verdicts[0] if len(set(verdicts)) == 1 else " / ".join(
        f"{v} ({BUDGETS[b]})" for v, b in zip(verdicts, derived, strict=True))
    return "; ".join(parts) + f". This {summary} at batch {smallest}."


def run(settings: Settings) -> dict:
    """Tune each norm's learning rate on validation, then train every norm at every batch size under both budgets.

    Args:
        settings: quick or full, the seeds, the progress factory.

    Returns:
        The result (``config``, ``table``, ``measured``, ``per_norm_lr``, ``runs``, ``equal_steps``,
        ``equal_epochs``, ``derived``).
    """
    setup = QUICK if settings.quick else FULL
    sizes = setup["batch_sizes"]
    split, validation = carve(load_digits())
    num_examples = len(split.y_train)
    seeds = settings.seeds
    steps = {budget: {str(size): steps_of(budget, size, setup, num_examples) for size in sizes} for budget in BUDGETS}
    total = len(NORMS) * len(seeds) * (len(setup["lr_grid"]) + 2 * len(sizes))
    advance = settings.progress(f"{NAME}: {len(NORMS)} norms, lr grid, 2 budgets", total)
    done = 0
    tuning: dict[str, list[list[dict]]] = {}
    for norm in NORMS:
        tuning[norm] = []
        for base in setup["lr_grid"]:
            tuning[norm].append([one_run(split, norm, BASE_BATCH, setup["equal_steps"], base, seed) for seed in seeds])
            done += len(seeds)
            advance(done)
    per_norm_lr = {norm: select_on_validation(list(setup["lr_grid"]), tuning[norm]) for norm in NORMS}
    runs: dict[str, dict[str, dict[str, list[dict]]]] = {budget: {norm: {} for norm in NORMS} for budget in BUDGETS}
    for budget in BUDGETS:
        for norm in NORMS:
            base = per_norm_lr[norm]["value"]
            for size in sizes:
                n = steps[budget][str(size)]
                if budget == "equal_steps" and size == BASE_BATCH:
                    runs[budget][norm][str(size)] = tuning[norm][per_norm_lr[norm]["index"]]
                else:
                    runs[budget][norm][str(size)] = [one_run(split, norm, size, n, learning_rate(size, base), seed)
                                                     for seed in seeds]
                done += len(seeds)
                advance(done)
    derived = {budget: compare(runs[budget], sizes) for budget in BUDGETS}
    config = {
        "data": "digits 8x8 (1078 train / 269 validation / 450 test), images as (1, 8, 8)",
        "model": f"cnn((8, 8), 10, channels={list(CHANNELS)}): conv3 -> norm -> ReLU per stage, stride 2 after the "
                 "first, global average pool, linear",
        "norms": {"BN": "BatchNorm2d (momentum 0.1)", "GN": f"GroupNorm, {GN_CHANNELS_PER_GROUP} channels per group",
                  "LN": "GroupNorm(1, C): each sample over (C, H, W)",
                  "BatchRenorm": f"BatchRenorm2d(rmax={RENORM_RMAX}, dmax={RENORM_DMAX}), r/d held at 1/0 for "
                                 f"{WARMUP_FRACTION:.0%} of the steps, ramped to the bounds by half of the steps",
                  "Ghost BN": f"GhostBatchNorm2d(virtual_batch_size={GHOST_BATCH}) (plain BN at batch <= "
                              f"{GHOST_BATCH})",
                  "Cross-iteration BN": f"CrossIterationBatchNorm2d(window={CBN_WINDOW}), burn-in "
                                        f"{WARMUP_FRACTION:.0%} of the steps, bound to the preceding conv"},
        "batch_sizes": list(sizes), "epochs": setup["epochs"], "min_steps": setup["min_steps"],
        "equal_steps": setup["equal_steps"], "steps": steps,
        "optimizer": "Adam (betas 0.9, 0.999), no weight decay",
        "lr_grid": list(setup["lr_grid"]),
        "learning_rate_rule": f"each norm's base rate chosen on validation at batch {BASE_BATCH} (equal-step budget), "
                              f"then square-root scaling: base x sqrt(batch / {BASE_BATCH})",
        "evaluation": "test accuracy in eval mode (running statistics) after the last step",
    }
    validation = {**validation, "used_for": "each norm's learning rate, the best batch size of BN and the best "
                                            "batch-independent norm per size; the test part only reports"}
    return {"config": config, "validation": validation, "per_norm_lr": per_norm_lr,
            "table": table(runs, derived, steps, sizes), "measured": measured_sentence(derived, sizes, steps),
            "equal_steps": {"steps": steps["equal_steps"], "derived": derived["equal_steps"]},
            "equal_epochs": {"steps": steps["equal_epochs"], "derived": derived["equal_epochs"]},
            "derived": derived, "runs": runs, "tuning": tuning}


def table(runs: dict, derived: dict, steps: dict, sizes: tuple[int, ...]) -> dict:
    """Per budget: a steps row, one row per norm (test accuracy per batch size) and the paired comparisons."""
    rows = []
    for budget, label in BUDGETS.items():
        rows.append([label, "steps", *(str(steps[budget][str(size)]) for size in sizes)])
        for norm in NORMS:
            rows.append([label, norm, *(fmt(mean_std([r["final_accuracy"] for r in runs[budget][norm][str(size)]]))
                                        for size in sizes)])
        per = derived[budget]["per_size"]
        rows.append([label, "BN − GN (paired)", *(describe(per[str(size)]["bn_minus_gn"]) for size in sizes)])
        rows.append([label, f"BN's drop from batch {derived[budget]['bn_best_size']}",
                     *(describe(per[str(size)]["bn_drop"]) for size in sizes)])
        rows.append([label, "best norm (on validation)", *(per[str(size)]["best_norm"] for size in sizes)])
        rows.append([label, "Cross-iteration BN after precise BN",
                     *(fmt(mean_std([r["recalibrated_accuracy"] for r in runs[budget]["Cross-iteration BN"][str(s)]]))
                       for s in sizes)])
    return {"columns": ["budget", "norm", *(f"batch {size}" for size in sizes)], "rows": rows,
            "note": "Test accuracy in eval mode, mean ± std over the seeds; differences paired per seed with a 95 % "
                    "CI. Each norm's Adam learning rate was chosen on validation (per_norm_lr in the JSON). "
                    + CIBN_NOTE}


STYLES = {"BN": ("black", "o", "-"), "GN": ("tab:blue", "s", "-"), "LN": ("tab:orange", "^", "-"),
          "BatchRenorm": ("tab:red", "D", "--"), "Ghost BN": ("tab:purple", "P", "--"),
          "Cross-iteration BN": ("tab:brown", "X", "--")}


def plot(result: dict, path) -> None:
    """Test accuracy vs batch size (log2 axis), one panel per budget, one line per norm (±1 std), with the steps of
    every point under its batch size."""
    from ._plotting import figure, save

    config = result["config"]
    sizes = config["batch_sizes"]
    fig, axes = figure(ncols=2, width=5.6, height=4.8)
    low = 1.0
    for ax, (budget, label) in zip(axes, BUDGETS.items(), strict=True):
        for index, norm in enumerate(NORMS):
            stats = [mean_std([r["final_accuracy"] for r in result["runs"][budget][norm][str(size)]])
                     for size in sizes]
            low = min(low, *(s["mean"] - s["std"] for s in stats))
            dodge = 2 ** (0.04 * (index - (len(NORMS) - 1) / 2))
            color, marker, linestyle = STYLES[norm]
            ax.errorbar([size * dodge for size in sizes], [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                        label=norm, color=color, marker=marker, linestyle=linestyle, markersize=5, capsize=2,
                        linewidth=1.2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [f"{size}\n{config['steps'][budget][str(size)]} steps" for size in sizes], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("batch size (and optimizer steps)")
        ax.set_ylabel("test accuracy (eval mode)")
        ax.set_title(label)
    for ax in axes:
        ax.set_ylim(max(0.0, low - 0.03), 1.0)
    axes[-1].legend(fontsize=7, loc="lower right", title="norm (±1 std)", title_fontsize=7)
    save(fig, path, f"Test accuracy vs batch size, equal epochs vs equal steps (each norm's lr tuned on validation; "
                    f"{len(result['seeds'])} seeds)")
