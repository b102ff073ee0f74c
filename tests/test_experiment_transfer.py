"""``normkit experiment transfer``: the quick run's files, the arms, the label budgets, the natural shift, the choice of
each arm's setting on validation, and the sentence."""

from __future__ import annotations

import json

import pytest
import torch

from normkit.data import load_digits, load_mnist1d
from normkit.data.mnist1d import cache_file_name
from normkit.experiments import transfer
from normkit.experiments._harness import write
from normkit.experiments._training import mean_std

SEEDS = (0, 1)
COMPARISON_KEYS = ("freeze-vs-best-other", "full-vs-adabn", "bn-lr-0.1-vs-full", "bn-lr-0.1-vs-bn-lr-0",
                   "bn-lr-0.1-vs-full-tuned", "bn-lr-0.1-vs-bn-lr-0-tuned")


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("transfer")


def test_quick_run_covers_every_budget_batch_size_and_strategy(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns = data["table"]["columns"]
    config = data["config"]
    assert config["budgets"] == transfer.QUICK["budgets"] and config["batch_sizes"] == transfer.QUICK["batch_sizes"]
    assert all(len(row) == len(columns) for row in data["table"]["rows"])
    cells = [transfer.cell_key(b, n) for b in config["budgets"] for n in config["batch_sizes"]]
    assert [row[0] for row in data["table"]["rows"]] == cells
    for cell in cells:
        assert set(data["per_seed"][cell]) == set(transfer.STRATEGIES)
        assert {"bn-lr-0", "bn-lr-0.1", "full", "freeze", "adabn", "none"} <= set(data["per_seed"][cell])
        assert all(len(v) == len(SEEDS) and all(0 <= a <= 1 for a in v) for v in data["per_seed"][cell].values())
        assert set(data["per_seed_matched"][cell]) >= {"bn-lr-0", "bn-lr-0.1", "full", "lr", "steps"}
        assert data["per_seed_matched"][cell]["full"] == data["per_seed"][cell]["full"]
    assert len(data["source_accuracy"]["values"]) == len(SEEDS)


def test_every_comparison_carries_a_ci(quick_result):
    assert quick_result["adabn_vs_none"]["ci95"] is not None
    for diffs in quick_result["differences"].values():
        assert set(diffs) == set(COMPARISON_KEYS)
        for name in COMPARISON_KEYS:
            stat = diffs[name]
            assert len(stat["ci95"]) == 2 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1], name
            assert stat["verdict"] in ("first", "second", "none")
        assert diffs["freeze-vs-best-other"]["other"] in ("bn-lr-0", "bn-lr-0.1", "full")


def test_each_fine_tuned_arm_has_its_setting_chosen_on_validation(quick_result):
    validation = quick_result["validation"]
    assert "test part only reports" in validation["used_for"] and validation["examples"] == 800
    assert validation["selection_seeds"] == list(SEEDS[:transfer.QUICK["selection_seeds"]])
    config = quick_result["config"]
    for cell, arms in validation["selected"].items():
        budget = cell.split("/")[0]
        assert set(arms) == set(transfer.FINE_TUNED)
        for chosen in arms.values():
            assert {"lr": chosen["lr"], "steps": chosen["steps"]} in transfer.candidates(config, budget)
            assert chosen["criterion"] == "mean final validation accuracy"
            assert len(chosen["scores"]) == len(transfer.candidates(config, budget))


def test_the_full_run_varies_labels_batch_size_and_seeds():
    assert transfer.SEEDS == 8
    assert transfer.FULL["budgets"] == [10, 100, "all"]
    assert set(transfer.FULL["batch_sizes"]) == {8, 64}
    assert len(transfer.FULL["lrs"]) >= 3
    assert all(str(b) in transfer.FULL["finetune_steps"] for b in transfer.FULL["budgets"])
    assert transfer.FULL["selection_seeds"] <= transfer.SEEDS


