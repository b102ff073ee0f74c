"""The ``normkit`` command under hostile and mistaken input: exit 2 with one line, never code from a checkpoint.

Exit statuses (README, ``normkit --help``): 0 success, 1 error findings, 2 a user error, 3 an internal error.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normkit import cli
from normkit.cli import main
from normkit.diagnostics import TargetError, load_model

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "buggy_cnn.py"


def normkit(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "normkit", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd)


class _RunsCode:
    """Unpickling this writes a marker file: the proof that a load ran code from the checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the checkpoint ran"))


def one_error_line(err: str, command: str = "normkit doctor") -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{command}: error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_a_checkpoint_with_code_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _RunsCode(marker)}, tmp_path / "evil.pt")
    done = normkit("doctor", str(tmp_path / "evil.pt"))
    assert done.returncode == 2 and not marker.exists()
    line = one_error_line(done.stderr)
    assert "pickled Python objects" in line and "--unsafe-load" in line and "refused" in line


def test_unsafe_load_is_explicit_and_warns(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(TargetError, match="--unsafe-load"):
        load_model(tmp_path / "model.pt")
    with pytest.warns(UserWarning, match="runs any code embedded in the file"):
        loaded = load_model(tmp_path / "model.pt", allow_unsafe=True)
    assert isinstance(loaded, torch.nn.Sequential)
    done = normkit("doctor", str(tmp_path / "model.pt"), "--unsafe-load", "--json")
    assert done.returncode == 0, done.stderr
    assert "normkit doctor: warning: loading" in done.stderr


@pytest.mark.parametrize(("content", "expected"), [
    (b"\x80\x02\x8a\x0a" + bytes(range(40)), "is not a checkpoint"),
    (b"", "is not a checkpoint (torch.load: EOFError"),
    (b"plain text, not a checkpoint\n", "is not a checkpoint"),
])
def test_a_file_that_is_not_a_checkpoint_is_not_called_a_pickle(tmp_path, content, expected, capsys):
    (tmp_path / "junk.pt").write_bytes(content)
    assert main(["doctor", str(tmp_path / "junk.pt")]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert expected in line and "pickled" not in line and "weights_only=False" not in line


@pytest.mark.parametrize(("source", "expected"), [
    ("def model(:\n", "SyntaxError in"),
    ("raise RuntimeError('boom at import')\n", "importing broken.py raised RuntimeError: boom at import"),
    ("import sys\nsys.exit(3)\n", "called sys.exit(3)"),
    ("import sys\ndef model():\n    sys.exit('bye')\n", "broken.py:model() called sys.exit('bye')"),
    ("def model():\n    return 42\n", "to return an nn.Module, got int"),
    ("import no_such_module_xyz\n", "ModuleNotFoundError"),
])
def test_a_broken_target_exits_2_with_one_line(tmp_path, source, expected):
    (tmp_path / "broken.py").write_text(source)
    done = normkit("doctor", "broken.py:model", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert expected in one_error_line(done.stderr)
    debug = normkit("doctor", "broken.py:model", "--debug", cwd=tmp_path)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_a_directory_target_is_a_user_error(tmp_path, capsys):
    assert main(["doctor", str(tmp_path)]) == 2
    assert "got the directory" in one_error_line(capsys.readouterr().err)


def test_an_internal_error_exits_3_and_debug_shows_it(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr("normkit.diagnostics.doctor", broken)
    assert main(["doctor", "torch.nn:Identity"]) == 3
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug" in err and "Traceback" not in err
    assert main(["doctor", "torch.nn:Identity", "--debug"]) == 3
    assert "Traceback" in capsys.readouterr().err


@pytest.fixture
def no_training(monkeypatch):
    def must_not_run(*args, **kwargs):
        raise AssertionError("training started before the output paths were checked")

    monkeypatch.setattr("normkit.experiments.demo.run_demo", must_not_run)
    monkeypatch.setattr("normkit.experiments._harness.run_experiment", must_not_run)


@pytest.mark.parametrize(("argv", "expected"), [
    (["demo", "--out", "{file}/sub"], "lies under"),
    (["demo", "--out", "{file}"], "is a file"),
    (["demo", "--json", "{dir}"], "is a folder"),
    (["demo", "--out", "/proc/normkit-cannot-write"], "cannot be"),
    (["experiment", "convergence", "--quick", "--out", "{file}"], "is a file"),
    (["experiment", "convergence", "--quick", "--report", "{dir}"], "is a folder"),
])
def test_output_paths_are_checked_before_training(tmp_path, argv, expected, no_training, capsys):
    (tmp_path / "afile").write_text("not a folder")
    argv = [arg.format(file=tmp_path / "afile", dir=tmp_path) for arg in argv]
    assert main(argv) == 2
    assert expected in one_error_line(capsys.readouterr().err, f"normkit {argv[0]}")


def test_the_output_folder_is_created_before_training(tmp_path, no_training, capsys):
    assert main(["demo", "--out", str(tmp_path / "new" / "runs"), "--steps", "5"]) == 3  # the stub's "bug"
    assert "training started before the output paths were checked" in capsys.readouterr().err
    assert (tmp_path / "new" / "runs").is_dir()


def test_min_severity_rule_and_summary(capsys):
    target = f"{EXAMPLE}:buggy"
    assert main(["doctor", target, "--input-shape", "4,3,32,32", "--summary"]) == 1
    full = capsys.readouterr().out.strip().splitlines()
    assert full[-1].startswith("FAILED") and any("torch-momentum-keras-value" in line for line in full)
    assert main(["doctor", target, "--input-shape", "4,3,32,32", "--summary", "--min-severity", "error"]) == 1
    errors_only = capsys.readouterr().out.strip().splitlines()
    assert all(line.startswith("error") for line in errors_only[:-1]) and len(errors_only) < len(full)
    assert main(["doctor", target, "--input-shape", "4,3,32,32", "--rule", "bn-after-dropout", "--json"]) == 0
    import json

    rules = {f["rule"] for f in json.loads(capsys.readouterr().out)["findings"]}
    assert rules == {"bn-after-dropout"}
    assert main(["doctor", target, "--rule", "no-such-rule"]) == 2
    assert "invalid choice" in one_error_line(capsys.readouterr().err)


def test_the_parser_never_exits_the_interpreter_on_a_bad_flag(capsys):
    assert main(["demo", "--steps", "-3"]) == 2
    assert "expected a positive integer" in one_error_line(capsys.readouterr().err, "normkit demo")
    assert isinstance(cli.build_parser(), cli.argparse.ArgumentParser)
