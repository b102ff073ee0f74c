"""Check 6 (factory kwargs: device/dtype at construction, meta) and check 7 (.to(dtype), .float()/.double(),
.to("meta"), .to_empty() after meta construction)."""

from __future__ import annotations

import pytest

from harness import Case, check_conversions, check_factory_kwargs, input_cases, params


@pytest.mark.parametrize("case", params("factory_kwargs", input_cases(dtypes=(None,), modes=(None,))))
def test_factory_kwargs(case: Case) -> None:
    check_factory_kwargs(case).done()


@pytest.mark.parametrize("case", params("conversions", input_cases(dtypes=(None,), modes=(None,))))
def test_conversions(case: Case) -> None:
    check_conversions(case).done()
