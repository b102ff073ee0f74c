"""BatchNormAct1d/2d/3d: equal to ``act(normkit.BatchNorm(x) + residual)``, one fused backward, BN's state_dict."""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.nn.batchnorm_act import BatchNormAct1d, BatchNormAct2d, BatchNormAct3d

from helpers import assert_close, assert_unchanged, snapshot

ACTS = {
    "relu": torch.relu,
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    None: lambda t: t,
}
PAIRS = [(BatchNormAct1d, normkit.BatchNorm1d, (6, 3, 5)), (BatchNormAct2d, normkit.BatchNorm2d, (4, 3, 5, 5)),
         (BatchNormAct3d, normkit.BatchNorm3d, (2, 3, 3, 3, 3))]


def make_pair(fused_cls, plain_cls, act, dtype=torch.float32, **kw):
    fused = fused_cls(3, act=act, dtype=dtype, **kw)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        if fused.weight is not None:
            fused.weight.copy_(1 + 0.5 * torch.randn(3, generator=gen))
        if fused.bias is not None:
            fused.bias.copy_(0.5 * torch.randn(3, generator=gen))
        if fused.running_mean is not None:
            fused.running_mean.copy_(torch.randn(3, generator=gen))
            fused.running_var.copy_(0.5 + torch.rand(3, generator=gen))
    plain = plain_cls(3, dtype=dtype, **kw)
    plain.load_state_dict(fused.state_dict())
    return fused, plain


def run(fused, plain, act, x, residual):
    out = []
    for module, fn in ((fused, None), (plain, ACTS[act])):
        xi = x.detach().clone().requires_grad_()
        ri = None if residual is None else residual.detach().clone().requires_grad_()
        if fn is None:
            y = module(xi, ri)
        else:
            z = module(xi)
            y = fn(z + ri if ri is not None else z)
        upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
        y.backward(upstream)
        out.append({"y": y.detach(), "dx": xi.grad, "dr": None if ri is None else ri.grad,
                    "dw": None if module.weight is None else module.weight.grad,
                    "db": None if module.bias is None else module.bias.grad,
                    "running_mean": None if module.running_mean is None else module.running_mean.clone(),
                    "running_var": None if module.running_var is None else module.running_var.clone(),
                    "num_batches_tracked": module.num_batches_tracked, "strides": y.stride()})
    return out


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("fused_cls,plain_cls,shape", PAIRS, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "plain"])
def test_equals_bn_then_activation(act, fused_cls, plain_cls, shape, training, with_residual):
    fused, plain = make_pair(fused_cls, plain_cls, act)
    fused.train(training)
    plain.train(training)
    gen = torch.Generator().manual_seed(0)
    x = 2 * torch.randn(shape, generator=gen) + 1
    residual = torch.randn(shape, generator=gen) if with_residual else None
    mine, ref = run(fused, plain, act, x, residual)
    for key in mine:
        if key == "strides":
            assert mine[key] == ref[key]
        else:
            assert_close(mine[key], ref[key], what=key)


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_channels_last(act):
    fused, plain = make_pair(BatchNormAct2d, normkit.BatchNorm2d, act)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    residual = torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last)
    mine, ref = run(fused, plain, act, x, residual)
    assert mine["y"].is_contiguous(memory_format=torch.channels_last)
    for key in ("y", "dx", "dr", "dw", "db", "running_mean", "running_var"):
        assert_close(mine[key], ref[key], what=key)


@pytest.mark.parametrize("kw", [{"affine": False}, {"bias": False}, {"track_running_stats": False},
                                {"momentum": None}, {"running_var": "biased"}], ids=str)
