"""``normkit experiment batch-size``: BN and its alternatives from 2 to 128 samples per batch.

The same small CNN on the 8x8 digits (conv 16 -> conv 32, stride 2, global average pool) with each norm after
every conv. Every arm of a seed starts from the same conv/linear weights (norm layers draw no random numbers) and
sees the same examples: a fixed number of epochs at every batch size (the GroupNorm paper's protocol), with at
least ``min_steps`` steps so that the largest batch is not cut off after a few dozen updates, and Adam's learning
rate scaled with the square root of the batch size (the rule for adaptive optimizers; plain SGD with linear scaling
left GroupNorm and LayerNorm far behind BN at every batch size in this short budget, a test of the optimizer's
tuning rather than of the batch statistics). Test accuracy is measured in eval mode (running statistics for
the batch-statistics norms), as a deployed model would be used.
"""

from __future__ import annotations

import math
import statistics

from torch import nn

from ..data import load_digits
from ..nn import (
    BatchNorm2d,
    BatchRenorm2d,
    CrossIterationBatchNorm2d,
    GhostBatchNorm2d,
    GroupNorm,
    InstanceNorm2d,
    StreamingBatchNorm2d,
)
from ._harness import Settings
from ._training import cnn, fmt, mean_std, train

NAME = "batch-size"
TITLE = "Small batches: BN vs GroupNorm, LayerNorm and friends"
CLAIM = ("Below about 8 samples per batch BN's statistics become unreliable and accuracy suffers; batch-independent "
         "norms (GroupNorm, LayerNorm) are then the better choice, and 16-32 samples per batch are enough for BN.")

