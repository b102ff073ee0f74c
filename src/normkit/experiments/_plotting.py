"""matplotlib, imported only when a figure is drawn, with the Agg backend and one house style."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def figure(ncols: int = 1, nrows: int = 1, *, width: float = 5.0, height: float = 3.6):
    """A figure and its axes (always a flat list), headless."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(width * ncols, height * nrows), squeeze=False)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    return fig, list(axes.flat)


def band(ax, x: Sequence[float], mean: Sequence[float], std: Sequence[float], *, label: str, **kwargs) -> None:
    """A mean line with a ±1 std band."""
    import numpy as np

    mean_, std_ = np.asarray(mean, dtype=float), np.asarray(std, dtype=float)
    (line,) = ax.plot(x, mean_, label=label, **kwargs)
    ax.fill_between(x, mean_ - std_, mean_ + std_, color=line.get_color(), alpha=0.2, linewidth=0)


def curves_mean_std(curves: Sequence[Sequence[Sequence[float]]]) -> tuple[list[float], list[float], list[float]]:
    """Steps, mean and std of several ``[[step, value], ...]`` curves over the steps all of them share."""
    import numpy as np

    shared = sorted(set.intersection(*({step for step, _ in curve} for curve in curves)))
    values = np.array([[dict((s, v) for s, v in curve)[step] for step in shared] for curve in curves], dtype=float)
    std = values.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(len(shared))
    return shared, values.mean(axis=0).tolist(), std.tolist()


def save(fig, path: Path, title: str | None = None) -> None:
    """Give ``fig`` its one-message title (wrapped to the figure's width, never clipped), save it as PNG, close it."""
    import textwrap

    import matplotlib.pyplot as plt

    if title:
        characters = max(30, int(fig.get_figwidth() * 11))  # ~11 characters per inch at the default title size
        fig.suptitle("\n".join(textwrap.wrap(title, characters)))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
