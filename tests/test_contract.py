"""Generic contract tests, driven by the registry: every normkit module behaves like its torch twin."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from helpers import assert_close, assert_same_results, run_pair, snapshot
from registry import MODULES


@pytest.mark.parametrize("case", MODULES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_torch(case, train):
    ours, theirs = case.build_pair()
    ours.train(train)
    theirs.train(train)
    for step, shape in enumerate(case.inputs * 2):  # twice: the second pass sees updated running statistics
        x = case.sample(shape, seed=step)
        mine, ref = run_pair(ours, theirs, x, grad_seed=step)
        assert_same_results(mine, ref)
        assert mine["y"].stride() == ref["y"].stride(), "memory format differs from torch's"


@pytest.mark.parametrize("case", MODULES, ids=str)
def test_is_a_torch_module_with_torch_repr_and_state_dict(case):
    ours, theirs = case.build_pair()
    assert isinstance(ours, case.reference)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert ours.state_dict()._metadata[""]["version"] == theirs.state_dict()._metadata[""]["version"] == 2
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]


@pytest.mark.parametrize("case", MODULES, ids=str)
def test_state_dict_round_trips_both_ways(case):
    ours, theirs = case.build_pair(seed=3)
    fresh_ours, fresh_theirs = case.build_pair(seed=4)
    fresh_ours.load_state_dict(theirs.state_dict())
    fresh_theirs.load_state_dict(ours.state_dict())
    for a, b in ((fresh_ours, theirs), (fresh_theirs, ours)):
        for (name, va), (_, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(va, vb), name


@pytest.mark.parametrize("case", [c for c in MODULES if c.kwargs == {}], ids=str)
def test_old_checkpoint_without_num_batches_tracked(case):
    ours, theirs = case.build_pair()
    ours.num_batches_tracked.fill_(7)
    theirs.num_batches_tracked.fill_(7)
    old = theirs.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    ours.load_state_dict(old)
    theirs.load_state_dict(old)
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 7


@pytest.mark.parametrize("case", MODULES[::3], ids=str)
def test_pickle_and_deepcopy(case):
    ours, _ = case.build_pair()
    ours.train()
    x = case.sample(case.inputs[0])
    for clone in (pickle.loads(pickle.dumps(ours)), copy.deepcopy(ours)):
        assert type(clone) is type(ours)
        assert_close(clone(x), ours(x.clone()), what="output")
        assert (clone.running_var_mode, clone.nonfinite) == (ours.running_var_mode, ours.nonfinite)
    buffer = io.BytesIO()
    torch.save(ours, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert repr(loaded) == repr(ours)


@pytest.mark.parametrize("case", [c for c in MODULES if c.kwargs == {}], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_low_precision_input_keeps_float32_statistics(case, dtype, train):
    ours, theirs = case.build_pair()
    ours.train(train)
    theirs.train(train)
    x = case.sample(case.inputs[0], dtype=dtype)
    mine, ref = run_pair(ours, theirs, x)
    assert mine["y"].dtype == dtype
    assert ours.running_mean.dtype == ours.running_var.dtype == torch.float32
    tolerance = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert_same_results(mine, ref, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("case", [c for c in MODULES if c.kwargs in ({}, {"affine": False})], ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_float64_module(case, train):
    ours, theirs = case.build_pair()
    ours.double().train(train)
    theirs.double().train(train)
    x = case.sample(case.inputs[0], dtype=torch.float64)
    mine, ref = run_pair(ours, theirs, x)
    assert mine["y"].dtype == torch.float64
    assert_same_results(mine, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("case", MODULES[::6], ids=str)
def test_flipping_track_running_stats_at_runtime(case):
    ours, theirs = case.build_pair()
    for module in (ours, theirs):
        module.track_running_stats = False
    x = case.sample(case.inputs[0])
    before = snapshot(ours)
    assert_same_results(*run_pair(ours.train(), theirs.train(), x))
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert_same_results(*run_pair(ours.eval(), theirs.eval(), x))


@pytest.mark.parametrize("case", MODULES[::6], ids=str)
def test_empty_batch_like_torch(case):
    ours, theirs = case.build_pair()
    shape = (0, *case.inputs[0][1:])
    x = case.sample(shape)
    before = snapshot(ours)
    y_ours, y_theirs = ours(x), theirs(x)
    assert y_ours.shape == y_theirs.shape == x.shape
    assert torch.equal(ours.running_mean, before["running_mean"])
    assert ours.num_batches_tracked.item() == theirs.num_batches_tracked.item() == 1


# torch 2.13's dynamo instantiates autograd.Function internally and trips torch's own deprecation warning.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:.*torch.jit.script_method. is deprecated:DeprecationWarning")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_of_a_model_using_it(backend):
    import normkit

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), normkit.BatchNorm2d(8), torch.nn.ReLU())
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 3, 8, 8)
    y = compiled(x)
    y.sum().backward()
    y_twin = twin(x)
    y_twin.sum().backward()
    assert_close(y, y_twin, what="compiled output")
    assert_close(model[1].running_var, twin[1].running_var, what="running_var")
    assert_close(model[0].weight.grad, twin[0].weight.grad, atol=1e-4, rtol=1e-4, what="conv grad")
    assert not torch._dynamo.utils.counters["graph_break"], "normkit's forward breaks the graph"
