"""Check 3: channels_last / channels_last_3d inputs and modules, over module_db's 4D and 5D inputs."""

from __future__ import annotations

import pytest

from harness import Case, check_memory_format, first_tensor, input_cases, params


def _four_or_five_d(name, mi) -> bool:
    return first_tensor(mi).dim() in (4, 5)


@pytest.mark.parametrize("case", params("memory_format", input_cases(where=_four_or_five_d)))
def test_memory_format(case: Case) -> None:
    check_memory_format(case).done()
