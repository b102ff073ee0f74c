"""Check 8: every ``module_error_inputs_func`` entry, ours against torch's class; a failed forward changes nothing."""

from __future__ import annotations

import pytest

from harness import IMPLS, NAMES, Case, ModuleErrorEnum, check_error, error_inputs, params


def _error_cases():
    for name in NAMES:
        for index, entry in enumerate(error_inputs(name)):
            forward = entry.error_on == ModuleErrorEnum.FORWARD_ERROR
            kind = "forward_error" if forward else "construction_error"
            for impl in IMPLS:
                # module_db's entries are meant for training mode; eval is checked for parity with torch's class
                for mode in ("train", "eval") if forward else ("train",):
                    yield Case(impl, name, mode=mode, extra=f"{kind}_{index}")


@pytest.mark.parametrize("case", params("errors", _error_cases()))
def test_error(case: Case) -> None:
    check_error(case).done()
