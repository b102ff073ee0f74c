"""``normkit experiment train-eval-gap``: how much accuracy the EMA running statistics cost, and momentum's part.

A BN CNN on the 8x8 digits is trained at batch size 32 with each BN momentum (torch convention: the weight of the
new batch). At a few steps during training the same weights are evaluated three ways, each on its own copy so that
nothing in the trained model moves:

- ``running``: eval mode with the running (EMA) statistics, what ``model.eval()`` gives;
- ``precise``: eval mode after precise-BN recalibration (:func:`normkit.tools.recalibrate`) over the whole training
  set, i.e. the exact population statistics of the current weights;
- ``batch``: training-mode forward over test batches of the training batch size (batch statistics, as in training).

Every momentum of a seed starts from the same weights and sees the same batches; the momentum only changes the
running statistics, which training never reads, so the weights of all momenta are identical and only the
evaluation differs.
"""

from __future__ import annotations

import copy
import statistics

from torch import nn

from ..data import Split, load_digits
from ..tools import recalibrate
from ._harness import Settings
from ._training import accuracy, cnn, fmt, mean_std, train

NAME = "train-eval-gap"
TITLE = "Train/inference discrepancy: running statistics vs precise BN vs batch statistics"
CLAIM = ("BN behaves differently in training (batch statistics) and inference (moving averages), which can cause "
         "problems; the remedy is to train long enough for the moving statistics to settle, with a Keras momentum of "
         "0.9-0.99 (torch 0.1-0.01).")

METHODS = ("running", "precise", "batch")
LABELS = {"running": "eval, running statistics (EMA)", "precise": "eval after precise-BN recalibration",
          "batch": "batch statistics at test time (batches of 32)"}
FULL = {"momenta": (0.01, 0.03, 0.1, 0.3, 0.9), "steps": 400, "checkpoints": (10, 25, 50, 100, 200, 400),
        "recalibration_batches": None}
QUICK = {"momenta": (0.01, 0.9), "steps": 6, "checkpoints": (3, 6), "recalibration_batches": 4}
CHANNELS = (16, 32)
BATCH_SIZE = 32
LR = 0.1
SGD_MOMENTUM = 0.9
RECOMMENDED = (0.01, 0.1)  # the article's Keras momentum 0.9-0.99, in torch's convention
VANISHED = 1.0  # accuracy points: a gap below this counts as gone


