"""``normkit experiment train-eval-gap``: the quick run's files and schema, determinism, the three evaluations
leave the model untouched, and the gap / measured sentence on hand-made curves."""

from __future__ import annotations

import json

import pytest
import torch

from normkit.data import load_digits
from normkit.experiments import train_eval_gap
from normkit.experiments._harness import Settings, run_experiment, write
from normkit.experiments._training import cnn, train

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("train-eval-gap")


def test_quick_run_covers_every_arm(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns, rows = data["table"]["columns"], data["table"]["rows"]
    assert all(len(row) == len(columns) for row in rows)
    momenta = data["config"]["momenta"]
    assert len(rows) == len(momenta) == 2
    checkpoints = data["config"]["checkpoints"]
    for seed in data["per_seed"]:  # every method, every momentum, every checkpoint
        for method in train_eval_gap.METHODS:
            for momentum in momenta:
                assert [step for step, _ in seed["curves"][method][str(momentum)]] == checkpoints


def test_same_seed_gives_the_same_numbers(quick_result):
    again = run_experiment("train-eval-gap", Settings(quick=True, seeds=SEEDS[:1]))  # seed 0 alone, a second time
    assert json.dumps(again["per_seed"], sort_keys=True) == json.dumps(quick_result["per_seed"][:1], sort_keys=True)


def test_momentum_does_not_change_the_weights_only_the_running_statistics():
    split = load_digits()
    models = [train_eval_gap.set_bn_momentum(cnn((8, 8), 10, (4, 8), norm="bn", seed=0), m) for m in (0.01, 0.9)]
    for model in models:
        train(model, split, steps=3, batch_size=32, lr=0.1, seed=0, eval_every=3)
    slow, fast = (dict(model.named_parameters()) for model in models)
    assert all(torch.equal(slow[name], fast[name]) for name in slow)
    assert not torch.equal(models[0][2].running_mean, models[1][2].running_mean)


def test_three_evaluations_leave_the_model_exactly_as_it_was():
    split = load_digits()
    model = cnn((8, 8), 10, (4, 8), norm="bn", seed=0)
    train(model, split, steps=2, batch_size=32, lr=0.1, seed=0, eval_every=2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    result = train_eval_gap.evaluate_three_ways(model, split, 32, recalibration_batches=2)
    assert set(result) == set(train_eval_gap.METHODS) and all(0.0 <= v <= 1.0 for v in result.values())
    assert model.training
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def _seed(running: list[float], precise: list[float], batch: float = 0.9) -> dict:
    steps = [10, 100]
    curves = {"running": {"0.1": [[s, a] for s, a in zip(steps, running, strict=True)]},
              "precise": {"0.1": [[s, a] for s, a in zip(steps, precise, strict=True)]},
              "batch": {"0.1": [[s, batch] for s in steps]}}
    return {"curves": curves, "gaps": train_eval_gap.gaps(curves)}


def test_gap_is_precise_minus_running_in_points():
    seed = _seed(running=[0.50, 0.90], precise=[0.80, 0.91])
    assert seed["gaps"]["0.1"] == [[10, pytest.approx(30.0)], [100, pytest.approx(1.0)]]


def test_measured_sentence_follows_the_numbers_either_way():
    fading = train_eval_gap.measured_sentence([_seed([0.50, 0.90], [0.80, 0.905])], (0.1,))
    assert "the gap is +0.5 points at the end after a peak of +30.0 at step 10" in fading
    assert "so it shrinks with training and is gone" in fading and "inside the article's" in fading
    growing = train_eval_gap.measured_sentence([_seed([0.90, 0.50], [0.91, 0.80])], (0.1,))
    assert "does not shrink with training but has not vanished" in growing and "Keras 0.9" in growing


def test_measured_sentence_names_the_momentum_with_the_smallest_end_gap():
    seed = _seed([0.50, 0.90], [0.80, 0.95])
    for momentum, running_end in (("0.01", 0.80), ("0.9", 0.949)):
        for method in train_eval_gap.METHODS:
            seed["curves"][method][momentum] = [list(point) for point in seed["curves"][method]["0.1"]]
        seed["curves"]["running"][momentum][-1][1] = running_end
    seed["gaps"] = train_eval_gap.gaps(seed["curves"])
    sentence = train_eval_gap.measured_sentence([seed], (0.01, 0.1, 0.9))
    assert "smallest at 0.9 (Keras 0.1, +0.1 points), outside the article's Keras 0.9-0.99" in sentence
    assert "end gaps +15.0, +5.0 points" in sentence
