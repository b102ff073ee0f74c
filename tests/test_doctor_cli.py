"""``normkit doctor TARGET``: exit status, table, ``--json`` schema, the three kinds of TARGET."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normkit.cli import main
from normkit.diagnostics import RULES

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "buggy_cnn.py"
FINDING_KEYS = {"rule", "severity", "module", "message", "fix", "fixed"}


def normkit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normkit", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


def test_buggy_example_fails_with_json_schema():
    done = normkit("doctor", f"{EXAMPLE}:buggy", "--input-shape", "4,3,32,32", "--json")
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert set(report) == {"schema", "mode", "dynamic", "ok", "counts", "findings", "changes"}
    assert (report["schema"], report["mode"], report["dynamic"], report["ok"]) == ("normkit.doctor/1", "train",
                                                                                  True, False)
    assert report["counts"]["error"] >= 1
    for finding in report["findings"]:
        assert set(finding) == FINDING_KEYS
        assert finding["rule"] in RULES
        assert finding["severity"] in ("error", "warning", "info")
    planted = {"torch-momentum-keras-value", "bias-before-bn", "bn-after-dropout", "bn-before-output",
               "frozen-stats-updating", "small-batch"}
    assert planted <= {f["rule"] for f in report["findings"]}


def test_clean_example_passes_and_prints_a_table_in_process(capsys):
    assert main(["doctor", f"{EXAMPLE}:clean", "--input-shape", "16,3,32,32"]) == 0
    assert "no batch-norm problem found" in capsys.readouterr().out
    assert main(["doctor", f"{EXAMPLE}:buggy", "--mode", "inference"]) == 1
    out = capsys.readouterr().out
    assert "train-mode-inference" in out and "FAILED" in out


def test_module_factory_and_trusted_checkpoint(tmp_path):
    (tmp_path / "mymodels.py").write_text(
        "import torch\n\ndef good():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8, bias=False), "
        "torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 2))\n"
    )
    done = normkit("doctor", "mymodels:good", "--input-shape", "16,4", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["findings"] == []
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8, momentum=0.9)).eval()
    torch.save(model, tmp_path / "model.pt")
    refused = normkit("doctor", str(tmp_path / "model.pt"), "--json")
    assert refused.returncode == 2 and refused.stdout == ""
    assert "--unsafe-load" in refused.stderr and "Traceback" not in refused.stderr
    done = normkit("doctor", str(tmp_path / "model.pt"), "--json", "--unsafe-load")
    assert done.returncode == 1
    assert "weights_only=False" in done.stderr and "trust" in done.stderr
    report = json.loads(done.stdout)
    assert report["mode"] == "inference"  # the pickled model's own flag
    assert {f["rule"] for f in report["findings"]} == {"torch-momentum-keras-value", "bias-before-bn",
                                                       "bn-before-output"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["doctor"], "required: TARGET"),
        (["doctor", "nowhere"], "expected path/to/file.py:factory"),
        (["doctor", "missing_module_xyz:f"], "expected an importable module"),
        (["doctor", f"{EXAMPLE}:nothing"], "to define 'nothing'"),
        (["doctor", f"{EXAMPLE}:SmallCNN", "--input-shape", "8,x"], "expected positive integers"),
        (["doctor", f"{EXAMPLE}:clean", "--mode", "eval"], "invalid choice"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("normkit doctor: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_failing_factory_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "broken.py").write_text("def model():\n    raise RuntimeError('no weights here')\n")
    assert main(["doctor", f"{tmp_path / 'broken.py'}:model"]) == 2
    assert "model() raised RuntimeError: no weights here" in capsys.readouterr().err


def test_state_dict_checkpoint_is_a_usage_error(tmp_path, capsys):
    torch.save(torch.nn.BatchNorm1d(3).state_dict(), tmp_path / "weights.pt")
    assert main(["doctor", str(tmp_path / "weights.pt")]) == 2
    assert "a state dict needs its model" in capsys.readouterr().err
