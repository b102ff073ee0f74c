"""``normkit experiment dropout-order``: the quick run's files, the rate chosen on validation, the variance-shift
measurement and the sentence."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from normkit.experiments import dropout_order
from normkit.experiments._harness import write

SEEDS = (0, 1)


@pytest.fixture(scope="module")
def quick_result(quick_experiment):
    return quick_experiment("dropout-order")


def test_quick_run_covers_every_arm(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns = data["table"]["columns"]
    assert all(len(row) == len(columns) for row in data["table"]["rows"])
    assert len(data["table"]["rows"]) == len(dropout_order.ORDERS) + len(dropout_order.COMPARISONS)
    for order in dropout_order.ORDERS:
        runs = data["per_seed"][order]
        assert [run["seed"] for run in runs] == list(SEEDS)
        assert all(len(run["variance_shift_per_layer"]) == 3 and run["variance_shift"] > 0 for run in runs)
        assert all(0 <= run["recalibrated_accuracy"] <= 1 for run in runs)
    for name in dropout_order.COMPARISONS:
        assert "ci95" in data["differences"][name] and data["differences"][name]["n"] == len(SEEDS)
    assert data["validation"]["train_examples_used"] == data["config"]["train_examples"]
    assert all(run["dropout"] == 0.0 for run in data["per_seed"]["no-dropout"])


def test_each_dropout_arm_runs_at_the_rate_with_the_best_validation_accuracy(quick_result):
    rates = quick_result["config"]["rates"]
    assert len(rates) > 1  # the quick run exercises the selection
    for order in dropout_order.DROPOUT_ARMS:
        sweep = quick_result["rate_sweep"][order]
        assert list(sweep) == [f"{rate:g}" for rate in rates]
        means = {rate: sum(sweep[f"{rate:g}"]["final_val_accuracy"]) / len(SEEDS) for rate in rates}
        chosen = quick_result["dropout_rate"][order]["value"]
        assert means[chosen] == max(means.values())
        assert rates.index(chosen) == min(i for i, rate in enumerate(rates) if means[rate] == means[chosen])
        runs = quick_result["per_seed"][order]
        assert all(run["dropout"] == chosen for run in runs)
        # the reported runs are the chosen rate's runs of the sweep, test numbers included
        assert [run["final_accuracy"] for run in runs] == sweep[f"{chosen:g}"]["final_accuracy"]
    assert f"{quick_result['dropout_rate']['bn-after-dropout']['value']:g} with BN after" in quick_result["measured"]


def test_bn_after_dropout_shows_the_variance_shift_even_in_the_quick_run(quick_result):
    summary = quick_result["summary"]
    after = summary["bn-after-dropout"]["variance_shift"]["mean"]
    assert after > summary["bn-before-dropout"]["variance_shift"]["mean"]
    assert after > summary["li-dropout-after-last-bn"]["variance_shift"]["mean"]


def test_li_arm_shares_the_no_dropout_weights_and_has_one_dropout_before_the_output():
    li = dropout_order.build("li-dropout-after-last-bn", 40, 10, (8, 8), 0.3, seed=4)
    plain = dropout_order.build("no-dropout", 40, 10, (8, 8), 0.3, seed=4)
    assert [type(m).__name__ for m in li][-2:] == ["Dropout", "Linear"]
    assert sum(isinstance(m, nn.Dropout) for m in li) == 1
    assert all(a.equal(b) for a, b in zip(li.parameters(), plain.parameters(), strict=True))


def test_variance_shift_is_running_over_eval_input_variance_per_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4)).train()
    x = torch.randn(256, 3)
    for layer in (model[1], model[3]):
        layer.momentum = 1.0   # the running statistics become the training batch's
    model(x)
    model[3].running_var.mul_(2.5)
    ratios = dropout_order.variance_shift(model, x)
    # the first layer sees in eval exactly the batch it stored (unbiased variance both ways); the second 2.5x
    assert ratios[0] == pytest.approx(1.0, rel=1e-5)
    assert ratios[1] == pytest.approx(2.5, rel=0.05)
    assert model.training  # mode restored


def test_variance_shift_of_dropout_before_bn_matches_the_dropout_theory():
    # inverted dropout with p on x scales E[x^2] by 1/(1-p): for x ~ N(0, 1) the training variance is 1/(1-p)
    p = 0.5
    model = nn.Sequential(nn.Dropout(p), nn.BatchNorm1d(16, momentum=None))
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(4096, 16, generator=generator)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        for chunk in x.split(512):
            model(chunk)
    (ratio,) = dropout_order.variance_shift(model, x)
    assert ratio == pytest.approx(1 / (1 - p), rel=0.05)


CHOSEN = {"no-dropout": 0.0, "bn-before-dropout": 0.3, "bn-after-dropout": 0.1, "li-dropout-after-last-bn": 0.5}


def _sentence(order_verdict="none", helps_verdict="none"):
    stat = lambda m: {"mean": m, "std": 0.0}  # noqa: E731
    arm = lambda acc, ratio: {"final_accuracy": stat(acc), "variance_shift": stat(ratio),  # noqa: E731
                              "recalibrated_accuracy": stat(acc)}
    summary = {"no-dropout": arm(0.40, 1.0), "bn-before-dropout": arm(0.42, 1.2), "bn-after-dropout": arm(0.38, 3.0),
               "li-dropout-after-last-bn": arm(0.43, 1.0)}
    none = {"mean": 0.0, "ci95": [-0.01, 0.01], "verdict": "none"}
    differences = {name: none for name in dropout_order.COMPARISONS}
    differences["before-vs-after"] = {"mean": 0.04, "ci95": [0.02, 0.06], "verdict": order_verdict}
    differences["dropout-helps"] = {"mean": 0.02, "ci95": [0.01, 0.03], "verdict": helps_verdict}
    return dropout_order.measured(summary, differences, CHOSEN)


@pytest.mark.parametrize(("verdict", "expected"), [
    ("first", "before − after: +4.0 points (95% CI +2.0 to +6.0)) and 43.0% with Li"),
    ("first", "the article's rule holds here"),
    ("none", "before − after: no difference detected (+4.0 points, 95% CI +2.0 to +6.0))"),
    ("none", "the order made no detectable difference to accuracy here, despite the variance shift"),
    ("second", "against the article's rule"),
])
def test_measured_sentence_follows_the_order_verdict(verdict, expected):
    sentence = _sentence(order_verdict=verdict)
    assert "BN after dropout stored a running variance 3.00x" in sentence
    assert "Li − after: no difference detected (+0.0 points, 95% CI -1.0 to +1.0)" in sentence
    assert "(0.3 with BN before dropout, 0.1 with BN after it, 0.5 after the last BN)" in sentence
    assert expected in sentence


@pytest.mark.parametrize(("verdict", "expected"), [
    ("first", "dropout helped in this regime (BN before dropout vs none: +2.0 points (95% CI +1.0 to +3.0))"),
    ("none", "dropout made no detectable difference in this regime (BN before dropout vs none: no difference "
             "detected (+2.0 points, 95% CI +1.0 to +3.0))"),
    ("second", "dropout hurt in this regime"),
])
def test_measured_sentence_says_whether_dropout_helped(verdict, expected):
    assert expected in _sentence(helps_verdict=verdict)
