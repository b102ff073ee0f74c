"""The shared statistics arithmetic."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from normkit.functional import _stats


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 7), min_size=1, max_size=5), st.integers(0, 2**16))
def test_merge_moments_equals_the_moments_of_the_union(counts, seed):
    gen = torch.Generator().manual_seed(seed)
    groups = [torch.randn(n, 3, generator=gen, dtype=torch.float64) * 4 + 10 for n in counts]
    means = torch.stack([g.mean(0) if len(g) else torch.zeros(3, dtype=torch.float64) for g in groups])
    m2s = torch.stack([((g - g.mean(0)) ** 2).sum(0) if len(g) else torch.zeros(3, dtype=torch.float64)
                       for g in groups])
    count_t = torch.tensor(counts, dtype=torch.float64).unsqueeze(1)
    total, mean, m2 = _stats.merge_moments(count_t, means, m2s)
    union = torch.cat(groups)
    assert total[0].item() == len(union)
    if len(union):
        torch.testing.assert_close(mean, union.mean(0))
        torch.testing.assert_close(m2, ((union - union.mean(0)) ** 2).sum(0))


def test_unbiased_and_ema():
    var = torch.tensor([1.25])
    torch.testing.assert_close(_stats.unbiased(var, 4), torch.tensor([5 / 3]))
    assert _stats.unbiased(var, 1).isnan().all()
    torch.testing.assert_close(_stats.ema(torch.tensor([1.0]), torch.tensor([3.0]), 0.25), torch.tensor([1.5]))
    assert _stats.cumulative_factor(4) == 0.25


def test_accumulation_dtype():
    assert _stats.accumulation_dtype(torch.bfloat16) == torch.float32
    assert _stats.accumulation_dtype(torch.float16) == torch.float32
    assert _stats.accumulation_dtype(torch.float64) == torch.float64