def test_all_labels_is_what_the_target_training_part_holds(quick_result):
    target, record = transfer.target_domain()
    assert quick_result["config"]["labels_all_per_class"] == len(target.y_train) // 10 == 320
    assert record["train_examples"] == len(transfer.budget_split(target, "all", 0).y_train)
    assert torch.bincount(transfer.budget_split(target, 100, 0).y_train).tolist() == [100] * 10


def test_the_target_domain_is_a_natural_shift_of_the_source():
    source = load_mnist1d()
    target = load_mnist1d(seed=transfer.TARGET_SEED, generation=transfer.TARGET_GENERATION)
    assert source.x_train.shape == target.x_train.shape
    assert not torch.equal(source.x_train, target.x_train)
    # the same signals whether read from the cache or generated afresh: generation is deterministic
    fresh = load_mnist1d(seed=transfer.TARGET_SEED, generation=transfer.TARGET_GENERATION, cache=False)
    assert torch.equal(fresh.x_train, target.x_train) and torch.equal(fresh.y_test, target.y_test)
    # other generation parameters, not only another seed: a cache file of its own
    assert cache_file_name(5000, transfer.TARGET_SEED, transfer.TARGET_GENERATION) != cache_file_name(
        5000, transfer.TARGET_SEED)
    # the source model's domain differs: per-position spread of the signals is not the source's
    assert not torch.allclose(source.x_train.std(dim=0), target.x_train.std(dim=0), atol=0.05)
    with pytest.raises(ValueError, match="generation may change"):
        load_mnist1d(generation={"num_samples": 10})


def test_bn_lr_x0_keeps_the_affine_parameters_and_moves_the_statistics():
    target, _ = transfer.target_domain()
    model = transfer.mlp(40, 10, (16,), norm="bn", seed=0)
    labelled = transfer.few_labels(target, 4, seed=0)
    groups = transfer.param_groups(model, 0.01, norm_lr_scale=0.0)
    bn = model[1]
    before = (bn.weight.clone(), bn.bias.clone(), bn.running_mean.clone())
    transfer.train(model, labelled, steps=3, batch_size=8, lr=0.01, seed=0, eval_every=3, param_groups=groups)
    assert torch.equal(bn.weight, before[0]) and torch.equal(bn.bias, before[1])
    assert not torch.equal(bn.running_mean, before[2])
    run = transfer.adapt_strategy(model, "bn-lr-0", target, labelled, lr=0.01, steps=4, batch_size=8, eval_every=2)
    assert [step for step, _ in run["curve"]] == [0, 2, 4] and len(run["val_curve"]) == 3


def test_x0_x01_and_full_differ_only_in_the_bn_affine_learning_rate():
    target, _ = transfer.target_domain()
    model = transfer.mlp(40, 10, (16,), norm="bn", seed=0).eval()
    labelled = transfer.few_labels(target, 4, seed=0)
    runs = {s: transfer.adapt_strategy(model, s, target, labelled, lr=1e-12, steps=2, batch_size=8, eval_every=1)
            for s in ("bn-lr-0", "bn-lr-0.1", "full")}
    # with a vanishing learning rate only the running statistics move, identically in all three arms
    assert runs["bn-lr-0"]["curve"] == runs["bn-lr-0.1"]["curve"] == runs["full"]["curve"]


def test_no_adaptation_and_adabn_leave_the_source_model_untouched():
    target, _ = transfer.target_domain()
    model = transfer.mlp(40, 10, (16,), norm="bn", seed=0).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    labelled = transfer.few_labels(target, 4, seed=0)  # 40 >= the batch size
    for strategy in transfer.STRATEGIES:
        transfer.adapt_strategy(model, strategy, target, labelled, lr=0.01, steps=2, batch_size=8)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="unknown strategy"):
        transfer.adapt_strategy(model, "magic", target, labelled, lr=0.01, steps=2, batch_size=8)
    with pytest.raises(ValueError, match="fine-tunes"):
        transfer.adapt_strategy(model, "full", target, labelled)


