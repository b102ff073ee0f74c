"""The ground every experiment stands on: a validation part, selection on it, paired comparisons with 95 % CIs,
schedules, default seed counts and the report's header."""

import math

import pytest
import torch

from normkit.data import load_digits, with_validation
from normkit.experiments import _compare, _selection
from normkit.experiments._harness import Settings, command, default_seeds, report, resolved
from normkit.experiments._training import mlp, train


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_validation_is_held_out_of_training_and_test_is_untouched(digits):
    split = with_validation(digits, 0.2, seed=0)
    assert len(split.y_train) + len(split.y_val) == len(digits.y_train)
    assert torch.equal(split.x_test, digits.x_test) and torch.equal(split.y_test, digits.y_test)
    rows = {tuple(row.tolist()) for row in split.x_train}
    assert not any(tuple(row.tolist()) in rows for row in split.x_val[:50] if (digits.x_train == row).all(1).sum() == 1)
    assert set(split.y_val.tolist()) == set(range(10))  # stratified: every class in both parts
    again = with_validation(digits, 0.2, seed=0)
    assert torch.equal(again.x_val, split.x_val)
    assert not torch.equal(with_validation(digits, 0.2, seed=1).y_val, split.y_val)


@pytest.mark.parametrize("size", [0, 5, 1347, 1.5, -0.1, True, "0.2"])
def test_validation_size_out_of_range_is_refused(digits, size):
    with pytest.raises(ValueError, match="every class in both parts"):
        with_validation(digits, size)


def test_validation_is_carved_once(digits):
    with pytest.raises(ValueError, match="already has a validation part"):
        with_validation(with_validation(digits), 0.2)


def test_carve_records_the_split(digits):
    split, record = _selection.carve(digits)
    assert record["examples"] == len(split.y_val) and record["train_examples"] == len(split.y_train)
    assert "test part only reports" in record["used_for"]


def test_training_records_validation_and_cosine_decays_to_zero(digits):
    split = with_validation(digits, 0.2)
    model = mlp(64, 10, (16,), norm="bn", seed=0)
    lrs = []
    history = train(model, split, steps=20, batch_size=32, lr=0.1, seed=0, eval_every=10, schedule="cosine",
                    on_step=lambda _step: lrs.append(None))
    assert [step for step, _ in history.val_curve] == [0, 10, 20] == [step for step, _ in history.curve]
    assert history.as_dict()["final_val_accuracy"] == history.val_curve[-1][1]
    with pytest.raises(ValueError, match="schedule 'constant' or 'cosine'"):
        train(mlp(64, 10, (16,), seed=0), split, steps=2, batch_size=32, lr=0.1, seed=0, schedule="linear")


def test_cosine_changes_training_but_not_step_zero(digits):
    split = with_validation(digits, 0.2)
    runs = {s: train(mlp(64, 10, (16,), norm="bn", seed=0), split, steps=30, batch_size=32, lr=0.5, seed=0,
                     eval_every=30, schedule=s).as_dict() for s in ("constant", "cosine")}
    assert runs["constant"]["curve"][0] == runs["cosine"]["curve"][0]
    assert runs["constant"]["final_loss"] != runs["cosine"]["final_loss"]


def _run(val, test=None, diverged=None):
    return {"val_curve": val, "curve": test or val, "diverged_at": diverged}


def test_selection_follows_validation_not_test():
    # candidate 0 looks best on test, candidate 1 on validation: validation must win
    runs = [[_run([[0, 0.1], [100, 0.80]], [[0, 0.1], [100, 0.99]])],
            [_run([[0, 0.1], [100, 0.90]], [[0, 0.1], [100, 0.50]])]]
    assert _selection.select_on_validation([0.1, 1.0], runs)["value"] == 1.0


def test_selection_by_steps_to_target_then_accuracy():
    slow = [_run([[0, 0.1], [50, 0.5], [100, 0.97]])]
    fast = [_run([[0, 0.1], [50, 0.92], [100, 0.93]])]
    never = [_run([[0, 0.1], [100, 0.85]])]
    chosen = _selection.select_on_validation([1, 2, 3], [slow, fast, never], target=0.9)
    assert chosen["value"] == 2 and chosen["scores"][2]["validation_steps_to_target"] is None
    assert "validation" in chosen["criterion"]


