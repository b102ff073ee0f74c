"""The peer harness runs thousands of tiny modules: one intra-op thread each (on a busy 2-core machine the OpenMP
pool makes a (4, 10) batch norm 30 times slower). The setting is restored when each module's tests end."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
