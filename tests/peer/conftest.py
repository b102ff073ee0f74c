"""The peer harness runs thousands of tiny modules: one intra-op thread for each test module."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_torch_thread):
    yield
