"""``import normkit`` stays light: no triton, matplotlib, scikit-learn or keras."""

from __future__ import annotations

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, time; t = time.perf_counter(); import normkit; "
        "print(' '.join(m for m in ('triton', 'matplotlib', 'sklearn', 'keras') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_public_api():
    import normkit

    for name in ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "doctor", "Monitor", "Report",
                 "compat", "diagnostics", "distributed", "functional", "nn", "tools"):
        assert name in normkit.__all__
        assert getattr(normkit, name) is not None
    assert normkit.BatchNorm2d is normkit.nn.BatchNorm2d
