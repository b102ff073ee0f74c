"""Drop-in GroupNorm / LayerNorm / InstanceNorm1d/2d/3d: parity with torch, gradients, identities, errors."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from normkit.functional.group_norm import group_norm
from normkit.functional.instance_norm import instance_norm
from normkit.functional.layer_norm import layer_norm
from normkit.nn._torch_compat import with_bias
from normkit.nn.instancenorm import InstanceNorm1d, InstanceNorm2d, InstanceNorm3d
from normkit.nn.normalization import GroupNorm, LayerNorm

BACKENDS = ("cpu", "reference")
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _x(shape, dtype=torch.float32, fmt=None, seed=0, scale=2.0, shift=1.0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)
    return x.contiguous(memory_format=fmt) if fmt is not None else x


def _affine(shape, dtype=torch.float32, seed=1):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.rand(shape, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    b = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return w, b


def _grads(fn, x, params, upstream):
    xi = x.detach().clone().requires_grad_()
    ps = [p.detach().clone().requires_grad_() if p is not None else None for p in params]
    y = fn(xi, *ps)
    grads = torch.autograd.grad(y, [xi] + [p for p in ps if p is not None], upstream)
    return y.detach(), grads


def _assert_close(a, b, dtype):
    torch.testing.assert_close(a.double(), b.double(), **TOL[dtype])


# ---------------------------------------------------------------- parity: outputs and gradients

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,groups,fmt", [
    ((4, 8, 5, 6), 4, None),
    ((4, 8, 5, 6), 4, torch.channels_last),
    ((3, 12, 7), 3, None),
    ((2, 6, 3, 4, 5), 2, torch.channels_last_3d),
    ((5, 6), 3, None),
])
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_parity(backend, shape, groups, fmt, affine):
    x = _x(shape, fmt=fmt)
    w, b = _affine(shape[1]) if affine else (None, None)
    up = _x(shape, seed=3, fmt=fmt, shift=0.0)
    y, g = _grads(lambda t, *p: group_norm(t, groups, *p, backend=backend), x, [w, b], up)
    yt, gt = _grads(lambda t, *p: F.group_norm(t, groups, *p), x, [w, b], up)
    _assert_close(y, yt, torch.float32)
    for a, e in zip(g, gt, strict=True):
        _assert_close(a, e, torch.float32)
    if fmt is not None:  # channels_last stays channels_last, forward and backward
        assert y.is_contiguous(memory_format=fmt) and not y.is_contiguous()
        assert g[0].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,normalized", [((16, 32), (32,)), ((4, 7, 24), (24,)), ((3, 5, 4, 6), (4, 6))])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_parity(backend, shape, normalized, affine):
    x = _x(shape)
    w, b = _affine(normalized) if affine else (None, None)
    up = _x(shape, seed=3, shift=0.0)
    y, g = _grads(lambda t, *p: layer_norm(t, normalized, *p, backend=backend), x, [w, b], up)
    yt, gt = _grads(lambda t, *p: F.layer_norm(t, normalized, *p), x, [w, b], up)
    _assert_close(y, yt, torch.float32)
    for a, e in zip(g, gt, strict=True):
        _assert_close(a, e, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape,fmt", [((4, 3, 9), None), ((3, 4, 5, 6), None), ((3, 4, 5, 6), torch.channels_last),
                                       ((2, 3, 3, 4, 5), None)])
@pytest.mark.parametrize("affine", [True, False])
def test_instance_norm_parity_with_running_stats(backend, shape, fmt, affine):
    x = _x(shape, fmt=fmt, shift=3.0)
    c = shape[1]
    w, b = _affine(c) if affine else (None, None)
    up = _x(shape, seed=3, fmt=fmt, shift=0.0)
    rm, rv = torch.randn(c), torch.rand(c) + 0.5
    rm_t, rv_t = rm.clone(), rv.clone()
    y, g = _grads(lambda t, *p: instance_norm(t, rm, rv, *p, momentum=0.3, backend=backend), x, [w, b], up)
    yt, gt = _grads(lambda t, *p: F.instance_norm(t, rm_t, rv_t, *p, momentum=0.3), x, [w, b], up)
    _assert_close(y, yt, torch.float32)
    for a, e in zip(g, gt, strict=True):
        _assert_close(a, e, torch.float32)
    _assert_close(rm, rm_t, torch.float32)
    _assert_close(rv, rv_t, torch.float32)
    assert y.stride() == yt.stride()  # torch's instance norm returns a contiguous output whatever the input's format
    # evaluation with the running statistics (use_input_stats=False): output and gradients
    y, g = _grads(lambda t, *p: instance_norm(t, rm, rv, *p, use_input_stats=False, backend=backend), x, [w, b], up)
    yt, gt = _grads(lambda t, *p: F.instance_norm(t, rm_t, rv_t, *p, use_input_stats=False), x, [w, b], up)
    _assert_close(y, yt, torch.float32)
    for a, e in zip(g, gt, strict=True):
        _assert_close(a, e, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("param_dtype", ["same", "float32"])
def test_low_precision_inputs(backend, dtype, param_dtype):
    """Half/bf16 inputs (with params of their dtype, or float32 as under CPU mixed precision) match float64 math."""
    pdt = dtype if param_dtype == "same" else torch.float32
    x = _x((4, 8, 6, 6), dtype=dtype, shift=50.0)  # a large mean: statistics must not cancel catastrophically
    w, b = _affine(8, dtype=pdt)
    ref = F.group_norm(x.double(), 4, w.double(), b.double())
    y = group_norm(x, 4, w, b, backend=backend)
    assert y.dtype == dtype
    _assert_close(y, ref, dtype)
    wl, bl = _affine((6,), dtype=pdt)
    _assert_close(layer_norm(x, 6, wl, bl, backend=backend), F.layer_norm(x.double(), (6,), wl.double(),
                                                                          bl.double()), dtype)
    _assert_close(instance_norm(x, weight=w, bias=b, backend=backend),
                  F.instance_norm(x.double(), weight=w.double(), bias=b.double()), dtype)
    rm, rv, rm64, rv64 = torch.zeros(8), torch.ones(8), torch.zeros(8, dtype=torch.float64), torch.ones(8).double()
    instance_norm(x, rm, rv, backend=backend)
    F.instance_norm(x.double(), rm64, rv64)
    torch.testing.assert_close(rm.double(), rm64, rtol=1e-5, atol=1e-5)  # statistics in float32, not in `dtype`
    torch.testing.assert_close(rv.double(), rv64, rtol=1e-4, atol=1e-5)
    xi = x.detach().requires_grad_()
    group_norm(xi, 4, w, b, backend=backend).sum().backward()
    assert xi.grad.dtype == dtype and torch.isfinite(xi.grad.float()).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_mean_statistics_are_stable(backend):
    """A mean of 1e4 with unit spread: E[x^2] - E[x]^2 in float32 would lose the variance entirely."""
    x = _x((2, 4, 64), shift=1e4, scale=1.0)
    ref = F.group_norm(x.double(), 2).float()
    torch.testing.assert_close(group_norm(x, 2, backend=backend), ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(layer_norm(x, 64, backend=backend), F.layer_norm(x.double(), (64,)).float(),
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_backend_on_channels_last(backend, dtype):
    """Every backend gives torch's values and gradients (against float64) on a channels_last input."""
    x = _x((3, 8, 4, 5), dtype=dtype, fmt=torch.channels_last)
    w, b = _affine(8, dtype=dtype)
    up = _x((3, 8, 4, 5), dtype=dtype, seed=3, shift=0.0)
    wl, bl = _affine((5,), dtype=dtype)
    cases = [
        (lambda t, *p: group_norm(t, 2, *p, backend=backend), lambda t, *p: F.group_norm(t, 2, *p), [w, b]),
        (lambda t, *p: instance_norm(t, None, None, *p, backend=backend),
         lambda t, *p: F.instance_norm(t, None, None, *p), [w, b]),
        (lambda t, *p: layer_norm(t, 5, *p, backend=backend), lambda t, *p: F.layer_norm(t, (5,), *p), [wl, bl]),
    ]
    for ours, theirs, params in cases:
        y, g = _grads(ours, x, params, up)
        yt, gt = _grads(theirs, x.double(), [p.double() for p in params], up.double())
        _assert_close(y, yt, dtype)
        if dtype == torch.bfloat16 and backend == "cpu":
            # ATen's bf16 parameter gradients are only ~5% accurate against float64 (torch's own are the same):
            # there the reference is torch's result in the same dtype
            gt = gt[:1] + _grads(theirs, x, params, up)[1][1:]
        for a, e in zip(g, gt, strict=True):
            assert a.dtype == dtype
            _assert_close(a, e, dtype)


