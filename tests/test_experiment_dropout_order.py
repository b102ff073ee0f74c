"""``normkit experiment dropout-order``: the quick run's files, determinism, and the variance-shift measurement."""

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
    expected = dropout_order.arms(data["config"]["dropout_rates"])
    assert len(data["table"]["rows"]) == len(expected) == 1 + 2 * len(data["config"]["dropout_rates"])
    for order, rate in expected:
        runs = data["per_seed"][dropout_order.key(order, rate)]
        assert [run["seed"] for run in runs] == list(SEEDS)
        assert all(len(run["variance_shift_per_layer"]) == 3 and run["variance_shift"] > 0 for run in runs)
        assert all(0 <= run["recalibrated_accuracy"] <= 1 for run in runs)



def test_bn_after_dropout_shows_the_variance_shift_even_in_the_quick_run(quick_result):
    summary = quick_result["summary"]
    for rate in quick_result["config"]["dropout_rates"]:
        after = summary[dropout_order.key("bn-after-dropout", rate)]["variance_shift"]["mean"]
        before = summary[dropout_order.key("bn-before-dropout", rate)]["variance_shift"]["mean"]
        assert after > before


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


@pytest.mark.parametrize(("verdict", "expected"), [
    ("before", "the article's rule holds here"),
    ("tie", "no measurable difference"),
    ("after", "against the article's rule"),
])
def test_measured_sentence_reads_the_highest_rate(verdict, expected):
    stat = lambda m: {"mean": m, "std": 0.0}  # noqa: E731
    arm = lambda acc, ratio: {"final_accuracy": stat(acc), "variance_shift": stat(ratio),  # noqa: E731
                              "recalibrated_accuracy": stat(acc)}
    summary = {"no-dropout@0": arm(0.7, 1.0), "bn-before-dropout@0.2": arm(0.69, 1.1),
               "bn-after-dropout@0.2": arm(0.68, 1.4), "bn-before-dropout@0.5": arm(0.66, 1.2),
               "bn-after-dropout@0.5": arm(0.62, 3.0)}
    differences = {"0.2": {"mean": 0.0, "std": 0.0, "verdict": "tie"},
                   "0.5": {"mean": 0.04, "std": 0.01, "verdict": verdict}}
    sentence = dropout_order.measured(summary, differences, {"dropout_rates": [0.2, 0.5]})
    assert sentence.startswith("At dropout 0.5, BN after dropout stored a running variance 3.00x")
    assert expected in sentence
