"""Choosing a hyperparameter on the validation part, never on the test part.

Every experiment that compares arms at their best settings (a learning rate per arm, an optimizer, a step count)
trains each candidate with every seed on a split that has a validation part (:func:`normkit.data.with_validation`),
picks one candidate per arm with :func:`select_on_validation`, and reports that candidate's *test* numbers.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from ..data import Split, with_validation
from ..data.validation import describe
from ._training import steps_to

VALIDATION_SIZE = 0.2
VALIDATION_SEED = 0


def carve(split: Split, size: int | float = VALIDATION_SIZE, seed: int = VALIDATION_SEED) -> tuple[Split, dict]:
    """The experiments' validation part: ``split`` with ``size`` of its training data held out (stratified, fixed
    seed), and the record for the result's ``"validation"`` key.

    Examples:
        >>> from normkit.data import load_digits
        >>> split, record = carve(load_digits())
        >>> record["examples"], record["train_examples"]
        (269, 1078)
    """
    carved = with_validation(split, size, seed)
    return carved, describe(carved, size, seed)


def validation_score(runs: Sequence[dict], target: float | None = None) -> tuple[float, float]:
    """How good one candidate is on validation, as a sortable key (higher is better).

    With ``target``, the first key is minus the mean validation steps to reach it (a seed that never reached it or
    diverged counts as infinitely slow), the second the mean final validation accuracy; without a target only the
    accuracy counts (``(0, accuracy)``). A diverged seed scores accuracy 0.

    Args:
        runs: the :meth:`~normkit.experiments._training.History.as_dict` of every seed of the candidate; they need a
            ``val_curve`` (train on a split with a validation part).
        target: validation accuracy whose steps-to-reach rank the candidates, or ``None``.

    Examples:
        >>> fast = [{"val_curve": [[0, 0.1], [50, 0.92]], "diverged_at": None}]
        >>> slow = [{"val_curve": [[0, 0.1], [50, 0.5], [100, 0.95]], "diverged_at": None}]
        >>> validation_score(fast, 0.9) > validation_score(slow, 0.9)
        True
        >>> validation_score(fast) < validation_score(slow)
        True
    """
    if any(not run.get("val_curve") for run in runs):
        raise ValueError("validation_score: a run has no validation curve; train on a split with a validation part "
                         "(normkit.data.with_validation(split)).")
    accuracy = statistics.fmean(0.0 if run["diverged_at"] is not None else run["val_curve"][-1][1] for run in runs)
    if target is None:
        return (0.0, accuracy)
    reached = [steps_to(run, target, "validation") if run["diverged_at"] is None else None for run in runs]
    mean_steps = math.inf if None in reached else statistics.fmean(reached)
    return (-mean_steps, accuracy)


def select_on_validation(values: Sequence, runs: Sequence[Sequence[dict]], target: float | None = None) -> dict:
    """The candidate value with the best :func:`validation_score` (the first such value on ties).

    Args:
        values: the candidates (e.g. learning rates).
        runs: per candidate, the run dicts of every seed.
        target: rank by validation steps to this accuracy first (then final validation accuracy), or ``None`` to
            rank by final validation accuracy.

    Returns:
        ``{"value", "index", "criterion", "scores"}`` (scores per candidate, for the JSON).

    Examples:
        >>> runs = [[{"val_curve": [[0, 0.1], [100, 0.80]], "diverged_at": None}],
        ...         [{"val_curve": [[0, 0.1], [100, 0.93]], "diverged_at": None}]]
        >>> select_on_validation([0.01, 0.1], runs)["value"]
        0.1
    """
    if len(values) != len(runs) or not values:
        raise ValueError(f"select_on_validation: expected one list of runs per candidate (at least one), got "
                         f"{len(values)} values and {len(runs)} lists.")
    scores = [validation_score(per_value, target) for per_value in runs]
    index = max(range(len(values)), key=lambda i: (scores[i], -i))
    criterion = (f"mean validation steps to {target:.0%}, then final validation accuracy"
                 if target is not None else "mean final validation accuracy")
    return {"value": values[index], "index": index, "criterion": criterion,
            "scores": [{"value": v, "validation_steps_to_target": None if not math.isfinite(-s[0]) else -s[0],
                        "validation_accuracy": s[1]} if target is not None else
                       {"value": v, "validation_accuracy": s[1]} for v, s in zip(values, scores, strict=True)]}
