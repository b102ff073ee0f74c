"""Check 4 (train/eval and the state after each call) and check 5 (pickle, torch.save/torch.load)."""

from __future__ import annotations

import pytest

from harness import Case, check_serialization, check_train_eval, input_cases, params


@pytest.mark.parametrize("case", params("train_eval", input_cases(modes=(None,))))
def test_train_eval(case: Case) -> None:
    tally, _ = check_train_eval(case)
    tally.done()


@pytest.mark.parametrize("case", params("serialization", input_cases(dtypes=("f32",))))
def test_serialization(case: Case) -> None:
    check_serialization(case).done()
