"""``normkit experiment placement``: the quick run's files, determinism, and the logic behind its verdict."""

from __future__ import annotations

import json

import pytest

from normkit.experiments import placement
from normkit.experiments._compare import paired_difference
from normkit.experiments._harness import write
from normkit.experiments._training import mean_std

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("placement")


def test_quick_run_covers_every_arm(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns = data["table"]["columns"]
    assert all(len(row) == len(columns) for row in data["table"]["rows"])
    assert len(data["table"]["rows"]) == len(placement.ACTIVATIONS) * len(placement.PLACEMENTS)
    for act in placement.ACTIVATIONS:
        assert data["differences"][act]["verdict"] in ("before", "after", "tie")
        for where in placement.PLACEMENTS:
            runs = data["per_seed"][act][where]
            assert [run["seed"] for run in runs] == list(SEEDS)
            assert all(run["curve"][-1][0] == data["config"]["steps"] for run in runs)



def test_the_arms_differ_only_in_the_order_of_the_layers():
    before = placement.mlp(40, 10, (8,), norm="bn", order=placement.PLACEMENTS["before"], seed=3)
    after = placement.mlp(40, 10, (8,), norm="bn", order=placement.PLACEMENTS["after"], seed=3)
    assert [type(m).__name__ for m in before] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [type(m).__name__ for m in after] == ["Linear", "ReLU", "BatchNorm1d", "Linear"]
    assert all(a.equal(b) for a, b in zip(before[0].parameters(), after[0].parameters(), strict=True))


@pytest.mark.parametrize(("first", "second", "verdict"), [
    ([0.90, 0.92, 0.91], [0.80, 0.83, 0.81], "first"),   # a clear lead in every seed
    ([0.60, 0.61, 0.60], [0.70, 0.72, 0.71], "second"),
    ([0.70, 0.65, 0.72], [0.68, 0.69, 0.70], "tie"),     # mean lead smaller than the seed-to-seed spread
    ([0.705, 0.706], [0.70, 0.70], "tie"),               # consistent, but below the margin
])
def test_a_winner_needs_a_lead_beyond_margin_and_seed_noise(first, second, verdict):
    result = paired_difference(first, second, tie_margin=0.01)
    assert result["verdict"] == verdict
    assert result["n"] == len(first)


def _summary(before, after):
    stat = lambda mean: {"final_accuracy": {"mean": mean}, "steps_to_target": mean_std([100, None])}  # noqa: E731
    return {"before": stat(before), "after": stat(after)}


@pytest.mark.parametrize(("verdicts", "expected"), [
    (("before", "before"), "holds here"),
    (("before", "tie"), "holds for ReLU only"),
    (("tie", "tie"), "not supported on this data"),
    (("after", "tie"), "against the article's preference"),
    (("after", "before"), "depends on the activation"),
])
def test_measured_sentence_follows_the_verdicts(verdicts, expected):
    differences = {act: {"mean": 0.02, "std": 0.01, "verdict": v} for act, v in zip(placement.ACTIVATIONS, verdicts,
                                                                                    strict=True)}
    summary = {act: _summary(0.7, 0.68) for act in placement.ACTIVATIONS}
    sentence = placement.measured(summary, differences)
    assert expected in sentence
    assert "70.0% before vs 68.0% after" in sentence
    assert "60% after 100 steps (1/2 seeds) vs 100 steps (1/2 seeds)" in sentence
