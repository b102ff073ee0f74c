"""Paired comparisons over seeds: which of two arms is better, or whether seed noise hides the difference."""

from __future__ import annotations

from collections.abc import Sequence

from ._training import mean_std

VERDICTS = ("first", "second", "tie")


def paired_difference(first: Sequence[float], second: Sequence[float], tie_margin: float) -> dict:
    """The per-seed difference ``first - second`` (mean ± std) and which arm it favours.

    An arm wins only when the mean difference exceeds both ``tie_margin`` and one standard deviation of the
    per-seed differences; otherwise the verdict is ``"tie"``. Pairing by seed removes what the two arms share
    (initial weights, batches), so the test is sharper than comparing two means.

    Args:
        first, second: one value per seed, in the same seed order (higher is better).
        tie_margin: the smallest mean difference that counts (e.g. 0.01 for one point of accuracy).

    Returns:
        :func:`~normkit.experiments._training.mean_std` of the differences plus ``"verdict"``: ``"first"``,
        ``"second"`` or ``"tie"``.

    Examples:
        >>> paired_difference([0.90, 0.92, 0.91], [0.80, 0.83, 0.81], 0.01)["verdict"]
        'first'
        >>> paired_difference([0.70, 0.65, 0.72], [0.68, 0.69, 0.70], 0.01)["verdict"]
        'tie'
        >>> paired_difference([0.5, 0.6], [0.7, 0.8], 0.01)["verdict"]
        'second'
    """
    diffs = [a - b for a, b in zip(first, second, strict=True)]
    stat = mean_std(diffs)
    mean, std = stat["mean"], stat["std"]
    if mean is None or abs(mean) <= max(tie_margin, std):
        verdict = "tie"
    else:
        verdict = "first" if mean > 0 else "second"
    return {**stat, "verdict": verdict}
