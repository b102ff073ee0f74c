"""The registry's generic contract tests, run on normkit.nn.SyncBatchNorm against torch.nn.SyncBatchNorm in one
process (no process group: both are a plain BatchNorm), plus SyncBatchNorm's own single-process behaviour."""

from __future__ import annotations

import pytest
import torch

import normkit
import test_contract as contract
from normkit.nn._torch_compat import build

from registry import Case

SHAPES = ((7, 5), (4, 5, 9), (2, 5, 3, 4), (2, 5, 1, 2, 3))
SYNC_CASES: list[Case] = [
    Case(normkit.nn.SyncBatchNorm, torch.nn.SyncBatchNorm, (5,), kwargs, SHAPES)
    for kwargs in ({}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}, {"bias": False},
                   {"momentum": 1.0, "eps": 1e-3})
] + [Case(normkit.nn.SyncBatchNorm, torch.nn.SyncBatchNorm, (5,), {}, ((4, 5, 6, 3),), torch.channels_last)]
DEFAULT = [c for c in SYNC_CASES if c.kwargs == {}]


@pytest.mark.parametrize("case", SYNC_CASES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_torch(case, train):
    contract.test_matches_torch(case, train)


@pytest.mark.parametrize("case", SYNC_CASES, ids=str)
def test_is_a_torch_module_with_torch_repr_and_state_dict(case):
    contract.test_is_a_torch_module_with_torch_repr_and_state_dict(case)


@pytest.mark.parametrize("case", SYNC_CASES, ids=str)
def test_state_dict_round_trips_both_ways(case):
    contract.test_state_dict_round_trips_both_ways(case)


@pytest.mark.parametrize("case", DEFAULT, ids=str)
def test_old_checkpoint_without_num_batches_tracked(case):
    contract.test_old_checkpoint_without_num_batches_tracked(case)


@pytest.mark.parametrize("case", SYNC_CASES[::3], ids=str)
def test_pickle_and_deepcopy(case):
    contract.test_pickle_and_deepcopy(case)


@pytest.mark.parametrize("case", DEFAULT, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_low_precision_input_keeps_float32_statistics(case, dtype, train):
    contract.test_low_precision_input_keeps_float32_statistics(case, dtype, train)


@pytest.mark.parametrize("case", SYNC_CASES[:2], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float64_module(case, train):
    contract.test_float64_module(case, train)


@pytest.mark.parametrize("case", DEFAULT, ids=str)
def test_flipping_track_running_stats_at_runtime(case):
    contract.test_flipping_track_running_stats_at_runtime(case)


@pytest.mark.parametrize("case", DEFAULT, ids=str)
def test_empty_batch_like_torch(case):
    contract.test_empty_batch_like_torch(case)


def test_constructor_is_torchs_plus_the_normkit_options():
    group = object()
    bn = normkit.nn.SyncBatchNorm(4, 1e-3, 0.2, True, True, group, None, torch.float64, bias=False,
                                  running_var="biased", nonfinite="propagate")
    assert (bn.eps, bn.momentum, bn.process_group, bn.weight.dtype, bn.bias) == (1e-3, 0.2, group, torch.float64, None)
    assert repr(bn).endswith("running_var='biased', nonfinite='propagate')")
    assert "process_group" not in repr(bn)
    assert list(bn.state_dict()) == list(build(torch.nn.SyncBatchNorm, 4, bias=False).state_dict())
    with pytest.raises(ValueError, match="running_var must be one of"):
        normkit.nn.SyncBatchNorm(4, running_var="sample")


def test_errors_are_torchs():
    bn = normkit.nn.SyncBatchNorm(3)
    with pytest.raises(ValueError, match=r"expected at least 2D input \(got 1D input\)"):
        bn(torch.randn(3))
    with pytest.raises(ValueError, match="SyncBatchNorm number of input channels should be non-zero"):
        normkit.nn.SyncBatchNorm(0)(torch.randn(2, 0))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3))
    assert bn.num_batches_tracked.item() == 0


def test_top_level_and_isinstance():
    assert issubclass(normkit.nn.SyncBatchNorm, torch.nn.SyncBatchNorm)
    assert issubclass(normkit.nn.SyncBatchNorm, torch.nn.modules.batchnorm._BatchNorm)
