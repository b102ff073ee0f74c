"""``normkit experiment initialization``: the quick run's files, determinism, and the logic behind its verdict."""

from __future__ import annotations

import json
import math

import pytest
import torch

from normkit.experiments import _sweep, initialization
from normkit.experiments._harness import write
from normkit.experiments._training import cnn, mean_std, mlp

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("initialization")


def test_quick_run_covers_every_arm(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns = data["table"]["columns"]
    assert all(len(row) == len(columns) for row in data["table"]["rows"])
    assert len(data["table"]["rows"]) == len(data["config"]["values"])
    for arm in _sweep.ARMS:
        assert any(arm.label in column for column in columns)
        assert len(data["runs"][arm.name]) == len(data["config"]["values"])
        assert all(len(per_seed) == len(SEEDS) for per_seed in data["runs"][arm.name])
        assert set(data["derived"][arm.name]) == {"trains", "decades", "best_scale", "best_final_val_accuracy",
                                                  "best_final_accuracy"}
    assert data["validation"]["examples"] > 0 and "best init scale" in data["validation"]["used_for"]
    assert data["best_vs_best"]["n"] == len(SEEDS) and "ci95" in data["best_vs_best"]
    assert "at those scales BN − plain" in data["measured"]


def test_best_scale_is_chosen_on_validation_and_reports_its_test_accuracy(quick_result):
    values = quick_result["config"]["values"]
    for arm in _sweep.ARMS:
        summaries = quick_result["summary"][arm.name]
        val = [s["final_val_accuracy"]["mean"] for s in summaries]
        best = quick_result["derived"][arm.name]["best_scale"]
        index = values.index(best)
        assert val[index] == max(val)
        assert quick_result["derived"][arm.name]["best_final_accuracy"] == summaries[index]["final_accuracy"]


def test_scale_weights_scales_every_linear_and_conv_weight_but_no_bias_or_norm():
    for build in (lambda: mlp(64, 10, (8,), norm="bn", seed=3), lambda: cnn((8, 8), 10, (4, 8), norm="bn", seed=3)):
        reference, scaled = build(), initialization.scale_weights(build(), 0.5)
        for (name, before), after in zip(reference.named_parameters(), scaled.parameters(), strict=True):
            is_weight = name.endswith("weight") and before.dim() > 1
            assert torch.equal(after, 0.5 * before if is_weight else before), name


def test_reliable_range_is_the_longest_contiguous_stretch():
    values = [0.001, 0.01, 0.1, 1.0, 10.0, 100.0]
    assert _sweep.reliable_range(values, [True, False, True, True, True, False]) == (0.1, 10.0)
    assert _sweep.reliable_range(values, [True, True, False, True, True, False]) == (0.001, 0.01)  # tie: lower
    assert _sweep.reliable_range(values, [False, False, False, False, False, True]) == (100.0, 100.0)
    assert _sweep.reliable_range(values, [False] * 6) is None


def _summary(reliable, acc=0.9):
    return {"final_accuracy": mean_std([acc, acc]), "final_val_accuracy": mean_std([acc, acc]), "reliable": reliable,
            "outcomes": ["trained" if reliable else "failed"] * 2}


def test_derive_reports_the_range_its_width_and_the_best_scale():
    values = [0.01, 0.1, 1.0, 10.0]
    derived = initialization.derive(values, [_summary(False, 0.1), _summary(True, 0.95), _summary(True, 0.97),
                                             _summary(True)])
    assert derived["trains"] == [0.1, 10.0] and derived["decades"] == pytest.approx(2.0)
    assert derived["best_scale"] == 1.0
    assert initialization.derive(values, [_summary(False)] * 4)["trains"] is None


def test_derive_picks_the_best_scale_on_validation_not_on_test():
    values = [0.1, 1.0, 10.0]
    best_on_test = {**_summary(True, 0.99), "final_val_accuracy": mean_std([0.90, 0.90])}
    best_on_validation = {**_summary(True, 0.93), "final_val_accuracy": mean_std([0.96, 0.95])}
    derived = initialization.derive(values, [_summary(True, 0.9), best_on_test, best_on_validation])
    assert derived["best_scale"] == 10.0
    assert derived["best_final_accuracy"]["mean"] == pytest.approx(0.93)
    assert derived["best_final_val_accuracy"]["mean"] == pytest.approx(0.955)


def _arm(trains):
    decades = None if trains is None else math.log10(trains[1] / trains[0])
    return {"trains": trains, "decades": decades, "best_scale": 1.0, "best_final_accuracy": mean_std([0.9, 0.92])}


@pytest.mark.parametrize(("plain", "bn", "expected"), [
    ([0.3, 1.0], [0.01, 10.0], "wider range with BN, in line with the article"),
    ([0.3, 1.0], [0.001, 10.0], "reaching the bottom of the sweep"),
    ([0.1, 1.0], [1.0, 10.0], "equally wide range"),
    ([0.01, 10.0], [0.3, 1.0], "narrower range with BN, contrary to the article"),
    (None, [0.3, 1.0], "at no scale of the sweep without: a wider range with BN"),
    ([0.3, 1.0], None, "at no scale of the sweep with BN"),
    (None, None, "Neither arm trained at any scale of the sweep, so the data cannot test the claim"),
])
def test_measured_sentence_follows_the_numbers(plain, bn, expected):
    values = [0.001, 0.01, 0.1, 1.0, 10.0, 30.0]
    sentence = initialization.measured({"plain": _arm(plain), "batchnorm": _arm(bn)}, values)
    assert expected in sentence
    assert "best scale on validation without BN 1 (final test accuracy 0.910 ± 0.014)" in sentence
    assert "at those scales" not in sentence


@pytest.mark.parametrize(("difference", "expected"), [
    ({"mean": 0.02, "ci95": [0.01, 0.03], "verdict": "first"}, "at those scales BN − plain: +2.0 points (95% CI "
                                                               "+1.0 to +3.0)."),
    ({"mean": 0.01, "ci95": [-0.01, 0.03], "verdict": "none"}, "at those scales BN − plain: no difference detected "
                                                               "(+1.0 points, 95% CI -1.0 to +3.0)."),
])
def test_measured_sentence_gives_the_best_vs_best_difference_with_its_ci(difference, expected):
    derived = {"plain": _arm([0.3, 1.0]), "batchnorm": _arm([0.01, 10.0])}
    assert initialization.measured(derived, [0.001, 0.01, 0.1, 1.0, 10.0, 30.0], difference).endswith(expected)