NORMS = ("BN", "GN", "LN", "IN", "BatchRenorm", "Ghost BN", "Cross-iteration BN", "Streaming BN")
BATCH_INDEPENDENT = ("GN", "LN", "IN")
FULL = {"batch_sizes": (2, 4, 8, 16, 32, 128), "epochs": 3.0, "min_steps": 60}
QUICK = {"batch_sizes": (4, 32), "epochs": 0.03, "min_steps": 3}
CHANNELS = (16, 32)
BASE_LR = 0.01  # Adam, at BASE_BATCH samples per batch; square-root scaling elsewhere
BASE_BATCH = 32
OPTIMIZER = "adam"
GN_CHANNELS_PER_GROUP = 4
GHOST_BATCH = 8
CBN_WINDOW = 4
WARMUP_FRACTION = 0.1  # BatchRenorm's r/d warm-up and cross-iteration BN's burn-in, as a fraction of the steps
RENORM_RMAX, RENORM_DMAX = 3.0, 5.0


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
        "IN": lambda: InstanceNorm2d(channels, affine=True),
        # Ioffe 2017's schedule compressed to this run: r, d held at 1, 0 for the warm-up, then ramped to their
        # final bounds by half of the run.
        "BatchRenorm": lambda: BatchRenorm2d(channels, rmax=RENORM_RMAX, dmax=RENORM_DMAX, warmup_steps=warmup,
                                             rmax_ramp_end=max(warmup + 1, steps // 2),
                                             dmax_ramp_end=max(warmup + 1, steps // 2)),
        "Ghost BN": lambda: GhostBatchNorm2d(channels, GHOST_BATCH),
        "Cross-iteration BN": lambda: CrossIterationBatchNorm2d(channels, window=CBN_WINDOW, burn_in=warmup,
                                                                weight_of=conv),
        "Streaming BN": lambda: StreamingBatchNorm2d(channels),
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


def learning_rate(batch_size: int) -> float:
    """Adam's learning rate scaled with the square root of the batch size: ``BASE_LR * sqrt(batch / BASE_BATCH)``."""
    return BASE_LR * math.sqrt(batch_size / BASE_BATCH)


def summarize(accuracy: dict[str, dict[str, list[float]]], batch_sizes: tuple[int, ...]) -> dict:
    """The derived quantities: per batch size the best norm, and BN's drop from its best batch size.

    Args:
        accuracy: ``accuracy[norm][str(batch_size)]`` is the per-seed test accuracy.
        batch_sizes: the batch sizes, ascending.

    Returns:
        ``{"best_norm": {size: norm}, "bn_best_size": size, "bn_drop": {size: points}, "bn_rank": {size: rank}}``
        (``bn_drop`` in accuracy points, ``bn_rank`` 1 = best of the norms).
    """
    means = {norm: {size: statistics.fmean(accuracy[norm][str(size)]) for size in batch_sizes} for norm in accuracy}
    best_norm = {str(size): max(means, key=lambda norm: means[norm][size]) for size in batch_sizes}
    bn = means["BN"]
    bn_best_size = max(batch_sizes, key=lambda size: bn[size])
    bn_drop = {str(size): 100 * (bn[bn_best_size] - bn[size]) for size in batch_sizes}
    bn_rank = {str(size): 1 + sum(means[norm][size] > bn[size] for norm in means) for size in batch_sizes}
    return {"best_norm": best_norm, "bn_best_size": bn_best_size, "bn_drop": bn_drop, "bn_rank": bn_rank}


def measured_sentence(accuracy: dict[str, dict[str, list[float]]], batch_sizes: tuple[int, ...]) -> str:
    """One sentence on what the numbers say about the claim, whichever way they went.

    Args:
        accuracy: ``accuracy[norm][str(batch_size)]`` is the per-seed test accuracy.
        batch_sizes: the batch sizes, ascending.

    Returns:
        The sentence.
    """
    derived = summarize(accuracy, batch_sizes)
    smallest = batch_sizes[0]
    bn_small = mean_std(accuracy["BN"][str(smallest)])
    drop = derived["bn_drop"][str(smallest)]
    winner = derived["best_norm"][str(smallest)]
    independent = [norm for norm in BATCH_INDEPENDENT if norm in accuracy]
    best_independent = max(independent, key=lambda n: statistics.fmean(accuracy[n][str(smallest)]))
    independent_small = statistics.fmean(accuracy[best_independent][str(smallest)])
    noise = max(bn_small["std"] or 0.0, 0.005)
    bn_drops = drop > 100 * noise
    independent_wins = independent_small > bn_small["mean"] + noise
    verdict = ("agrees with the article" if bn_drops and independent_wins else
               "partly agrees with the article" if bn_drops or independent_wins else
               "disagrees with the article")
    wins_at = [size for size in batch_sizes if derived["best_norm"][str(size)] == "BN"]
    bn_wins = f"BN is the best norm at batch size(s) {', '.join(map(str, wins_at))}" if wins_at else \
        "BN is the best norm at no batch size"
    return (f"At batch size {smallest} BN reaches {bn_small['mean']:.3f} test accuracy, {drop:.1f} points below its "
            f"best (batch size {derived['bn_best_size']}), while {best_independent} reaches {independent_small:.3f} "
            f"and the best norm there is {winner}; {bn_wins}. This {verdict} "
            "(a drop or a win counts when it exceeds BN's seed std, at least 0.5 points).")


def run(settings: Settings) -> dict:
    """Train every norm at every batch size for every seed; test accuracy in eval mode.

    Args:
        settings: quick or full, the seeds, the progress factory.

    Returns:
        The result (``config``, ``table``, ``measured``, per-seed ``accuracy``, ``derived``).
    """
    sizes_and_epochs = QUICK if settings.quick else FULL
    batch_sizes, epochs = sizes_and_epochs["batch_sizes"], sizes_and_epochs["epochs"]
    min_steps = sizes_and_epochs["min_steps"]
    split = load_digits()
    num_examples = len(split.y_train)
    runs = [(norm, size, seed) for seed in settings.seeds for size in batch_sizes for norm in NORMS]
    advance = settings.progress(f"{NAME}: {len(NORMS)} norms x {len(batch_sizes)} batch sizes", len(runs))
    accuracy: dict[str, dict[str, list[float]]] = {norm: {str(size): [] for size in batch_sizes} for norm in NORMS}
    for done, (norm, size, seed) in enumerate(runs, start=1):
        steps = steps_for(size, epochs, num_examples, min_steps)
        model = build(norm, seed, steps)
        history = train(model, split, steps=steps, batch_size=size, lr=learning_rate(size), seed=seed,
                        optimizer=OPTIMIZER, eval_every=steps)
        accuracy[norm][str(size)].append(history.final_accuracy)
        advance(done)
    columns = ["norm", *(f"batch {size}" for size in batch_sizes)]
    rows = [[norm, *(fmt(mean_std(accuracy[norm][str(size)])) for size in batch_sizes)] for norm in NORMS]
    derived = summarize(accuracy, batch_sizes)
    rows.append(["best norm", *(derived["best_norm"][str(size)] for size in batch_sizes)])
    rows.append(["BN's drop from its best (points)", *(f"{derived['bn_drop'][str(size)]:.1f}" for size in batch_sizes)])
    config = {
        "data": "digits 8x8 (1347 train / 450 test), images as (1, 8, 8)",
        "model": f"cnn((8, 8), 10, channels={list(CHANNELS)}): conv3 -> norm -> ReLU per stage, stride 2 after the "
                 "first, global average pool, linear",
        "norms": {"BN": "BatchNorm2d (momentum 0.1)", "GN": f"GroupNorm, {GN_CHANNELS_PER_GROUP} channels per group",
                  "LN": "GroupNorm(1, C): each sample over (C, H, W)", "IN": "InstanceNorm2d(affine=True)",
                  "BatchRenorm": f"BatchRenorm2d(rmax={RENORM_RMAX}, dmax={RENORM_DMAX}), r/d held at 1/0 for "
                                 f"{WARMUP_FRACTION:.0%} of the steps, ramped to the bounds by half of the steps",
                  "Ghost BN": f"GhostBatchNorm2d(virtual_batch_size={GHOST_BATCH}) (plain BN at batch <= "
                              f"{GHOST_BATCH})",
                  "Cross-iteration BN": f"CrossIterationBatchNorm2d(window={CBN_WINDOW}), burn-in "
                                        f"{WARMUP_FRACTION:.0%} of the steps, bound to the preceding conv",
                  "Streaming BN": "StreamingBatchNorm2d (momentum 0.1): normalizes with the EMA statistics"},
        "batch_sizes": list(batch_sizes),
        "epochs": epochs,
        "min_steps": min_steps,
        "steps": {str(size): steps_for(size, epochs, num_examples, min_steps) for size in batch_sizes},
        "optimizer": "Adam (betas 0.9, 0.999), no weight decay",
        "learning_rate": {str(size): learning_rate(size) for size in batch_sizes},
        "learning_rate_rule": f"square-root scaling: {BASE_LR} x sqrt(batch / {BASE_BATCH})",
        "fairness": "same examples seen (fixed epochs, except where min_steps adds epochs for the largest batches) "
                    "at every batch size with the scaled learning rate; same initial conv/linear weights and batch "
                    "order for every norm of a seed",
        "evaluation": "test accuracy in eval mode (running statistics) after the last step",
    }
    return {"config": config,
            "table": {"columns": columns, "rows": rows,
                      "note": "Test accuracy (eval mode) after the same number of epochs at every batch size "
                              f"(at least {min_steps} steps), mean ± std over the seeds."},
            "measured": measured_sentence(accuracy, batch_sizes), "accuracy": accuracy, "derived": derived}


STYLES = {"BN": ("black", "o", "-"), "GN": ("tab:blue", "s", "-"), "LN": ("tab:orange", "^", "-"),
          "IN": ("tab:green", "v", "-"), "BatchRenorm": ("tab:red", "D", "--"), "Ghost BN": ("tab:purple", "P", "--"),
          "Cross-iteration BN": ("tab:brown", "X", "--"), "Streaming BN": ("tab:pink", "*", "--")}


def plot(result: dict, path) -> None:
    """Test accuracy vs batch size (log2 axis), one line per norm with ±1 std error bars over the seeds (the norms
    are dodged sideways a little so that the bars do not hide each other)."""
    from ._plotting import figure, save

    sizes = result["config"]["batch_sizes"]
    norms = list(result["accuracy"])
    fig, (ax,) = figure(width=8.0, height=4.6)
    for index, norm in enumerate(norms):
        stats = [mean_std(result["accuracy"][norm][str(size)]) for size in sizes]
        dodge = 2 ** (0.04 * (index - (len(norms) - 1) / 2))
        color, marker, linestyle = STYLES.get(norm, (None, "o", "-"))
        ax.errorbar([size * dodge for size in sizes], [s["mean"] for s in stats], yerr=[s["std"] for s in stats],
                    label=norm, color=color, marker=marker, linestyle=linestyle, markersize=5, capsize=2,
                    linewidth=1.2)
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(size) for size in sizes])
    ax.minorticks_off()
    ax.set_xlabel("batch size (samples per step, log2 scale)")
    ax.set_ylabel("test accuracy (eval mode)")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), title="norm (±1 std)", title_fontsize=8)
    config = result["config"]
    save(fig, path, f"Test accuracy vs batch size ({config['epochs']} epochs, at least {config['min_steps']} steps; "
                    f"{len(result['seeds'])} seeds)")
