"""``normkit experiment learning-rate``: the quick run's files, determinism, and the logic behind its verdict."""

from __future__ import annotations

import json

import pytest

from normkit.experiments import _sweep, learning_rate
from normkit.experiments._harness import write
from normkit.experiments._training import mean_std

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("learning-rate")


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
        assert set(data["derived"][arm.name]) == {"highest_stable", "best_rate", "best_final_accuracy"}
    assert data["validation"]["examples"] > 0 and "ci95" in data["time_to_target"]["saving"]



def _summary(finals, diverged=(), val=None):
    val = finals if val is None else val
    runs = [{"final_accuracy": acc, "best_accuracy": acc, "final_val_accuracy": v,
             "diverged_at": 5 if i in diverged else None,
             "curve": [[0, 0.1], [10, acc]]} for i, (acc, v) in enumerate(zip(finals, val, strict=True))]
    return _sweep.summarize(runs, threshold=0.8, target=0.9)


def test_a_rate_is_stable_only_when_every_seed_trains_without_diverging():
    assert _summary([0.95, 0.9])["reliable"]
    assert not _summary([0.95, 0.7])["reliable"]          # one seed below the threshold
    diverged = _summary([0.95, 0.95], diverged=(1,))     # a non-finite loss, whatever the accuracy
    assert not diverged["reliable"] and diverged["diverged"] == 1
    assert diverged["outcomes"] == ["trained", "diverged"]
    assert _summary([0.95, 0.85])["steps_to_target"]["values"] == [10, None]


def test_highest_stable_rate_and_best_rate_come_from_the_summaries():
    values = [0.1, 1.0, 10.0, 100.0]
    derived = learning_rate.derive(values, [_summary([0.9, 0.9]), _summary([0.97, 0.95]), _summary([0.85, 0.85]),
                                            _summary([0.1, 0.1], diverged=(0, 1))])
    assert derived["highest_stable"] == 10.0
    assert derived["best_rate"] == 1.0 and derived["best_final_accuracy"]["mean"] == pytest.approx(0.96)
    assert _sweep.highest_reliable(values, [False] * 4) is None


def test_best_rate_is_chosen_on_validation_not_on_test():
    # rate 0.1 is best on test, rate 1.0 on validation: validation decides, its test accuracy is reported
    derived = learning_rate.derive([0.1, 1.0], [_summary([0.99, 0.99], val=[0.80, 0.80]),
                                                _summary([0.90, 0.92], val=[0.95, 0.95])])
    assert derived["best_rate"] == 1.0 and derived["best_final_accuracy"]["mean"] == pytest.approx(0.91)


def test_time_to_target_compares_each_arm_at_its_fastest_validation_rate():
    def run(test_steps, val_steps):
        return {"curve": [[0, 0.1], [test_steps, 0.96]], "val_curve": [[0, 0.1], [val_steps, 0.96]],
                "diverged_at": None}
    runs = {"plain": [[run(300, 300), run(320, 310)], [run(200, 100), run(210, 120)]],
            "batchnorm": [[run(40, 50), run(50, 40)], [run(90, 90), run(80, 90)]]}
    speed = learning_rate.time_to_target([0.1, 1.0], runs, {"target": 0.95, "steps": 600})
    assert speed["chosen"]["plain"]["value"] == 1.0 and speed["chosen"]["batchnorm"]["value"] == 0.1
    assert speed["test_steps"] == {"plain": [200, 210], "batchnorm": [40, 50]}
    assert speed["saving"]["mean"] == pytest.approx(1 - (40 / 200 + 50 / 210) / 2)
    assert "ci95" in speed["saving"] and "saving of" in learning_rate.speed_text(speed)


def _derived(plain, bn):
    acc = mean_std([0.9, 0.92])
    return {"plain": {"highest_stable": plain, "best_rate": 0.1, "best_final_accuracy": acc},
            "batchnorm": {"highest_stable": bn, "best_rate": 1.0, "best_final_accuracy": acc}}


@pytest.mark.parametrize(("plain", "bn", "expected"), [
    (0.3, 30.0, "100x higher, in line with the article"),
    (0.3, 100.0, "the top of the sweep"),
    (1.0, 1.0, "does not show the higher rates"),
    (3.0, 1.0, "contrary to the article"),
    (None, 1.0, "only the arm with BN"),
    (1.0, None, "only the arm without BN trained stably (up to lr=1), contrary"),
    (None, None, "cannot test the claim"),
])
def test_measured_sentence_follows_the_numbers(plain, bn, expected):
    sentence = learning_rate.measured(_derived(plain, bn), [0.1, 0.3, 1.0, 3.0, 30.0, 100.0])
    assert expected in sentence
    assert "lr=0.1 (final test accuracy 0.910 ± 0.014)" in sentence
