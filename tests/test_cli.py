import subprocess
import sys

import pytest

import normkit
from normkit.cli import main
from normkit.experiments import conclusion


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"normkit {normkit.__version__}"


@pytest.mark.parametrize(
    "argv", [[], ["demo", "--steps", "0"], ["demo", "--dataset", "mnist"], ["experiment", "x"]]
)
def test_usage_errors_exit_2(argv, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("normkit") and ": error: " in err and "--help'" in err
    assert len(err.strip().splitlines()) == 1


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
        "config": {"steps": steps, "target": 0.9, "lr": 2.0},
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
