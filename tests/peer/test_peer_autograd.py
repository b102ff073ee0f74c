"""Check 9 (gradcheck/gradgradcheck in float64 on the small inputs) and check 10 (in-place ops on the output)."""

from __future__ import annotations

import pytest
import torch

from harness import INPLACE_OPS, NAMES, Case, check_gradcheck, check_inplace, input_cases, module_inputs, params

GRADCHECK_INPUTS = 3  # per module: the first ones with at most GRADCHECK_NUMEL input elements
GRADCHECK_NUMEL = 256


def _small(name: str) -> set[str]:
    small = [mi.desc or "default" for mi in module_inputs(name, torch.float64, True)
             if 0 < mi.forward_input.args[0].numel() <= GRADCHECK_NUMEL]
    return set(small[:GRADCHECK_INPUTS])


SMALL = {name: _small(name) for name in NAMES}


def _gradcheck_input(name, mi) -> bool:
    return (mi.desc or "default") in SMALL[name]


@pytest.mark.parametrize("case", params("gradcheck", input_cases(dtypes=("f64",), where=_gradcheck_input)))
def test_gradcheck(case: Case) -> None:
    check_gradcheck(case).done(at_least=2)


@pytest.mark.parametrize("case", params("inplace", input_cases(dtypes=("f32",))))
def test_inplace_on_output(case: Case) -> None:
    check_inplace(case).done(at_least=2 * len(INPLACE_OPS))