def test_options_follow_batch_norm(kw):
    fused, plain = make_pair(BatchNormAct2d, normkit.BatchNorm2d, "silu", **kw)
    x = torch.randn(4, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    for _ in range(2):
        mine, ref = run(fused, plain, "silu", x, x.flip(0))
        for key in ("y", "dx", "dr", "dw", "db", "running_mean", "running_var", "num_batches_tracked"):
            assert_close(mine[key], ref[key], what=key)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_gradcheck_float64(act, training):
    layer = BatchNormAct2d(2, act=act, dtype=torch.float64).train(training)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        layer.weight.copy_(1 + torch.rand(2, generator=gen, dtype=torch.float64))
        layer.bias.copy_(torch.randn(2, generator=gen, dtype=torch.float64))
        layer.running_var.fill_(0.7)
    x = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 2, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = layer.weight.detach().clone().requires_grad_()
    b = layer.bias.detach().clone().requires_grad_()

    def fn(x, r, w, b):  # the layer's forward with the affine parameters as gradcheck inputs
        return torch.func.functional_call(layer, {"weight": w, "bias": b}, (x, r))

    assert torch.autograd.gradcheck(fn, (x, r, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, r, w, b))


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 3, 16, 16)], ids=["aten", "composition"])
@pytest.mark.usefixtures("composition_from_128_values")
def test_backward_saves_no_activation_sized_extras(shape):
    """torchvision's block: the residual is added and the ReLU applied in place, so the graph keeps only the input
    (for the norm's backward) and the output (for the ReLU's): no pre-activation copy, no saved residual."""
    layer = BatchNormAct2d(3)
    x = torch.randn(shape, requires_grad=True)
    r = torch.randn(shape, requires_grad=True)
    saved = []

    def keep(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        y = layer(x, r)
    big = {t.untyped_storage().data_ptr() for t in saved if t.numel() == x.numel()}
    assert big == {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    y.sum().backward()
    assert x.grad is not None and r.grad is not None


@pytest.mark.parametrize("fused_cls,plain_cls,shape", PAIRS, ids=["1d", "2d", "3d"])
def test_state_dict_identical_to_plain_bn(fused_cls, plain_cls, shape):
    fused, plain = fused_cls(3), plain_cls(3)
    assert isinstance(fused, plain_cls) and isinstance(fused, torch.nn.modules.batchnorm._BatchNorm)
    sd_fused, sd_plain = fused.state_dict(), plain.state_dict()
    assert list(sd_fused) == list(sd_plain)
    for key in sd_plain:
        assert sd_fused[key].dtype == sd_plain[key].dtype and torch.equal(sd_fused[key], sd_plain[key])
    torch_bn = getattr(torch.nn, plain_cls.__name__)(3)
    with torch.no_grad():
        torch_bn.weight.uniform_()
        torch_bn.running_mean.uniform_()
    fused.load_state_dict(torch_bn.state_dict())  # pretrained weights of a plain BN load strictly
    assert torch.equal(fused.weight, torch_bn.weight) and torch.equal(fused.running_mean, torch_bn.running_mean)
    assert "act='relu'" in repr(fused)


def test_bad_activation_name():
    with pytest.raises(ValueError, match=r"act must be one of 'relu', 'silu', 'gelu' or None, got 'tanh'"):
        BatchNormAct2d(3, act="tanh")


@pytest.mark.parametrize("residual", [torch.randn(4, 3, 5, 4), torch.randn(4, 3, 1, 1),
                                      torch.randn(4, 3, 5, 5, dtype=torch.float64)], ids=["shape", "bcast", "dtype"])
def test_residual_mismatch_raises_and_touches_nothing(residual):
    layer = BatchNormAct2d(3)
    layer(torch.randn(4, 3, 5, 5))
    before = snapshot(layer)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        layer(torch.randn(4, 3, 5, 5), residual)
    assert_unchanged(layer, before)
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        layer(torch.randn(4, 3, 5, 5), 1.0)
    assert_unchanged(layer, before)


def test_bad_input_touches_nothing():
    layer = BatchNormAct2d(3)
    before = snapshot(layer)
    with pytest.raises(RuntimeError):
        layer(torch.randn(4, 5, 5, 5))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        layer(torch.randn(1, 3, 1, 1))
    assert_unchanged(layer, before)


def test_empty_batch():
    layer = BatchNormAct2d(3)
    y = layer(torch.randn(0, 3, 2, 2), torch.randn(0, 3, 2, 2))
    assert y.shape == (0, 3, 2, 2)