# ---------------------------------------------------------------- float64 gradcheck / gradgradcheck

@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_gradgradcheck(backend):
    d = dict(dtype=torch.float64, requires_grad=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    w, b = torch.rand(6, **d), torch.randn(6, **d)
    cases = [
        (lambda x, w, b: group_norm(x, 3, w, b, backend=backend), (x, w, b)),
        (lambda x, w, b: instance_norm(x, None, None, w, b, backend=backend), (x, w, b)),
        (lambda x, w, b: instance_norm(x, torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64),
                                       w, b, use_input_stats=False, backend=backend), (x, w, b)),
        (lambda x, w, b: layer_norm(x, (3, 4), w, b, backend=backend),
         (x, torch.rand(3, 4, **d), torch.randn(3, 4, **d))),
        (lambda x: layer_norm(x, 4, backend=backend), (x,)),
    ]
    for fn, inputs in cases:
        assert torch.autograd.gradcheck(fn, inputs)
        assert torch.autograd.gradgradcheck(fn, inputs)


# ---------------------------------------------------------------- identities

def test_group_norm_one_group_is_layer_norm_over_chw():
    x = _x((3, 6, 4, 5))
    gn, ln = GroupNorm(1, 6), LayerNorm((6, 4, 5))
    w, b = _affine(6)
    with torch.no_grad():
        gn.weight.copy_(w)
        gn.bias.copy_(b)
        ln.weight.copy_(w[:, None, None].expand(6, 4, 5))
        ln.bias.copy_(b[:, None, None].expand(6, 4, 5))
    torch.testing.assert_close(gn(x), ln(x), rtol=1e-5, atol=1e-5)


