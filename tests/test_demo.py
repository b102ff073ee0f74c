"""``normkit demo``: the files it writes, their schema, determinism, both datasets."""

import json
import math

import pytest

from normkit.cli import main
from normkit.data import load_mnist1d
from normkit.experiments import conclusion, run_demo
from normkit.experiments import demo as demo_module

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TOP_KEYS = {"schema", "config", "arms", "ratio", "ratio_lower_bound", "conclusion", "environment", "elapsed_s"}
CONFIG_KEYS = {"dataset", "data", "train_size", "test_size", "model", "optimizer", "lr", "batch_size", "steps", "seed",
               "target", "eval_every", "percentiles", "unit", "layer"}
ARM_KEYS = {"label", "curve", "sigmoid_input", "final_accuracy", "best_accuracy", "final_loss", "steps_to_target",
            "seconds"}
TIMINGS = {"elapsed_s", "seconds"}


def without_timings(value):
    """The result with its wall-clock entries removed: everything else must repeat exactly."""
    if isinstance(value, dict):
        return {key: without_timings(item) for key, item in value.items() if key not in TIMINGS}
    return value


@pytest.fixture
def small_mnist1d(monkeypatch, tmp_path):
    """The demo on a 200-example MNIST-1D (private cache), so that no test pays for the full generation."""
    monkeypatch.setenv("NORMKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(demo_module, "load_mnist1d", lambda: load_mnist1d(num_samples=200))


def test_demo_writes_png_and_json_with_the_schema(tmp_path, capsys):
    assert main(["demo", "--steps", "30", "--out", str(tmp_path / "out")]) == 0
    png = tmp_path / "out" / "normkit-demo.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    result = json.loads((tmp_path / "out" / "normkit-demo.json").read_text())
    assert set(result) == TOP_KEYS
    assert result["schema"] == "normkit.demo/1"
    assert set(result["config"]) == CONFIG_KEYS
    config = result["config"]
    assert (config["dataset"], config["steps"], config["seed"], config["batch_size"]) == ("digits", 30, 0, 60)
    assert config["percentiles"] == [15, 50, 85]
    assert set(result["arms"]) == {"plain", "batchnorm"}
    for arm in result["arms"].values():
        assert set(arm) == ARM_KEYS
        steps = [step for step, _ in arm["curve"]]
        assert steps == [0, 10, 20, 30]
        assert all(0.0 <= acc <= 1.0 for _, acc in arm["curve"])
        assert [row[0] for row in arm["sigmoid_input"]] == steps
        assert all(len(row) == 4 and row[1] <= row[2] <= row[3] for row in arm["sigmoid_input"])
        assert arm["final_accuracy"] == arm["curve"][-1][1]
        assert arm["best_accuracy"] == max(acc for _, acc in arm["curve"])
        assert arm["steps_to_target"] is None or arm["steps_to_target"] in steps
        assert math.isfinite(arm["final_loss"])
    assert result["conclusion"] == conclusion(result)
    printed = capsys.readouterr().out
    assert "without BN" in printed and "with BN" in printed
    assert "steps to 90%" in printed
    assert result["conclusion"].split()[0] in printed


def test_demo_defaults_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--steps", "3"]) == 0
    assert (tmp_path / "normkit-demo.png").is_file()
    assert json.loads((tmp_path / "normkit-demo.json").read_text())["config"]["steps"] == 3


def test_json_option_redirects_the_json(tmp_path):
    assert main(["demo", "--steps", "3", "--out", str(tmp_path), "--json", str(tmp_path / "sub" / "r.json")]) == 0
    assert json.loads((tmp_path / "sub" / "r.json").read_text())["schema"] == "normkit.demo/1"
    assert not (tmp_path / "normkit-demo.json").exists()
    assert (tmp_path / "normkit-demo.png").is_file()


def test_same_seed_gives_the_same_numbers():
    first, second = (run_demo(steps=20, seed=3) for _ in range(2))
    assert without_timings(first) == without_timings(second)
    other = run_demo(steps=20, seed=4)
    assert without_timings(other)["arms"] != without_timings(first)["arms"]


def test_run_demo_leaves_thread_count_alone():
    import torch

    before = torch.get_num_threads()
    run_demo(steps=2)
    assert torch.get_num_threads() == before


def test_batch_norm_input_is_normalized_at_the_start():
    bands = run_demo(steps=1)["arms"]["batchnorm"]["sigmoid_input"]
    _, p15, p50, p85 = bands[0]  # gamma 1, beta 0: roughly the standard normal's -1.04, 0, +1.04
    assert -1.5 < p15 < -0.6 and abs(p50) < 0.4 and 0.6 < p85 < 1.5


def test_mnist1d_dataset(small_mnist1d, tmp_path):
    assert main(["demo", "--dataset", "mnist1d", "--steps", "5", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "normkit-demo.json").read_text())
    assert result["config"]["dataset"] == "mnist1d"
    assert result["config"]["target"] == 0.4
    assert result["config"]["model"].startswith("MLP 40-100-100-100-10")
    assert (result["config"]["train_size"], result["config"]["test_size"]) == (160, 40)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"dataset": "mnist"}, "Expected dataset"), ({"steps": 0}, "Expected steps"), ({"lr": -1.0}, "Expected lr"),
     ({"target": 1.5}, "Expected target"), ({"eval_every": 0}, "Expected eval_every")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_demo(**kwargs)


@pytest.mark.parametrize(("plain", "bn", "expected"), [
    (400, 50, "batch norm needed 8.0x fewer steps at the same learning rate (lr 3 for both, one seed)."),
    (50, 100, "batch norm was slower here (2.0x more steps) at the same learning rate (lr 3 for both, one seed)."),
])
def test_conclusion_names_the_shared_rate_and_the_single_seed(plain, bn, expected):
    result = {"config": {"steps": 600, "target": 0.9, "lr": 3.0}, "ratio": plain / bn, "ratio_lower_bound": None,
              "arms": {"plain": {"steps_to_target": plain}, "batchnorm": {"steps_to_target": bn}}}
    sentence = conclusion(result)
    assert sentence.endswith(expected)
    assert "fastest" not in sentence and "centred" not in sentence


@pytest.mark.parametrize(("rows", "expected"), [
    ([[0, 0.0], [10, -1.0], [20, -1.2], [30, -1.25]], 10),   # settles early, away from 0: not "centred"
    ([[0, 0.0], [10, 4.0], [20, 1.0], [30, 3.8]], 30),      # still moving at the end
    ([[0, 2.0]], 0),
])
def test_settles_at_is_the_step_from_which_the_value_stays_near_its_end(rows, expected):
    assert demo_module.settles_at(rows, column=1, tolerance=0.5) == expected


def test_settles_at_needs_rows():
    with pytest.raises(ValueError, match="at least one row"):
        demo_module.settles_at([])
