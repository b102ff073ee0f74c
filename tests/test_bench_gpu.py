"""benchmarks/bench_gpu.py runs end to end: its smoke mode, on CPU under Triton's interpreter, in a subprocess.

This checks the code paths (correctness section against torch, every case kind, torch.compile's wrapping, targets,
the markdown and JSON report), not timings. The GPU run itself is `bash benchmarks/gpu_check.sh` on a lent machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

def _env() -> dict[str, str]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONUNBUFFERED="1")
    env.pop("NORMKIT_BACKEND", None)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    return env


@pytest.mark.slow
def test_smoke_run_under_the_interpreter(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "gpu-bench.md"
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_gpu.py", "--device", "cpu", "--smoke", "--out", str(out)],
        capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=1800,
    )
    log = f"stdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert result.returncode == 0, log

    text = out.read_text()
    for heading in ("SMOKE RUN", "## Correctness", "## Targets (issue 8)", "## Results", "Byte model"):
        assert heading in text, heading
    assert "| bn2d | add+relu | train fwd+bwd |" in text
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["meta"]["smoke"] is True
    assert report["correctness"] and all(c["ok"] for c in report["correctness"])
    assert len(report["results"]) == report["planned"] > 0
    assert not report["errors"]
    for row in report["results"]:
        assert set(row["ms"]) == {"eager", "compile", "normkit"}, row["case"]
        assert row["speedup_vs_eager"] > 0 and row["bytes_model"] > 0
    assert all(t["n"] > 0 for t in report["targets"])  # the smoke set reaches every target's rows
