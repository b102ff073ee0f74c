"""The figure of ``normkit demo``: test accuracy vs step, and the sigmoid-input percentiles (paper Fig. 1 a-c).

matplotlib is imported here only, inside :func:`plot_demo`, with the Agg backend: ``import normkit`` stays light.
"""

from __future__ import annotations

from pathlib import Path

from .demo import settles_at

COLORS = {"plain": "#d95f02", "batchnorm": "#1b9e77"}
SETTLED = 0.5  # a median within this of its final value (sigmoid-input units) counts as settled


def plot_demo(result: dict, path: str | Path) -> Path:
    """Write the demo's figure to ``path`` (PNG): accuracy curves, then one percentile panel per arm.

    Panel (a): test accuracy vs training step for both arms, the target as a dashed line and the step where each arm
    first reaches it marked. Panels (b) without BN and (c) with BN: the 15th, 50th and 85th percentiles over the test
    set of the input to one sigmoid of the last hidden layer, vs training step, on a shared vertical axis; each
    title gives the median's start and end, the step from which it stays within :data:`SETTLED` of its end
    (:func:`~normkit.experiments.demo.settles_at`), and the spread's start and end: numbers, not adjectives, since
    a distribution that settles early need not be centred.

    Args:
        result: the dict returned by :func:`normkit.experiments.demo.run_demo`.
        path: the PNG to write; its directory must exist.

    Returns:
        ``path`` as a :class:`pathlib.Path`.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib import pyplot as plt

    config, arms = result["config"], result["arms"]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.8), constrained_layout=True)
    _accuracy_panel(axes[0], result)
    limits = [min(min(row[1:]) for arm in arms.values() for row in arm["sigmoid_input"]),
              max(max(row[1:]) for arm in arms.values() for row in arm["sigmoid_input"])]
    pad = 0.05 * (limits[1] - limits[0] or 1.0)
    for axis, arm, letter in ((axes[1], "plain", "b"), (axes[2], "batchnorm", "c")):
        _percentile_panel(axis, arms[arm], arm, letter, config)
        axis.set_ylim(limits[0] - pad, limits[1] + pad)
    figure.suptitle(
        f"normkit demo: sigmoid {config['model'].split(',')[0]} on {config['dataset']}, SGD lr={config['lr']:g}, "
        f"batch {config['batch_size']}, seed {config['seed']}",
        fontsize=12,
    )
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _accuracy_panel(axis, result: dict) -> None:
    config = result["config"]
    target = config["target"]
    for arm, data in result["arms"].items():
        steps, accuracies = zip(*data["curve"], strict=True)
        reached = data["steps_to_target"]
        suffix = f"{target:.0%} at step {reached}" if reached is not None else f"not {target:.0%} in {steps[-1]}"
        axis.plot(steps, [100 * a for a in accuracies], color=COLORS[arm], lw=1.8, label=f"{data['label']} ({suffix})")
        if reached is not None:
            axis.plot([reached], [100 * dict(data["curve"])[reached]], "o", color=COLORS[arm], ms=7)
    axis.axhline(100 * target, color="0.3", ls="--", lw=1, label=f"target {target:.0%}")
    ratio = result["ratio"]
    if ratio is not None and ratio > 1:
        message = f"BN reaches {target:.0%} in {ratio:.1f}x fewer steps"
    elif ratio is not None and ratio < 1:
        message = f"BN needs {1 / ratio:.1f}x more steps to {target:.0%}"
    elif ratio is not None:
        message = f"both reach {target:.0%} at the same step"
    elif result["ratio_lower_bound"] is not None:
        message = f"BN reaches {target:.0%} in over {result['ratio_lower_bound']:.0f}x fewer steps"
    else:
        message = "test accuracy during training"
    axis.set_title(f"(a) {message}\nat one shared lr ({config['lr']:g}), one seed", fontsize=11)
    axis.set_xlabel("training step (SGD update, batch of 60)")
    axis.set_ylabel("test accuracy (%)")
    axis.set_ylim(0, 100)
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right", fontsize=9)


def _percentile_panel(axis, data: dict, arm: str, letter: str, config: dict) -> None:
    steps, low, median, high = zip(*data["sigmoid_input"], strict=True)
    low_p, mid_p, high_p = config["percentiles"]
    color = COLORS[arm]
    axis.fill_between(steps, low, high, color=color, alpha=0.25, lw=0, label=f"{low_p}th to {high_p}th percentile")
    axis.plot(steps, median, color=color, lw=1.8, label=f"{mid_p}th percentile (median)")
    axis.plot(steps, low, color=color, lw=0.8)
    axis.plot(steps, high, color=color, lw=0.8)
    axis.axhline(0, color="0.5", lw=0.6)
    settled = settles_at(data["sigmoid_input"], column=2, tolerance=SETTLED)
    axis.set_title(
        f"({letter}) {data['label']}: sigmoid input over training\n"
        f"median {median[0]:+.2f} \u2192 {median[-1]:+.2f} (within \u00b1{SETTLED:g} of it from step {settled})\n"
        f"{low_p}-{high_p}th spread {high[0] - low[0]:.2f} \u2192 {high[-1] - low[-1]:.2f}",
        fontsize=11,
    )
    axis.set_xlabel("training step (SGD update, batch of 60)")
    axis.set_ylabel(f"sigmoid input (pre-activation), unit {config['unit']} of hidden layer {config['layer']}")
    axis.grid(alpha=0.3)
    axis.legend(loc="upper left", fontsize=9)
