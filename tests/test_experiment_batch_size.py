"""``normkit experiment batch-size``: the quick run's files and schema, determinism, and the derived quantities."""

from __future__ import annotations

import json

import pytest
import torch

from normkit.experiments import batch_size
from normkit.experiments._harness import Settings, run_experiment, write
from normkit.nn import CrossIterationBatchNorm2d, GhostBatchNorm2d, StreamingBatchNorm2d

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("batch-size")


def test_quick_run_covers_every_arm(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns, rows = data["table"]["columns"], data["table"]["rows"]
    assert all(len(row) == len(columns) for row in rows)
    assert [row[0] for row in rows[: len(batch_size.NORMS)]] == list(batch_size.NORMS)
    sizes = data["config"]["batch_sizes"]
    assert len(sizes) == 2
    for norm in batch_size.NORMS:  # every arm ran, at every batch size, for every seed
        assert all(len(data["accuracy"][norm][str(size)]) == len(SEEDS) for size in sizes)


def test_same_seed_gives_the_same_numbers(quick_result):
    again = run_experiment("batch-size", Settings(quick=True, seeds=SEEDS[:1]))  # seed 0 alone, run a second time
    first = {norm: {size: values[:1] for size, values in per_size.items()}
             for norm, per_size in quick_result["accuracy"].items()}
    assert json.dumps(again["accuracy"], sort_keys=True) == json.dumps(first, sort_keys=True)
    assert again["config"] == quick_result["config"]


def test_every_arm_starts_from_the_same_weights_with_its_own_norm():
    models = {norm: batch_size.build(norm, seed=3, steps=50) for norm in batch_size.NORMS}
    reference = models["BN"]
    for norm, model in models.items():
        for index in (1, 4, 9):  # the two convs and the linear layer
            assert torch.equal(model[index].weight, reference[index].weight), (norm, index)
    assert isinstance(models["Ghost BN"][2], GhostBatchNorm2d)
    assert isinstance(models["Streaming BN"][2], StreamingBatchNorm2d)
    cbn = models["Cross-iteration BN"][5]
    assert isinstance(cbn, CrossIterationBatchNorm2d) and cbn._bound_weight() is models["Cross-iteration BN"][4].weight
    assert models["BatchRenorm"][2].warmup_steps == 5  # 10% of 50 steps


def test_steps_and_learning_rate_follow_the_stated_rules():
    assert batch_size.steps_for(2, 3, 1347) == 2020
    assert batch_size.steps_for(128, 3, 1347, min_steps=100) == 100
    assert batch_size.learning_rate(batch_size.BASE_BATCH) == batch_size.BASE_LR
    assert batch_size.learning_rate(4 * batch_size.BASE_BATCH) == pytest.approx(2 * batch_size.BASE_LR)


def _accuracy(bn: list[float], gn: list[float]) -> dict:
    sizes = (2, 8, 32)
    flat = {str(size): [0.5, 0.5] for size in sizes}
    table = {norm: dict(flat) for norm in batch_size.NORMS}
    table["BN"] = {str(size): [acc, acc] for size, acc in zip(sizes, bn, strict=True)}
    table["GN"] = {str(size): [acc, acc] for size, acc in zip(sizes, gn, strict=True)}
    return table


def test_derived_best_norm_and_bn_drop_on_hand_made_numbers():
    accuracy = _accuracy(bn=[0.60, 0.90, 0.95], gn=[0.85, 0.86, 0.87])
    derived = batch_size.summarize(accuracy, (2, 8, 32))
    assert derived["best_norm"] == {"2": "GN", "8": "BN", "32": "BN"}
    assert derived["bn_best_size"] == 32
    assert derived["bn_drop"]["2"] == pytest.approx(35.0)
    assert derived["bn_rank"] == {"2": 2, "8": 1, "32": 1}


def test_measured_sentence_follows_the_numbers_either_way():
    agrees = batch_size.measured_sentence(_accuracy(bn=[0.60, 0.90, 0.95], gn=[0.85, 0.86, 0.87]), (2, 8, 32))
    assert "This agrees with the article" in agrees and "35.0 points below its best" in agrees
    disagrees = batch_size.measured_sentence(_accuracy(bn=[0.95, 0.95, 0.95], gn=[0.80, 0.80, 0.80]), (2, 8, 32))
    assert "This disagrees with the article" in disagrees and "the best norm there is BN" in disagrees
    partly = batch_size.measured_sentence(_accuracy(bn=[0.80, 0.95, 0.95], gn=[0.70, 0.70, 0.70]), (2, 8, 32))
    assert "partly agrees" in partly
