"""``normkit experiment transfer``: the quick run's files, determinism, the labelled subset and the verdict."""

from __future__ import annotations

import json

import pytest
import torch

from normkit.data import load_digits
from normkit.experiments import transfer
from normkit.experiments._harness import write
from normkit.experiments._training import mean_std

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("transfer")


def test_quick_run_covers_every_arm(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns = data["table"]["columns"]
    assert all(len(row) == len(columns) for row in data["table"]["rows"])
    assert [row[0] for row in data["table"]["rows"]] == list(transfer.STRATEGIES.values())
    assert len(columns) == 2 + len(data["config"]["shifts"])
    for kind, strength in data["config"]["shifts"]:
        per_strategy = data["per_seed"][transfer.shift_key(kind, strength)]
        assert set(per_strategy) == set(transfer.STRATEGIES)
        assert all(len(values) == len(SEEDS) and all(0 <= v <= 1 for v in values) for values in per_strategy.values())
    assert len(data["source_accuracy"]["values"]) == len(SEEDS)



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
    split = load_digits()
    target = transfer.shifted(split, "contrast", 0.3)
    model = transfer.mlp(64, 10, (16,), norm="bn", seed=0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    config = {**transfer.CONFIG, **transfer.QUICK}
    labelled = transfer.few_labels(target, 4, seed=0)  # 40 >= the batch size
    for strategy in transfer.STRATEGIES:
        transfer.adapt_strategy(model, strategy, target, labelled, config, seed=0, advance=None)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="unknown strategy"):
        transfer.adapt_strategy(model, "magic", target, labelled, config, seed=0, advance=None)


def _overall(freeze, low_lr, full):
    return {"none": mean_std([0.5, 0.5]), "adabn": mean_std([0.9, 0.9]), "freeze": mean_std(freeze),
            "bn-lr-0.1": mean_std(low_lr), "full": mean_std(full)}


@pytest.mark.parametrize(("freeze", "low_lr", "full", "expected"), [
    ([0.6, 0.6], [0.8, 0.8], [0.8, 0.81], ("trailed the best other fine-tuning strategy by 20.5", "was a tie")),
    ([0.9, 0.9], [0.8, 0.82], [0.7, 0.71], ("beat the other fine-tuning strategies by 9.0", "was better")),
    ([0.8, 0.8], [0.7, 0.71], [0.8, 0.8], ("matched the other fine-tuning strategies", "was worse")),
])
def test_measured_sentence_compares_the_articles_options(freeze, low_lr, full, expected):
    overall = _overall(freeze, low_lr, full)
    summary = {"noise 0.4": overall}
    sentence = transfer.measured(summary, overall, tie_margin=0.01)
    assert "best per shift: noise 0.4 -> AdaBN only (no labels)" in sentence
    for part in expected:
        assert part in sentence
