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
        assert data["differences"][act]["verdict"] in ("before", "after", "none")
        assert "ci95" in data["differences"][act] and "ci95" in data["differences"][act]["speed"]
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
    ([0.70, 0.65, 0.72], [0.68, 0.69, 0.70], "none"),    # the 95% CI of the paired difference spans zero
    ([0.705, 0.75], [0.70, 0.70], "none"),               # two seeds: a wide interval
])
def test_a_winner_needs_a_confidence_interval_that_excludes_zero(first, second, verdict):
    result = paired_difference(first, second)
    assert result["verdict"] == verdict
    assert result["n"] == len(first)


def _summary(before, after):
    stat = lambda mean: {"final_accuracy": {"mean": mean}, "steps_to_target": mean_std([100, None])}  # noqa: E731
    return {"before": stat(before), "after": stat(after)}


@pytest.mark.parametrize(("verdicts", "expected"), [
    (("before", "before"), "ended more accurate, as the article prefers"),
    (("before", "none"), "for ReLU only, as the article prefers"),
    (("none", "none"), "no difference in final accuracy detected"),
    (("after", "none"), "against the article"),
    (("after", "before"), "depends on the activation"),
])
def test_measured_sentence_follows_the_verdicts(verdicts, expected):
    speed = {"mean": None, "ci95": None, "verdict": "none"}
    differences = {act: {"mean": 0.02, "ci95": [0.01, 0.03] if v != "none" else [-0.01, 0.05], "verdict": v,
                         "speed": speed} for act, v in zip(placement.ACTIVATIONS, verdicts, strict=True)}
    summary = {act: _summary(0.7, 0.68) for act in placement.ACTIVATIONS}
    sentence = placement.measured(summary, differences)
    assert expected in sentence
    assert "70.0% before vs 68.0% after" in sentence
    assert "60% after 100 steps (1/2 seeds) vs 100 steps (1/2 seeds)" in sentence
    assert "no seed reached it with both placements" in sentence


def test_speed_difference_counts_only_seeds_where_both_placements_arrive():
    runs = lambda *steps: [{"final_accuracy": 0.6, "steps_to_target": s} for s in steps]  # noqa: E731
    diff = placement.placement_difference({"before": runs(100, 150, 120, None), "after": runs(300, 350, 330, 200)})
    assert diff["speed"]["n"] == 3 and diff["speed"]["verdict"] == "before"
    assert diff["speed"]["mean"] == pytest.approx(610 / 3)