def test_a_diverged_seed_disqualifies_a_candidate():
    good = [_run([[0, 0.1], [50, 0.92]]), _run([[0, 0.1], [50, 0.91]])]
    broken = [_run([[0, 0.1], [25, 0.95]]), _run([[0, 0.1], [10, 0.1]], diverged=10)]
    assert _selection.select_on_validation(["good", "broken"], [good, broken], target=0.9)["value"] == "good"
    assert _selection.select_on_validation(["good", "broken"], [good, broken])["value"] == "good"


def test_selection_needs_validation_curves():
    with pytest.raises(ValueError, match="no validation curve"):
        _selection.select_on_validation([1], [[{"val_curve": [], "diverged_at": None}]])
    with pytest.raises(ValueError, match="one list of runs per candidate"):
        _selection.select_on_validation([1, 2], [[]])


def test_t_interval_matches_the_closed_form():
    values = [0.2, 0.5, 0.1, 0.4, 0.3]
    stat = _compare.mean_ci(values)
    half = 2.7764451051977987 * stat["std"] / math.sqrt(5)  # t_{0.975, 4}
    assert stat["ci95"] == pytest.approx([0.3 - half, 0.3 + half])


def test_paired_difference_pairs_by_seed():
    # unpaired the arms overlap; paired, every seed favours the first by about 1 point
    first, second = [0.60, 0.70, 0.80, 0.90], [0.59, 0.69, 0.79, 0.885]
    diff = _compare.paired_difference(first, second)
    assert diff["verdict"] == "first" and diff["ci95"][0] > 0


def test_no_difference_detected_when_the_interval_spans_zero():
    diff = _compare.paired_difference([0.70, 0.65, 0.72], [0.68, 0.69, 0.70])
    assert diff["verdict"] == "none" and diff["ci95"][0] < 0 < diff["ci95"][1]
    assert _compare.describe(diff).startswith("no difference detected (")


def test_missing_pairs_are_left_out_and_one_pair_gives_no_interval():
    diff = _compare.paired_difference([0.9, None, 0.8], [0.5, 0.6, None])
    assert diff["n"] == 1 and diff["ci95"] is None and diff["verdict"] == "none"
    assert "no CI" in _compare.describe(diff)
    with pytest.raises(ValueError, match="one value per seed"):
        _compare.paired_difference([0.9], [0.5, 0.6])


def test_ratio_is_geometric_and_its_interval_excludes_one_only_when_consistent():
    ratio = _compare.paired_ratio([400, 300, 500], [100, 100, 100])
    assert ratio["mean"] == pytest.approx((4 * 3 * 5) ** (1 / 3)) and ratio["verdict"] == "first"
    assert _compare.paired_ratio([200, 50, 120], [100, 100, 100])["verdict"] == "none"
    assert _compare.paired_ratio([None, 0, 10], [1, 1, 0])["n"] == 0


def test_default_seed_counts_and_commands():
    assert default_seeds("convergence") >= 3
    settings = resolved("convergence", Settings(first_seed=5))
    assert settings.seeds == tuple(range(5, 5 + default_seeds("convergence")))
    assert command("convergence", settings) == "normkit experiment convergence --first-seed 5"
    assert command("convergence", Settings(seeds=(0,))) == "normkit experiment convergence --seeds 1"
    assert command("all", Settings(quick=True)) == "normkit experiment all --quick"


def test_report_header_says_quick_and_how_to_read_the_numbers(quick_experiment, tmp_path):
    result = quick_experiment("convergence")
    path = tmp_path / "RESULTS.md"
    report([result], tmp_path / "results", path, 1.0)
    text = path.read_text()
    assert "normkit experiment all --seeds 2 --quick" in text and "Quick run (`--quick`)" in text
    assert "95 % confidence interval" in text and "validation part" in text and "last printed digit" in text
