"""``normkit experiment train-eval-gap``: the quick run's files and schema, determinism, the EMA bank against torch's
own running statistics, evaluations that leave the model untouched, and the measured sentence."""

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


def test_quick_run_covers_every_schedule_length_and_momentum(quick_result, tmp_path):
    paths = write(quick_result, tmp_path)
    data = json.loads(paths["json"].read_text())
    columns, rows = data["table"]["columns"], data["table"]["rows"]
    config = data["config"]
    assert all(len(row) == len(columns) for row in rows)
    assert len(rows) == len(train_eval_gap.SCHEDULES) * len(config["lengths"]) * len(config["momenta"])
    assert set(data["cosine"]) == {str(n) for n in config["lengths"]}
    for length in config["lengths"]:
        for momentum in config["momenta"]:
            assert "ci95" in data["cosine"][str(length)]["gap"][str(momentum)]
    for seed in data["per_seed"]:
        assert set(seed["runs"]) == {"constant-8", "cosine-4", "cosine-8"}
        for run in seed["runs"].values():
            every = config["checkpoints"] if run["schedule"] == "constant" else config["cosine_checkpoints"]
            assert [p["step"] for p in run["points"]] == [c for c in every if c <= run["steps"]]
            assert all(set(p["running"]) == {str(m) for m in config["momenta"]} for p in run["points"])


def test_same_seed_gives_the_same_numbers(quick_result):
    again = run_experiment("train-eval-gap", Settings(quick=True, seeds=SEEDS[:1]))
    assert json.dumps(again["per_seed"], sort_keys=True) == json.dumps(quick_result["per_seed"][:1], sort_keys=True)


@pytest.mark.parametrize("momentum", [0.01, 0.1, 0.9])
def test_the_ema_bank_reproduces_torchs_running_statistics(momentum):
    split = load_digits()
    model = cnn((8, 8), 10, (4, 8), norm="bn", seed=0)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = momentum
    bank = train_eval_gap.EmaBank(model, (0.01, 0.1, 0.9))
    train(model, split, steps=12, batch_size=32, lr=0.1, seed=0, eval_every=6)
    loaded = bank.loaded(model, momentum)
    for (name, theirs), (_, ours) in zip(model.named_buffers(), loaded.named_buffers(), strict=True):
        if "running" in name:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    bank.remove()


def test_evaluation_copies_do_not_feed_the_bank_and_leave_the_model_as_it_was():
    split = load_digits()
    model = cnn((8, 8), 10, (4, 8), norm="bn", seed=0)
    bank = train_eval_gap.EmaBank(model, (0.1,))
    train(model, split, steps=2, batch_size=32, lr=0.1, seed=0, eval_every=2)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    ema = {name: [t.clone() for t in pair] for name, pair in bank.state[0.1].items()}
    result = train_eval_gap.evaluate(model, bank, split, 32, recalibration_batches=2)
    assert set(result) == set(train_eval_gap.METHODS) and set(result["running"]) == {"0.1"}
    assert model.training
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())
    assert all(torch.equal(a, b) for name, pair in ema.items() for a, b in zip(pair, bank.state[0.1][name],
                                                                               strict=True))
    bank.remove()


def test_constant_400_is_the_long_runs_checkpoint(quick_result):
    config = quick_result["config"]
    short = str(min(config["lengths"]))
    first = quick_result["per_seed"][0]["runs"][f"constant-{max(config['lengths'])}"]
    point = train_eval_gap.at(first, min(config["lengths"]))
    assert quick_result["summary"]["constant"][short]["precise"]["values"][0] == point["precise"]


def test_sentence_says_when_the_gap_does_not_close_under_cosine():
    ci = lambda mean, low, high: {"mean": mean, "ci95": [low, high],  # noqa: E731
                                  "verdict": "none" if low <= 0 <= high else "first"}
    summary = {s: {n: {"gap": {"0.1": ci(3.0, 1.0, 5.0)}} for n in ("400", "1200")} for s in ("constant", "cosine")}
    comparisons = {s: {"smallest": 0.1, "reference": 0.1, "difference": ci(0, 0, 0)} for s in ("constant", "cosine")}
    trend = [{"step": 100, **ci(1.0, 0.5, 1.5)}, {"step": 400, **ci(3.0, 1.0, 5.0)}, {"step": 1200, **ci(3.0, 1, 5)}]
    sentence = train_eval_gap.measured_sentence(summary, comparisons, trend, {"lengths": (400, 1200)})
    assert "the gap stays under cosine decay as well" in sentence
    assert "it peaks at step 400 and does not shrink steadily after it, still above zero at the end" in sentence
    shrinking = [{"step": 100, **ci(5.0, 4, 6)}, {"step": 400, **ci(3.0, 1, 5)}, {"step": 1200, **ci(1.0, 0.5, 1.5)}]
    assert "it peaks at step 100 and shrinks after it, still above zero" in train_eval_gap.measured_sentence(
        summary, comparisons, shrinking, {"lengths": (400, 1200)})