def set_bn_momentum(model: nn.Module, momentum: float) -> nn.Module:
    """Set the EMA momentum of every batch norm in ``model`` (torch convention); returns ``model``."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    return model


def evaluate_three_ways(model: nn.Module, split: Split, batch_size: int,
                        recalibration_batches: int | None = None) -> dict[str, float]:
    """Test accuracy of ``model``'s current weights with running, recalibrated and batch statistics.

    Each evaluation runs on a deep copy, so ``model`` (weights, buffers, mode) is left exactly as it was.

    Args:
        model: a model with batch norms.
        split: the data; the training set feeds the recalibration, the test set is scored.
        batch_size: the batch size of the recalibration and of the batch-statistics evaluation.
        recalibration_batches: recalibrate over the first this many training batches (``None``: all of them).

    Returns:
        ``{"running": acc, "precise": acc, "batch": acc}``.
    """
    running = accuracy(copy.deepcopy(model), split.x_test, split.y_test)
    recalibrated = recalibrate(copy.deepcopy(model), list(split.x_train.split(batch_size)),
                               num_batches=recalibration_batches)
    precise = accuracy(recalibrated, split.x_test, split.y_test)
    batch = accuracy(copy.deepcopy(model), split.x_test, split.y_test, training=True, batch_size=batch_size)
    return {"running": running, "precise": precise, "batch": batch}


def gaps(curves: dict[str, dict[str, list[list[float]]]]) -> dict[str, list[list[float]]]:
    """The precise-minus-running gap in accuracy points per momentum and checkpoint.

    Args:
        curves: ``curves[method][momentum]`` is ``[[step, acc], ...]`` for one seed.

    Returns:
        ``{momentum: [[step, points], ...]}``.
    """
    return {momentum: [[step, 100 * (precise - running)] for (step, precise), (_, running)
                       in zip(curves["precise"][momentum], curves["running"][momentum], strict=True)]
            for momentum in curves["running"]}


def final(curve: list[list[float]]) -> float:
    """The value at the last checkpoint of a ``[[step, value], ...]`` curve."""
    return curve[-1][1]


def mean_gap_curve(per_seed: list[dict], momentum: str) -> list[list[float]]:
    """The seed-mean precise-minus-running gap curve ``[[step, points], ...]`` of one momentum."""
    curves = [seed["gaps"][momentum] for seed in per_seed]
    return [[step, statistics.fmean(curve[i][1] for curve in curves)] for i, (step, _) in enumerate(curves[0])]


def measured_sentence(per_seed: list[dict], momenta: tuple[float, ...], default: float = 0.1) -> str:
    """One sentence on the train/inference gap and momentum's effect, computed from the per-seed curves.

    Args:
        per_seed: one ``{"curves": ..., "gaps": ...}`` per seed (see :func:`gaps`).
        momenta: the momenta (torch convention), ascending.
        default: the momentum the sentence leads with (torch's default, when it was run).

    Returns:
        The sentence.
    """
    lead = str(default) if default in momenta else str(momenta[len(momenta) // 2])
    lead_curve = mean_gap_curve(per_seed, lead)
    peak_step, peak = max(lead_curve, key=lambda point: point[1])
    last_step, last = lead_curve[-1]
    end = {method: statistics.fmean(final(seed["curves"][method][lead]) for seed in per_seed) for method in METHODS}
    final_gap = {m: final(mean_gap_curve(per_seed, str(m))) for m in momenta}
    smallest = min(momenta, key=lambda m: abs(final_gap[m]))
    in_article_range = RECOMMENDED[0] <= smallest <= RECOMMENDED[1]
    shrinks = "shrinks with training" if last < peak - VANISHED else "does not shrink with training"
    gone = "and is gone" if abs(last) < VANISHED else "but has not vanished"
    return (f"With momentum {lead} (Keras {1 - float(lead):g}) the running statistics give {end['running']:.3f} test "
            f"accuracy after {int(last_step)} steps vs {end['precise']:.3f} after precise-BN recalibration and "
            f"{end['batch']:.3f} with batch statistics: the gap is {last:+.1f} points at the end after a peak of "
            f"{peak:+.1f} at step {int(peak_step)}, so it {shrinks} {gone}; across momenta the end gap is smallest at "
            f"{smallest:g} (Keras {1 - smallest:g}, {final_gap[smallest]:+.1f} points), "
            f"{'inside' if in_article_range else 'outside'} the article's Keras 0.9-0.99 "
            f"(torch {RECOMMENDED[0]:g}-{RECOMMENDED[1]:g}, end gaps "
            f"{', '.join(f'{final_gap[m]:+.1f}' for m in momenta if RECOMMENDED[0] <= m <= RECOMMENDED[1])} points).")


def run(settings: Settings) -> dict:
    """Train one BN CNN per momentum and seed and evaluate it three ways at every checkpoint.

    Args:
        settings: quick or full, the seeds, the progress factory.

    Returns:
        The result (``config``, ``table``, ``measured``, per-seed ``per_seed`` curves and gaps).
    """
    setup = QUICK if settings.quick else FULL
    momenta, steps, checkpoints = setup["momenta"], setup["steps"], setup["checkpoints"]
    recalibration_batches = setup["recalibration_batches"]
    split = load_digits()
    advance = settings.progress(f"{NAME}: {len(momenta)} momenta", len(settings.seeds) * len(momenta) * steps)
    per_seed = []
    done = 0
    for seed in settings.seeds:
        curves: dict[str, dict[str, list[list[float]]]] = {method: {} for method in METHODS}
        for momentum in momenta:
            model = set_bn_momentum(cnn((8, 8), 10, CHANNELS, norm="bn", seed=seed), momentum)
            points: dict[str, list[list[float]]] = {method: [] for method in METHODS}

            def on_step(step: int, model: nn.Module = model, points: dict = points, offset: int = done) -> None:
                if step in checkpoints:
                    for method, value in evaluate_three_ways(model, split, BATCH_SIZE, recalibration_batches).items():
                        points[method].append([step, value])
                advance(offset + step)

            train(model, split, steps=steps, batch_size=BATCH_SIZE, lr=LR, seed=seed, momentum=SGD_MOMENTUM,
                  eval_every=steps, on_step=on_step)
            done += steps
            for method in METHODS:
                curves[method][str(momentum)] = points[method]
        per_seed.append({"seed": seed, "curves": curves, "gaps": gaps(curves)})
    columns = ["BN momentum (torch)", *(f"{LABELS[m]}" for m in METHODS), "gap precise - running (points), end",
               "largest gap during training (points)"]
    rows = []
    for momentum in momenta:
        key = str(momentum)
        row = [f"{momentum:g} (Keras {1 - momentum:g})"]
        row += [fmt(mean_std([final(seed["curves"][method][key]) for seed in per_seed])) for method in METHODS]
        row += [fmt(mean_std([final(seed["gaps"][key]) for seed in per_seed]), ".1f"),
                fmt(mean_std([max(gap for _, gap in seed["gaps"][key]) for seed in per_seed]), ".1f")]
        rows.append(row)
    config = {
        "data": "digits 8x8 (1347 train / 450 test)",
        "model": f"cnn((8, 8), 10, channels={list(CHANNELS)}, norm='bn'): conv3 -> BatchNorm2d -> ReLU per stage, "
                 "global average pool, linear",
        "momenta": list(momenta),
        "momentum_convention": "torch: running = (1 - m) * running + m * batch; Keras momentum = 1 - m",
        "steps": steps, "checkpoints": list(checkpoints), "batch_size": BATCH_SIZE,
        "optimizer": f"SGD, constant lr {LR} (no decay), momentum {SGD_MOMENTUM}, no weight decay",
        "precise_bn": f"normkit.tools.recalibrate over the training set in batches of {BATCH_SIZE} "
                      "(estimator='population')",
        "recalibration_batches": recalibration_batches or "all",
        "batch_statistics": f"train-mode forward over the test set in batches of {BATCH_SIZE}, on a copy",
        "evaluation": "every method on a deep copy of the weights at the checkpoint; training never reads the "
                      "running statistics, so all momenta of a seed share the same weights",
    }
    return {"config": config,
            "table": {"columns": columns, "rows": rows,
                      "note": f"Test accuracy after {steps} steps (mean ± std over the seeds); the gaps are "
                              "precise-BN minus running-statistics accuracy in points, at the end and the largest over "
                              f"the checkpoints {', '.join(map(str, checkpoints))}."},
            "measured": measured_sentence(per_seed, momenta), "per_seed": per_seed}


def plot(result: dict, path) -> None:
    """Left: final test accuracy per evaluation method vs momentum; right: the precise-minus-running gap vs step."""
    import numpy as np

    from ._plotting import band, curves_mean_std, figure, save

    momenta = result["config"]["momenta"]
    per_seed = result["per_seed"]
    fig, (left, right) = figure(ncols=2, width=5.6, height=4.2)
    for method, color in zip(METHODS, ("tab:red", "tab:blue", "tab:gray"), strict=True):
        values = np.array([[final(seed["curves"][method][str(m)]) for m in momenta] for seed in per_seed])
        std = values.std(axis=0, ddof=1) if len(per_seed) > 1 else np.zeros(len(momenta))
        band(left, momenta, values.mean(axis=0), std, label=LABELS[method], color=color, marker="o")
    left.set_xscale("log")
    left.set_xticks(momenta, [f"{m:g}" for m in momenta])
    left.minorticks_off()
    left.set_xlabel("BN momentum, torch convention (log scale)")
    left.set_ylabel(f"test accuracy after {result['config']['steps']} steps")
    left.legend(fontsize=7, loc="best")
    for momentum in momenta:
        steps, mean, std = curves_mean_std([seed["gaps"][str(momentum)] for seed in per_seed])
        band(right, steps, mean, std, label=f"momentum {momentum:g}", marker=".")
    right.axhline(0.0, color="black", linewidth=0.8)
    right.set_xscale("log")
    checkpoints = result["config"]["checkpoints"]
    right.set_xticks(checkpoints, [str(step) for step in checkpoints])
    right.minorticks_off()
    right.set_xlabel("training step (log scale)")
    right.set_ylabel("precise BN minus running stats (acc. points)")
    right.legend(fontsize=7)
    save(fig, path, "What the EMA running statistics cost, by momentum and training length")
