"""Check 1 (forward against torch's class, float32/float64/bfloat16, train and eval) and check 2 (non-contiguous
inputs) over module_db's inputs."""

from __future__ import annotations

import pytest
import torch

from harness import (
    Case,
    can_be_noncontiguous,
    check_forward,
    check_noncontiguous,
    input_cases,
    params,
    tensors_of,
)


@pytest.mark.parametrize("case", params("forward", input_cases(dtypes=("f32", "f64", "bf16"))))
def test_forward(case: Case) -> None:
    check_forward(case).done()


def _noncontiguous_possible(name, mi) -> bool:
    return all(can_be_noncontiguous(t) for t in tensors_of(mi.forward_input))


@pytest.mark.parametrize("case", params("noncontiguous", input_cases(where=_noncontiguous_possible)))
def test_noncontiguous(case: Case) -> None:
    check_noncontiguous(case).done()


def _has_state(name, mi) -> bool:
    c = mi.constructor_input
    module = getattr(torch.nn, name)(*c.args, **c.kwargs)
    return _noncontiguous_possible(name, mi) and any(t.numel() > 1 for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize("case", params("noncontiguous_state", input_cases(where=_has_state)))
def test_noncontiguous_parameters_and_buffers(case: Case) -> None:
    check_noncontiguous(case, state=True).done()