def test_group_norm_c_groups_is_instance_norm():
    x = _x((3, 6, 4, 5), fmt=torch.channels_last)
    gn, inorm = GroupNorm(6, 6), InstanceNorm2d(6, affine=True)
    w, b = _affine(6)
    with torch.no_grad():
        for m in (gn, inorm):
            m.weight.copy_(w)
            m.bias.copy_(b)
    torch.testing.assert_close(gn(x), inorm(x), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- modules: drop-in behaviour

MODULES = [
    (GroupNorm, torch.nn.GroupNorm, (4, 8), {}, (2, 8, 3, 3)),
    (GroupNorm, torch.nn.GroupNorm, (2, 4, 1e-3, False), {}, (2, 4, 5)),
    (GroupNorm, torch.nn.GroupNorm, (2, 4), {"bias": False}, (2, 4, 5)),
    (LayerNorm, torch.nn.LayerNorm, ((5, 6),), {}, (3, 5, 6)),
    (LayerNorm, torch.nn.LayerNorm, (6, 1e-6, True, False), {}, (3, 6)),
    (LayerNorm, torch.nn.LayerNorm, (6,), {"elementwise_affine": False}, (3, 6)),
    (InstanceNorm1d, torch.nn.InstanceNorm1d, (3,), {}, (2, 3, 7)),
    (InstanceNorm1d, torch.nn.InstanceNorm1d, (3, 1e-5, 0.2, True, True), {}, (2, 3, 7)),
    (InstanceNorm2d, torch.nn.InstanceNorm2d, (3,), {"affine": True, "track_running_stats": True}, (2, 3, 4, 5)),
    (InstanceNorm2d, torch.nn.InstanceNorm2d, (3,), {"track_running_stats": True, "momentum": None}, (2, 3, 4, 5)),
    (InstanceNorm3d, torch.nn.InstanceNorm3d, (3,), {"affine": True, "bias": False}, (2, 3, 2, 3, 4)),
]


@pytest.mark.parametrize("ours_cls,torch_cls,args,kwargs,shape", MODULES)
def test_module_matches_torch(ours_cls, torch_cls, args, kwargs, shape):
    ours, theirs = ours_cls(*args, **kwargs), with_bias(torch_cls)(*args, **kwargs)  # torch 2.11: bias= backported
    assert isinstance(ours, torch_cls)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b), k
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(torch.rand_like(p) + 0.5)
    theirs.load_state_dict(ours.state_dict())
    for train in (True, True, False):
        ours.train(train)
        theirs.train(train)
        x = _x(shape, seed=int(train) + 5, shift=2.0)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=k)
    clone = pickle.loads(pickle.dumps(ours))
    assert type(clone) is ours_cls and repr(clone) == repr(ours)
    torch.testing.assert_close(clone(x), ours(x))


