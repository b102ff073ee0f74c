"""Paired comparisons over seeds, with 95 % confidence intervals: which arm is better, or that no difference was
detected.

Every comparison pairs the two arms by seed (same initial weights, same batches), takes the per-seed differences and
reports their mean with a two-sided 95 % Student-t interval. An arm wins only when the interval excludes zero;
otherwise the verdict is ``"none"``: no difference detected, which with a handful of seeds is not evidence of no
effect (the interval says how large an effect could still hide).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from ._training import mean_std

VERDICTS = ("first", "second", "none")
CONFIDENCE = 0.95


def mean_ci(values: Sequence[float | None]) -> dict:
    """:func:`~normkit.experiments._training.mean_std` of the values plus ``"ci95"``: ``[low, high]``, the 95 %
    t interval of the mean (``None`` with fewer than two values; ``None`` entries are left out), and ``"verdict"``:
    ``"first"`` when the interval lies above zero, ``"second"`` below, ``"none"`` when it spans zero.

    Examples:
        >>> stat = mean_ci([1.0, 2.0, 3.0])
        >>> stat["mean"], [round(v, 3) for v in stat["ci95"]]
        (2.0, [-0.484, 4.484])
        >>> mean_ci([5.0])["ci95"] is None
        True
    """
    stat = mean_std(values)
    if stat["n"] < 2:
        return {**stat, "ci95": None, "verdict": "none"}
    from scipy.stats import t

    half = float(t.ppf(0.5 + CONFIDENCE / 2, stat["n"] - 1)) * stat["std"] / math.sqrt(stat["n"])
    ci = [stat["mean"] - half, stat["mean"] + half]
    return {**stat, "ci95": ci, "verdict": _verdict(ci)}


def _verdict(ci: list[float] | None, zero: float = 0.0) -> str:
    if ci is None or ci[0] <= zero <= ci[1]:
        return "none"
    return "first" if ci[0] > zero else "second"


def paired_difference(first: Sequence[float | None], second: Sequence[float | None]) -> dict:
    """The per-seed differences ``first - second``: mean, std, 95 % CI and which arm they favour.

    Seeds where either arm has no value (``None``, e.g. a target never reached) are left out; ``n`` says how many
    pairs counted.

    Args:
        first, second: one value per seed, in the same seed order (higher is better).

    Returns:
        :func:`mean_ci` of the differences plus ``"verdict"``: ``"first"`` or ``"second"`` when the 95 % CI lies
        above or below zero, ``"none"`` when it spans zero (or fewer than two pairs counted).

    Examples:
        >>> paired_difference([0.90, 0.92, 0.91], [0.80, 0.83, 0.81])["verdict"]
        'first'
        >>> paired_difference([0.70, 0.65, 0.72], [0.68, 0.69, 0.70])["verdict"]
        'none'
        >>> paired_difference([0.5, 0.6, 0.55], [0.7, 0.8, 0.76])["verdict"]
        'second'
    """
    if len(first) != len(second):
        raise ValueError(f"paired_difference: expected one value per seed in both arms, got {len(first)} and "
                         f"{len(second)}.")
    diffs = [None if a is None or b is None else a - b for a, b in zip(first, second, strict=True)]
    return mean_ci(diffs)


def paired_ratio(first: Sequence[float | None], second: Sequence[float | None]) -> dict:
    """The per-seed ratios ``first / second`` summarised on the log scale: geometric mean and 95 % CI.

    Use it for quantities that compare by ratio (steps to a target). Non-positive or missing pairs are left out.

    Returns:
        ``{"mean": geometric mean ratio, "ci95": [low, high] or None, "n", "values": per-seed ratios (None where
        left out), "verdict"}``: ``"first"`` when the CI lies above 1, ``"second"`` below 1, else ``"none"``.

    Examples:
        >>> r = paired_ratio([300, 280, 310], [100, 120, 110])
        >>> round(r["mean"], 2), r["verdict"]
        (2.7, 'first')
    """
    if len(first) != len(second):
        raise ValueError(f"paired_ratio: expected one value per seed in both arms, got {len(first)} and "
                         f"{len(second)}.")
    logs = [math.log(a / b) if a is not None and b is not None and a > 0 and b > 0 else None
            for a, b in zip(first, second, strict=True)]
    stat = mean_ci(logs)
    ci = None if stat["ci95"] is None else [math.exp(v) for v in stat["ci95"]]
    return {"mean": None if stat["mean"] is None else math.exp(stat["mean"]), "ci95": ci, "n": stat["n"],
            "values": [None if v is None else math.exp(v) for v in logs], "verdict": _verdict(ci, 1.0)}


def describe(stat: dict, *, scale: float = 100.0, unit: str = " points", spec: str = "+.1f") -> str:
    """A difference for a sentence: ``"+1.9 points (95% CI +0.8 to +3.0)"``, or, when the CI spans zero,
    ``"no difference detected (+0.3 points, 95% CI -1.2 to +1.8)"``.

    Args:
        stat: a :func:`paired_difference` (or :func:`mean_ci`) result.
        scale: multiplies every number (100 turns accuracy fractions into points).
        unit: text after the mean.
        spec: format of the numbers.

    Examples:
        >>> describe(paired_difference([0.90, 0.92, 0.91], [0.80, 0.83, 0.81]))
        '+9.7 points (95% CI +8.2 to +11.1)'
        >>> describe(paired_difference([0.70, 0.65, 0.72], [0.68, 0.69, 0.70]))
        'no difference detected (+0.0 points, 95% CI -8.6 to +8.6)'
    """
    if stat["mean"] is None:
        return "no pair of seeds to compare"
    mean = f"{stat['mean'] * scale:{spec}}{unit}"
    if stat.get("ci95") is None:
        return f"{mean} (one seed, no CI)"
    low, high = (v * scale for v in stat["ci95"])
    interval = f"95% CI {low:{spec}} to {high:{spec}}"
    if stat.get("verdict", _verdict(stat["ci95"])) == "none":
        return f"no difference detected ({mean}, {interval})"
    return f"{mean} ({interval})"


def describe_ratio(stat: dict, spec: str = ".1f") -> str:
    """A :func:`paired_ratio` for a sentence: ``"2.7x (95% CI 2.1-3.4x)"``.

    Examples:
        >>> describe_ratio(paired_ratio([300, 280, 310], [100, 120, 110]))
        '2.7x (95% CI 2.0-3.7x)'
    """
    if stat["mean"] is None:
        return "no pair of seeds to compare"
    if stat["ci95"] is None:
        return f"{stat['mean']:{spec}}x (one seed, no CI)"
    low, high = stat["ci95"]
    text = f"{stat['mean']:{spec}}x (95% CI {low:{spec}}-{high:{spec}}x)"
    return text if stat["verdict"] != "none" else f"no difference detected ({text})"
