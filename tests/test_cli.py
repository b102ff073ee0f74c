import json
import subprocess
import sys

import pytest

import normkit
from normkit.cli import main
from normkit.experiments import conclusion

ARM_KEYS = {"label", "curve", "final_accuracy", "final_loss", "steps_to_target", "seconds"}


def run_demo_json(tmp_path, *args):
    path = tmp_path / "demo.json"
    assert main(["demo", *args, "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_demo_writes_both_arms(tmp_path, capsys):
    result = run_demo_json(tmp_path, "--steps", "60")
    assert set(result) == {"config", "arms", "ratio", "ratio_lower_bound", "elapsed_s"}
    assert set(result["arms"]) == {"plain", "batchnorm"}
    assert result["config"]["steps"] == 60
    assert result["config"]["seed"] == 0
    for arm in result["arms"].values():
        assert set(arm) == ARM_KEYS
        assert 0.0 <= arm["final_accuracy"] <= 1.0
        steps = [step for step, _ in arm["curve"]]
        assert steps[0] == 0
        assert steps[-1] == 60
        assert all(0.0 <= acc <= 1.0 for _, acc in arm["curve"])
        assert arm["steps_to_target"] is None or arm["steps_to_target"] in steps
    printed = capsys.readouterr().out
    assert "without BN" in printed
    assert "with BN" in printed
    assert conclusion(result).split()[0] in printed


def test_demo_is_deterministic(tmp_path):
    first = run_demo_json(tmp_path, "--steps", "20", "--seed", "3")
    second = run_demo_json(tmp_path, "--steps", "20", "--seed", "3")
    for arm in ("plain", "batchnorm"):
        assert first["arms"][arm]["curve"] == second["arms"][arm]["curve"]
        assert first["arms"][arm]["final_loss"] == second["arms"][arm]["final_loss"]


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"normkit {normkit.__version__}"


@pytest.mark.parametrize("argv", [[], ["demo", "--steps", "0"], ["experiment", "x"]])
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    assert "usage: normkit" in capsys.readouterr().err


def test_python_dash_m_help():
    done = subprocess.run([sys.executable, "-m", "normkit", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "demo" in done.stdout


def fake_result(plain, bn, steps=600):
    arms = {
        "plain": {"steps_to_target": plain, "final_accuracy": 0.5},
        "batchnorm": {"steps_to_target": bn, "final_accuracy": 0.95},
    }
    both = plain is not None and bn is not None
    return {
        "config": {"steps": steps, "target": 0.9},
        "arms": arms,
        "ratio": plain / bn if both else None,
        "ratio_lower_bound": steps / bn if plain is None and bn is not None else None,
    }


@pytest.mark.parametrize(
    ("plain", "bn", "expected"),
    [
        (400, 50, "8.0x fewer steps"),
        (50, 100, "batch norm was slower here (2.0x more steps)"),
        (100, 100, "no difference"),
        (None, 50, "over 12x fewer steps"),
        (300, None, "batch norm did not help here"),
        (None, None, "Neither network reached 90%"),
    ],
)
def test_conclusion_follows_the_numbers(plain, bn, expected):
    assert expected in conclusion(fake_result(plain, bn))
