"""``normkit experiment transfer``: the quick run's files, determinism, the labelled subset and the verdict."""

from __future__ import annotations

import json

import pytest
import torch

from normkit.data import load_digits, load_mnist1d
from normkit.experiments import transfer
from normkit.experiments._harness import write
from normkit.experiments._training import mean_std

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("transfer")


def test_quick_run_covers_every_budget_batch_size_and_strategy(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns = data["table"]["columns"]
    config = data["config"]
    assert all(len(row) == len(columns) for row in data["table"]["rows"])
    cells = [transfer.cell_key(b, n) for b in config["budgets"] for n in config["batch_sizes"]]
    assert [row[0] for row in data["table"]["rows"]] == cells
    for cell in cells:
        assert set(data["per_seed"][cell]) == set(transfer.STRATEGIES)
        assert all(len(v) == len(SEEDS) and all(0 <= a <= 1 for a in v) for v in data["per_seed"][cell].values())
        assert all("ci95" in data["differences"][cell][name] for name in transfer.COMPARISONS)
    assert len(data["source_accuracy"]["values"]) == len(SEEDS)


def test_the_target_domain_is_a_natural_shift_of_the_source():
    source = load_mnist1d()
    target = load_mnist1d(seed=7, generation=transfer.TARGET_GENERATION)
    assert source.x_train.shape == target.x_train.shape
    assert not torch.equal(source.x_train, target.x_train)
    assert torch.equal(load_mnist1d(seed=7, generation=transfer.TARGET_GENERATION).x_train, target.x_train)
    with pytest.raises(ValueError, match="generation may change"):
        load_mnist1d(generation={"num_samples": 10})


def test_bn_lr_x0_keeps_the_affine_parameters_and_moves_the_statistics():
    target = load_mnist1d(seed=7, generation=transfer.TARGET_GENERATION)
    model = transfer.mlp(40, 10, (16,), norm="bn", seed=0)
    config = {**transfer.CONFIG, **transfer.QUICK}
    labelled = transfer.few_labels(target, 4, seed=0)
    groups = transfer.param_groups(model, 0.01, norm_lr_scale=0.0)
    bn = model[1]
    before = (bn.weight.clone(), bn.bias.clone(), bn.running_mean.clone())
    transfer.train(model, labelled, steps=3, batch_size=8, lr=0.01, seed=0, eval_every=3, param_groups=groups)
    assert torch.equal(bn.weight, before[0]) and torch.equal(bn.bias, before[1])
    assert not torch.equal(bn.running_mean, before[2])
    assert 0 <= transfer.adapt_strategy(model, "bn-lr-0", target, labelled, config, seed=0, batch_size=8) <= 1


def test_few_labels_is_balanced_seeded_and_leaves_the_test_part_alone():
    split = load_digits()
    small = transfer.few_labels(split, 3, seed=5)
    assert torch.bincount(small.y_train).tolist() == [3] * 10
    assert torch.equal(small.x_test, split.x_test) and torch.equal(small.y_test, split.y_test)
    assert torch.equal(transfer.few_labels(split, 3, seed=5).x_train, small.x_train)
    assert not torch.equal(transfer.few_labels(split, 3, seed=6).x_train, small.x_train)
    with pytest.raises(ValueError, match="smaller per_class"):
        transfer.few_labels(split, 1000, seed=0)


def test_no_adaptation_and_adabn_leave_the_source_model_untouched():
    target = load_mnist1d(seed=7, generation=transfer.TARGET_GENERATION)
    model = transfer.mlp(40, 10, (16,), norm="bn", seed=0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = {**transfer.CONFIG, **transfer.QUICK}
    labelled = transfer.few_labels(target, 4, seed=0)  # 40 >= the batch size
    for strategy in transfer.STRATEGIES:
        transfer.adapt_strategy(model, strategy, target, labelled, config, seed=0, batch_size=8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="unknown strategy"):
        transfer.adapt_strategy(model, "magic", target, labelled, config, seed=0, batch_size=8)


@pytest.mark.parametrize(("verdict", "expected"), [
    ("first", "freezing BN vs full fine-tuning: +3.0 points (95% CI +1.0 to +5.0)"),
    ("none", "freezing BN vs full fine-tuning: no difference detected (+3.0 points, 95% CI -1.0 to +7.0)"),
])
def test_measured_sentence_carries_the_intervals(verdict, expected):
    arms = {s: mean_std([0.5, 0.6]) for s in transfer.STRATEGIES}
    ci = [0.01, 0.05] if verdict == "first" else [-0.01, 0.07]
    diff = {name: {"mean": 0.03, "ci95": ci, "verdict": verdict} for name in transfer.COMPARISONS}
    config = {"budgets": [10, "all"], "batch_sizes": [8, 64]}
    cells = [transfer.cell_key(b, n) for b in config["budgets"] for n in config["batch_sizes"]]
    sentence = transfer.measured(dict.fromkeys(cells, arms), dict.fromkeys(cells, diff), config)
    assert expected in sentence and "With all labels per class (batch 64)" in sentence
    assert "At fine-tuning batch 8 (10 labels per class)" in sentence
