"""The GPU check (benchmarks/gpu_check.sh + bench_gpu.py) runs end to end without a GPU, and its pure parts add up.

The subprocess test runs the script's smoke dry run (``--dry-run --smoke``: one correctness check and two cases on
CPU under Triton's interpreter, plus an injected case that raises) and checks the harness: a report row is written
after every check and case, a case that raises is an error row and the run goes on, the report has its sections.
Timings there are meaningless; the GPU run itself is `bash benchmarks/gpu_check.sh` on a lent machine. The
full dry run (every check, the priority cases) is `bash benchmarks/gpu_check.sh --dry-run` (about 50 s).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_gpu():
    """benchmarks/bench_gpu.py as a module (benchmarks/ is not a package; its runner.py comes along)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module("bench_gpu")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def _smoke_run(tmp_path: Path) -> tuple[subprocess.CompletedProcess, Path]:
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable, GPU_BENCH_ARGS="--inject-failure",
               GPU_CHECK_SECONDS="120")
    for name in ("NORMKIT_BACKEND", "TRITON_INTERPRET", "GPU_CHECK_INNER", "GPU_CHECK_DRY_RUN"):
        env.pop(name, None)
    result = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--smoke"], capture_output=True,
                            text=True, env=env, cwd=ROOT, timeout=150)
    return result, tmp_path / "gpu-bench.md"


@pytest.mark.slow
def test_smoke_dry_run_writes_a_row_per_case_and_survives_a_raising_case(tmp_path, bench_gpu):
    pytest.importorskip("triton")
    if shutil.which("timeout") is None:
        pytest.skip("coreutils timeout not available")
    result, out = _smoke_run(tmp_path)
    log = f"stdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-3000:]}"
    assert result.returncode == 1, log  # the injected case raised: reported, and the status says so

    report = json.loads(out.with_suffix(".json").read_text())
    assert report["meta"]["mode"] == "smoke" and report["meta"]["meaningless"] is True
    assert report["meta"]["normkit_tune"] == "check"
    assert len(report["correctness"]) == report["planned_checks"] == 1
    assert report["correctness"][0]["ok"], report["correctness"]
    rows = report["results"]
    assert len(rows) == report["planned"] == 3, [r["case"] for r in rows]
    assert "injected failure" in rows[1]["case"] and "error" in rows[1], rows[1]
    for row in (rows[0], rows[2]):  # the cases before and after the one that raised were measured
        assert "error" not in row, row.get("error")
        assert {"eager", "normkit"} <= set(row["ms"]) and row["vs"]["eager"] > 0, row["case"]
        assert row["bytes_min"] <= row["bytes_normkit"] and set(row["first_call_s"]) >= {"eager", "normkit"}
    assert "compile" in rows[0]["ms"], rows[0]["notes"]  # the first priority case also times torch.compile
    assert [e.split(":")[0] for e in report["errors"]] == [rows[1]["case"]]
    assert report["cuda_plan"] and {e["backend"] for e in report["cuda_plan"]} <= {"triton", "aten"}
    assert [g["goal"] for g in report["goals"]] == [g["goal"] for g in bench_gpu.goals([], None)]

    # a row was written after every check and case, in order (the log line follows each case's own line)
    log_text = (tmp_path / "gpu-check.log").read_text()
    written = re.findall(r"row written: (check|case) (.+)", log_text)
    assert [w[1] for w in written] == [c["case"] for c in report["correctness"]] + [r["case"] for r in rows]
    text = out.read_text()
    for heading in ("SMOKE on CPU", "## Goals", "## Correctness", "## Results", "## Suggested CUDA_PLAN",
                    "## Byte model", "## Errors"):
        assert heading in text, heading
    for row in rows:
        assert f"| {row['case']} |" in text, row["case"]
    assert "GOALS" in result.stdout and "bench: 1" in result.stdout, log