def test_instance_norm_running_stats_semantics():
    """torch's rule: running = mean over N of the per-instance updates; num_batches_tracked is not incremented."""
    m = InstanceNorm2d(3, track_running_stats=True, momentum=0.5)
    x = _x((4, 3, 5, 5), shift=2.0)
    m(x)
    assert int(m.num_batches_tracked) == 0
    per = x.double()
    mean_nc = per.mean((2, 3))
    var_nc = per.var((2, 3), unbiased=True)
    torch.testing.assert_close(m.running_mean, (0.5 * 0 + 0.5 * mean_nc.mean(0)).float())
    torch.testing.assert_close(m.running_var, (0.5 * 1 + 0.5 * var_nc.mean(0)).float())
    m.eval()  # eval normalizes with the running statistics
    expected = (x - m.running_mean[:, None, None]) / torch.sqrt(m.running_var[:, None, None] + m.eps)
    torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)


def test_instance_norm_unbatched_input():
    ours, theirs = InstanceNorm1d(3, track_running_stats=True), torch.nn.InstanceNorm1d(3, track_running_stats=True)
    x = _x((3, 9))
    torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    assert ours(x).shape == (3, 9)


def test_instance_norm_channel_count_warning_and_error():
    x = _x((2, 4, 6))
    with pytest.warns(UserWarning, match="input's size at dim=1 does not match num_features"):
        InstanceNorm1d(3)(x)
    m = InstanceNorm1d(3, affine=True, track_running_stats=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="expected input's size at dim=1 to match num_features"):
        m(x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


# ---------------------------------------------------------------- bad input: clear errors, nothing touched

def test_group_norm_bad_groups():
    with pytest.raises(ValueError, match=r"num_channels \(6\) must be divisible by num_groups \(4\)"):
        GroupNorm(4, 6)
    with pytest.raises(RuntimeError, match="Expected number of channels in input to be divisible by num_groups"):
        group_norm(_x((2, 6, 3)), 4)
    with pytest.raises(RuntimeError, match="Expected number of channels in input to be divisible by num_groups"):
        F.group_norm(_x((2, 6, 3)), 4)  # the wording is torch's
    with pytest.raises(ValueError, match="positive int"):
        group_norm(_x((2, 6, 3)), 0)


def test_group_norm_wrong_channels_touches_nothing():
    m = GroupNorm(2, 4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(RuntimeError, match="Expected weight to be a vector of size equal to the number of channels"):
        m(_x((2, 6, 3)))
    with pytest.raises(RuntimeError, match="Expected at least 2 dimensions for input tensor but received 1"):
        m(_x((4,)))
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_layer_norm_wrong_normalized_shape():
    m = LayerNorm(8)
    with pytest.raises(RuntimeError, match=r"Given normalized_shape=\[8\], expected input with shape \[\*, 8\], "
                                           r"but got input of size\[2, 6\]"):
        m(_x((2, 6)))
    with pytest.raises(RuntimeError, match="Given normalized_shape"):
        F.layer_norm(_x((2, 6)), (8,))  # torch's wording
    with pytest.raises(RuntimeError, match="Expected weight to be of same shape as normalized_shape"):
        layer_norm(_x((2, 6)), 6, torch.ones(5))
    with pytest.raises(RuntimeError, match="at least 1-dimensional"):
        layer_norm(_x((2, 6)), ())


def test_instance_norm_bad_inputs_touch_nothing():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        instance_norm(_x((2, 3, 1)), rm, rv)
    with pytest.raises(RuntimeError, match="expected weight to have 3 elements"):
        instance_norm(_x((2, 3, 4)), rm, rv, torch.ones(4))
    with pytest.raises(RuntimeError, match="use_input_stats is false"):
        instance_norm(_x((2, 3, 4)), use_input_stats=False)
    with pytest.raises(TypeError, match="momentum"):  # torch takes any number (2.0 extrapolates), not a string
        instance_norm(_x((2, 3, 4)), rm, rv, momentum="0.1")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        instance_norm(torch.ones(2, 3, 4, dtype=torch.int64))


def test_no_warnings_on_ordinary_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GroupNorm(2, 4)(_x((2, 4, 3)))
        LayerNorm(3)(_x((2, 4, 3)))
        InstanceNorm2d(4)(_x((2, 4, 3, 3)))
