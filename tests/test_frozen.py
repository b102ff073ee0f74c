"""normkit.nn.FrozenBatchNorm*d: torchvision's equality check, state_dicts both ways, identity, no training mode."""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

import normkit
from normkit.nn import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d
from normkit.nn._torch_compat import build

from helpers import assert_close

RANKS = [
    (FrozenBatchNorm1d, torch.nn.BatchNorm1d, (4, 5)),
    (FrozenBatchNorm1d, torch.nn.BatchNorm1d, (4, 5, 7)),
    (FrozenBatchNorm2d, torch.nn.BatchNorm2d, (4, 5, 3, 6)),
    (FrozenBatchNorm3d, torch.nn.BatchNorm3d, (2, 5, 3, 2, 4)),
]
IDS = ["1d-2D", "1d-3D", "2d", "3d"]


def _random_bn(bn_class, eps=1e-5, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    bn = build(bn_class, 5, eps=eps, **kwargs)  # torch 2.11: bias= backported
    with torch.no_grad():
        if bn.weight is not None:
            bn.weight.copy_(torch.rand(5, generator=gen) + 0.5)
        if bn.bias is not None:
            bn.bias.copy_(torch.randn(5, generator=gen))
        bn.running_mean.copy_(torch.randn(5, generator=gen))
        bn.running_var.copy_(torch.rand(5, generator=gen) + 0.1)
        bn.num_batches_tracked.fill_(11)
    return bn.eval()


@pytest.mark.parametrize(("frozen_class", "bn_class", "shape"), RANKS, ids=IDS)
@pytest.mark.parametrize("eps", [None, 1e-3], ids=["default-eps", "eps=1e-3"])
def test_equals_batch_norm_eval_on_random_state(frozen_class, bn_class, shape, eps):
    # torchvision test/test_ops.py TestFrozenBNT: a random BN state_dict, with num_batches_tracked, loaded.
    kwargs = {} if eps is None else {"eps": eps}
    bn = _random_bn(bn_class, **kwargs)
    frozen = frozen_class(5, **kwargs)
    frozen.load_state_dict(bn.state_dict())  # strict: num_batches_tracked is accepted
    x = torch.randn(shape)
    torch.testing.assert_close(frozen(x), bn(x), rtol=1e-5, atol=1e-6)


def test_repr_is_torchvisions():
    assert repr(FrozenBatchNorm2d(5)) == "FrozenBatchNorm2d(5, eps=1e-05)"
    assert repr(FrozenBatchNorm1d(3, eps=1e-3)) == "FrozenBatchNorm1d(3, eps=0.001)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0])
def test_a_new_layer_is_exactly_the_identity(dtype, eps):
    frozen = FrozenBatchNorm2d(4, eps=eps, dtype=dtype)
    x = torch.randn(3, 4, 2, 5).to(dtype)
    assert torch.equal(frozen(x), x)


@pytest.mark.parametrize(("frozen_class", "bn_class", "shape"), RANKS[1:], ids=IDS[1:])
def test_state_dicts_load_both_ways_with_the_same_keys(frozen_class, bn_class, shape):
    bn = _random_bn(bn_class, seed=1)
    frozen = frozen_class(5)
    assert list(frozen.state_dict()) == list(bn.state_dict())
    frozen.load_state_dict(bn.state_dict())
    assert frozen.num_batches_tracked.item() == 11
    fresh = bn_class(5).eval()
    fresh.load_state_dict(frozen.state_dict())  # strict
    for (name, a), (_, b) in zip(fresh.state_dict().items(), bn.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    x = torch.randn(shape)
    assert_close(fresh(x), frozen(x))


def test_loads_torchvision_style_state_dict_without_num_batches_tracked():
    bn = _random_bn(torch.nn.BatchNorm2d)
    state = {k: v for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    frozen = FrozenBatchNorm2d(5)
    frozen.num_batches_tracked.fill_(4)
    frozen.load_state_dict(state)
    assert frozen.num_batches_tracked.item() == 4  # kept
    assert torch.equal(frozen.running_var, bn.running_var)


@pytest.mark.parametrize("kwargs", [{"affine": False}, {"bias": False}], ids=["affine=False", "bias=False"])
def test_loads_a_batch_norm_without_affine_as_gamma_1_beta_0(kwargs):
    bn = _random_bn(torch.nn.BatchNorm2d, **kwargs)
    frozen = FrozenBatchNorm2d(5)
    with torch.no_grad():
        frozen.weight.fill_(3)
        frozen.bias.fill_(3)
    frozen.load_state_dict(bn.state_dict())
    x = torch.randn(2, 5, 3, 3)
    assert_close(frozen(x), bn(x))


def test_a_state_dict_without_statistics_does_not_load():
    with pytest.raises(RuntimeError, match="running_mean"):
        FrozenBatchNorm2d(5).load_state_dict(torch.nn.BatchNorm2d(5, track_running_stats=False).state_dict())


def test_train_mode_and_optimizers_cannot_change_it():
    bn = _random_bn(torch.nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 5, 1), frozen).train()
    before = copy.deepcopy(frozen.state_dict())
    assert [n for n, _ in frozen.named_parameters()] == []
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    y = model(x)
    assert_close(y, bn(model[0](x)), what="train-mode output equals the batch norm's eval output")
    y.square().sum().backward()
    assert x.grad is not None and model[0].weight.grad is not None
    for name, value in frozen.state_dict().items():
        assert torch.equal(value, before[name]), name


@pytest.mark.parametrize(("frozen_class", "message", "bad"), [
    (FrozenBatchNorm1d, "expected 2D or 3D input (got 4D input)", (2, 5, 3, 3)),
    (FrozenBatchNorm2d, "expected 4D input (got 3D input)", (2, 5, 3)),
    (FrozenBatchNorm3d, "expected 5D input (got 4D input)", (2, 5, 3, 3)),
    (FrozenBatchNorm, "expected at least 2D input (got 1D input)", (5,)),
])
def test_input_dim_errors_use_torchs_wording(frozen_class, message, bad):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        frozen_class(5)(torch.randn(bad))


def test_torch_raises_the_same_dim_errors():
    for bn, bad in ((torch.nn.BatchNorm1d(5), (2, 5, 3, 3)), (torch.nn.BatchNorm2d(5), (2, 5, 3))):
        with pytest.raises(ValueError) as theirs:
            bn(torch.randn(bad))
        frozen = FrozenBatchNorm.from_batch_norm(bn)
        with pytest.raises(ValueError) as ours:
            frozen(torch.randn(bad))
        assert str(ours.value) == str(theirs.value)


def test_channel_and_dtype_errors():
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 5"):
        FrozenBatchNorm2d(5)(torch.randn(2, 4, 3, 3))
    with pytest.raises(TypeError, match="floating-point"):
        FrozenBatchNorm2d(5)(torch.ones(2, 5, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        FrozenBatchNorm2d(0)
    with pytest.raises(ValueError, match="eps must be a non-negative number"):
        FrozenBatchNorm2d(3, eps=-1.0)


def test_memory_format_and_low_precision_input():
    bn = _random_bn(torch.nn.BatchNorm2d)
    frozen = FrozenBatchNorm2d.from_batch_norm(bn)
    x = torch.randn(2, 5, 4, 4).contiguous(memory_format=torch.channels_last)
    y = frozen(x)
    assert y.is_contiguous(memory_format=torch.channels_last)
    for dtype in (torch.float16, torch.bfloat16):
        y = frozen(x.to(dtype))
        assert y.dtype == dtype
        assert_close(y.float(), bn(x.to(dtype).float()), atol=2e-2, rtol=1e-2, what=str(dtype))


def test_from_batch_norm_copies_and_picks_the_rank():
    bn = _random_bn(normkit.BatchNorm1d, momentum=None, running_var="biased")
    bn.train()
    frozen = FrozenBatchNorm.from_batch_norm(bn)
    assert type(frozen) is FrozenBatchNorm1d and frozen.training
    assert frozen.num_batches_tracked.item() == 11
    for name in ("weight", "bias", "running_mean", "running_var"):
        ours, theirs = getattr(frozen, name), getattr(bn, name)
        assert torch.equal(ours, theirs) and ours.data_ptr() != theirs.data_ptr(), name
        assert not ours.requires_grad, name
    config = frozen._unfrozen_config
    assert config["cls"] is normkit.BatchNorm1d and config["momentum"] is None
    assert config["options"] == {"running_var": "biased", "nonfinite": "skip"}
    assert type(FrozenBatchNorm.from_batch_norm(torch.nn.SyncBatchNorm(3))) is FrozenBatchNorm
    assert type(FrozenBatchNorm2d.from_batch_norm(torch.nn.SyncBatchNorm(3))) is FrozenBatchNorm2d


def test_from_batch_norm_refusals():
    with pytest.raises(ValueError, match="FrozenBatchNorm1d.from_batch_norm"):
        FrozenBatchNorm2d.from_batch_norm(torch.nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="track_running_stats=False"):
        FrozenBatchNorm2d.from_batch_norm(torch.nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.raises(TypeError, match="expects a batch norm"):
        FrozenBatchNorm2d.from_batch_norm(torch.nn.GroupNorm(1, 3))
    with pytest.raises(TypeError, match="forward pass first"):
        FrozenBatchNorm2d.from_batch_norm(torch.nn.LazyBatchNorm2d())


def test_a_directly_built_layer_unfreezes_to_normkit_defaults():
    bn = FrozenBatchNorm3d(4, eps=1e-3).to_batch_norm()
    assert type(bn) is normkit.BatchNorm3d
    assert (bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == (1e-3, 0.1, True, True)
    assert bn.weight.requires_grad and bn.bias.requires_grad
    assert type(FrozenBatchNorm(4).to_batch_norm()) is normkit.SyncBatchNorm


def test_pickle_deepcopy_and_to():
    frozen = FrozenBatchNorm2d.from_batch_norm(_random_bn(torch.nn.BatchNorm2d))
    x = torch.randn(2, 5, 3, 3)
    for twin in (copy.deepcopy(frozen), pickle.loads(pickle.dumps(frozen))):
        assert torch.equal(twin(x), frozen(x))
        assert twin._unfrozen_config["cls"] is torch.nn.BatchNorm2d
    buffer = io.BytesIO()
    torch.save(frozen.state_dict(), buffer)
    buffer.seek(0)
    fresh = FrozenBatchNorm2d(5)
    fresh.load_state_dict(torch.load(buffer))
    assert torch.equal(fresh(x), frozen(x))
    double = frozen.double()
    assert double.running_var.dtype == torch.float64 and double.num_batches_tracked.dtype == torch.long


def test_exports_with_standard_ops():
    frozen = FrozenBatchNorm2d.from_batch_norm(_random_bn(torch.nn.BatchNorm2d)).eval()
    x = torch.randn(2, 5, 3, 3)
    program = torch.export.export(frozen, (x,))
    assert torch.equal(program.module()(x), frozen(x))