def test_few_labels_is_balanced_seeded_and_leaves_the_test_part_alone():
    split = load_digits()
    small = transfer.few_labels(split, 3, seed=5)
    assert torch.bincount(small.y_train).tolist() == [3] * 10
    assert torch.equal(small.x_test, split.x_test) and torch.equal(small.y_test, split.y_test)
    assert torch.equal(transfer.few_labels(split, 3, seed=5).x_train, small.x_train)
    assert not torch.equal(transfer.few_labels(split, 3, seed=6).x_train, small.x_train)
    with pytest.raises(ValueError, match="smaller per_class"):
        transfer.few_labels(split, 1000, seed=0)
    target, _ = transfer.target_domain()
    assert torch.equal(transfer.few_labels(target, 2, seed=0).x_val, target.x_val)


def _run(val: list, test: list, diverged_at=None) -> dict:
    steps = [0, 5, 10]
    return {"val_curve": [[s, v] for s, v in zip(steps, val, strict=True)],
            "curve": [[s, v] for s, v in zip(steps, test, strict=True)], "diverged_at": diverged_at}


def test_select_chooses_on_validation_never_on_test():
    config = {"lrs": [0.001, 0.01, 0.1], "finetune_steps": {"10": 10}, "eval_every": 5}
    runs = {0.001: [_run([.5, .55, .56], [.5, .90, .95])] * 2,  # best on test, not on validation
            0.01: [_run([.5, .70, .65], [.5, .60, .60])] * 2,
            0.1: [_run([.5, .99, .99], [.5, .10, .10], diverged_at=4)] * 2}  # diverged: scores 0
    chosen = transfer.select(runs, config, 10)
    assert (chosen["lr"], chosen["steps"]) == (0.01, 5)
    assert not chosen["lr_at_grid_edge"] and not chosen["steps_at_most"]
    assert transfer.at_step(runs[0.01][0]["curve"], chosen["steps"]) == 0.60
    late = transfer.select({0.001: [_run([.5, .6, .7], [.5, .5, .5])]}, {**config, "lrs": [0.001]}, 10)
    assert late["steps_at_most"] and late["lr_at_grid_edge"]


def test_best_other_is_chosen_on_validation():
    validation = {"freeze": [0.9, 0.9], "bn-lr-0": [0.5, 0.5], "bn-lr-0.1": [0.6, 0.6], "full": [0.7, 0.7]}
    test = {**validation, "adabn": [0.5, 0.5], "full": [0.1, 0.1], "bn-lr-0.1": [0.95, 0.95]}
    diffs = transfer.compare(test, validation, test)
    assert diffs["freeze-vs-best-other"]["other"] == "full"
    assert diffs["freeze-vs-best-other"]["mean"] == pytest.approx(0.8)


@pytest.mark.parametrize(("verdict", "expected"), [
    ("first", "freeze vs full fine-tune +3.0 points (95% CI +1.0 to +5.0)"),
    ("none", "freeze vs full fine-tune no difference detected (+3.0 points, 95% CI -1.0 to +7.0)"),
])
def test_measured_sentence_carries_the_intervals(verdict, expected):
    arms = {s: mean_std([0.5, 0.6]) for s in transfer.STRATEGIES}
    ci = [0.01, 0.05] if verdict == "first" else [-0.01, 0.07]
    diff = {name: {"mean": 0.03, "ci95": ci, "verdict": verdict} for name in COMPARISON_KEYS}
    diff["freeze-vs-best-other"]["other"] = "full"
    config = {"budgets": [10, 100, "all"], "batch_sizes": [64, 8]}
    cells = [transfer.cell_key(b, n) for b in config["budgets"] for n in config["batch_sizes"]]
    sentence = transfer.measured(dict.fromkeys(cells, arms), dict.fromkeys(cells, diff),
                                 {"mean": 0.07, "ci95": [0.05, 0.09], "verdict": "first"}, config)
    assert expected in sentence
    assert "With all labels per class" in sentence and "At fine-tuning batch 8" in sentence
    assert "AdaBN alone (no labels) vs no adaptation: +7.0 points (95% CI +5.0 to +9.0)" in sentence
    summary = "freezing is better at" if verdict == "first" else "no difference detected at"
    assert f"best other fine-tuned arm: {summary} 10, 100 and all labels per class" in sentence