def test_byte_models(bench_gpu):
    case = bench_gpu.Case("bn", "plain", True, (8, 4, 2, 2), "nchw", "fp16")
    n = case.numel * 2
    assert (bench_gpu.bytes_normkit(case), bench_gpu.bytes_minimum(case)) == (8 * n, 5 * n)
    fused = bench_gpu.Case("bn_act", "add+relu", True, (8, 4, 2, 2), "nchw", "fp16")
    sign_bits = 2 * fused.numel // 8  # written by the forward, read by the backward: 1 bit per value each way
    assert (bench_gpu.bytes_normkit(fused), bench_gpu.bytes_minimum(fused)) == (10 * n + sign_bits, 8 * n)
    fused_eval = bench_gpu.Case("bn_act", "add+relu", False, (8, 4, 2, 2), "nchw", "fp16")
    assert (bench_gpu.bytes_normkit(fused_eval), bench_gpu.bytes_minimum(fused_eval)) == (3 * n, 3 * n)
    ln = bench_gpu.Case("ln", "plain", True, (8, 16), "rows", "fp16")
    assert bench_gpu.bytes_normkit(ln) == bench_gpu.bytes_minimum(ln) == 5 * ln.numel * 2


def _row(bench_gpu, case, vs, fallback=None):
    return {"case": case.label(), "op": case.op, "mode": case.mode, "plan_key": bench_gpu.plan_key(case),
            "beyond_l2": True, "ms": {"normkit": 1.0}, "vs": vs, "fallback": fallback, "notes": [],
            "pct_copy": {"normkit": {"normkit_bytes": 0.95, "min_bytes": 0.6}}}


def test_cuda_plan_picks_triton_only_where_faster_than_eager_and_compile(bench_gpu):
    big = bench_gpu.Case("bn", "plain", True, (256, 256, 56, 56), "channels_last", "bf16")
    small = bench_gpu.Case("bn", "plain", False, (8, 2048, 7, 7), "nchw", "fp32")
    gn = bench_gpu.Case("gn", "silu", True, (8, 320, 64, 64), "nchw", "fp16")
    plan = bench_gpu.cuda_plan([_row(bench_gpu, big, {"eager": 1.3, "compile": 1.1}),
                                _row(bench_gpu, small, {"eager": 1.2, "compile": 0.9}),
                                _row(bench_gpu, gn, {"eager": 2.5}, fallback="refused")])
    assert {tuple(e["key"]): e["backend"] for e in plan} == {
        ("batch_norm_train", "channels_last", "bfloat16", "large"): "triton",
        ("batch_norm_eval", "nchw", "float32", "small"): "aten",  # slower than torch.compile
        ("group_norm", "nchw", "float16", "large"): "aten",  # the kernels refused it: ATen ran
    }
    assert "('batch_norm_train', 'channels_last', 'bfloat16', 'large'): 'triton'" in bench_gpu.plan_literal(plan)


def test_goals_pass_and_fail_on_their_thresholds(bench_gpu):
    fused = bench_gpu.Case("bn_act", "relu", True, (256, 256, 56, 56), "nchw", "bf16")
    big = bench_gpu.Case("bn", "plain", True, (256, 256, 56, 56), "nchw", "bf16")
    rows = [_row(bench_gpu, fused, {"eager": 1.7}), _row(bench_gpu, big, {"eager": 0.99, "compile": 1.2})]
    by_name = {g["goal"].split(":")[0].split(" vs ")[0]: g for g in bench_gpu.goals(rows, "ImportError: no")}
    assert by_name["BN training fwd+bwd beyond L2"]["passed"] is True  # 95% >= 90%
    assert by_name["fused BN+ReLU / BN+add+ReLU training"]["passed"] is True
    assert by_name["never slower than eager, every measured case"]["passed"] is False  # 0.99x
    assert by_name["LayerNorm"]["passed"] is None and "not importable" in by_name["LayerNorm"]["missing"]
    lines = bench_gpu.goal_lines(bench_gpu.goals(rows, None), meaningless=False)
    assert any(line.startswith("FAIL: never slower than eager") for line in lines)
    assert any(line.startswith("NOT MEASURED: GroupNorm") for line in lines)


def test_plans_put_checks_first_and_fit_the_limits(bench_gpu):
    checks, cases = bench_gpu.plan("gpu", inject_failure=False)
    assert 14 <= len(checks) <= 18
    assert sum(c.compile for c in cases) <= bench_gpu.COMPILE_CASES
    assert len({c.label() for c in cases}) == len(cases)
    assert {c.op for c in cases[:10]} == {"bn", "bn_act", "gn", "ln"}  # every goal covered first
    dry_checks, dry_cases = bench_gpu.plan("dry-run", inject_failure=False)
    assert len(dry_checks) == len(checks) and max(c.numel for c in dry_checks + dry_cases) < 2**14
