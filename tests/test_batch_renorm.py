"""BatchRenorm1d/2d/3d and functional batch_renorm: the Ioffe 2017 rule, the schedule, Keras 3 parity, errors."""

from __future__ import annotations

import math
import os

import pytest
import torch

import normkit
from normkit.functional.batch_renorm import batch_renorm, batch_renorm_keras
from normkit.nn.batch_renorm import BatchRenorm1d, BatchRenorm2d, BatchRenorm3d, renorm_bounds

from helpers import assert_close, assert_same_results, assert_unchanged, run_pair, snapshot

PAIRS = [(BatchRenorm1d, normkit.BatchNorm1d, (8, 3)), (BatchRenorm2d, normkit.BatchNorm2d, (4, 3, 5, 5)),
         (BatchRenorm3d, normkit.BatchNorm3d, (2, 3, 3, 3, 3))]


def shifted_batch(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    view = [1, c] + [1] * (len(shape) - 2)
    return (torch.randn(shape, generator=gen, dtype=dtype) * (0.5 + 2 * torch.rand(c, generator=gen, dtype=dtype)
                                                               ).view(view)
            + 3 * torch.randn(c, generator=gen, dtype=dtype).view(view))


def closed_form(x, running_mean, running_var, weight, bias, eps, rmax, dmax):
    """The paper's training output, written out in float64."""
    dims = [d for d in range(x.dim()) if d != 1]
    view = [1, -1] + [1] * (x.dim() - 2)
    x = x.double()
    mu, var = x.mean(dims), x.var(dims, unbiased=False)
    sigma_b, sigma = torch.sqrt(var + eps), torch.sqrt(running_var.double() + eps)
    r = (sigma_b / sigma).clamp(1 / rmax, rmax)
    d = ((mu - running_mean.double()) / sigma).clamp(-dmax, dmax)
    y = ((x - mu.view(view)) / sigma_b.view(view) * r.view(view) + d.view(view))
    return y * weight.double().view(view) + bias.double().view(view), r, d


@pytest.mark.parametrize("cls,plain,shape", PAIRS, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("kw", [{}, {"momentum": None}, {"running_var": "biased"}, {"affine": False},
                                {"track_running_stats": False}], ids=str)
def test_rmax1_dmax0_is_exactly_batch_norm(cls, plain, shape, kw):
    ours = cls(3, rmax=1.0, dmax=0.0, warmup_steps=0, **kw)
    ref = plain(3, **kw)
    for step in range(3):
        x = shifted_batch(shape, seed=step)
        mine, theirs = run_pair(ours, ref, x)
        assert_same_results(mine, theirs, atol=1e-5, rtol=1e-5)
    ours.eval()
    ref.eval()
    mine, theirs = run_pair(ours, ref, shifted_batch(shape, seed=9))
    assert_same_results(mine, theirs)


def test_warmup_is_batch_norm_then_renorm_kicks_in():
    ours = BatchRenorm2d(3, warmup_steps=2, rmax_ramp_end=4, dmax_ramp_end=4)
    ref = normkit.BatchNorm2d(3)
    for step in range(2):  # steps 0 and 1: r = 1, d = 0
        mine, theirs = run_pair(ours, ref, shifted_batch((4, 3, 3, 3), seed=step))
        assert_same_results(mine, theirs)
    assert ours.current_bounds() == (1.0, 0.0)
    ours.num_batches_tracked.fill_(3)
    assert ours.current_bounds() == (2.0, 2.5)
    rm, rv = ours.running_mean.clone(), ours.running_var.clone()
    x = shifted_batch((4, 3, 3, 3), seed=7)
    y = ours(x)
    expected, r, d = closed_form(x, rm, rv, ours.weight, ours.bias, ours.eps, 2.0, 2.5)
    assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(d, torch.zeros_like(d))  # the correction is really active
    assert int(ours.num_batches_tracked) == 4 and ours.current_bounds() == (3.0, 5.0)


def test_schedule_of_the_paper():
    bounds = [renorm_bounds(t, 3.0, 5.0, 5000, 40000, 25000) for t in (0, 4999, 5000, 15000, 22500, 25000, 40000,
                                                                        10**6)]
    rmax = [b[0] for b in bounds]
    dmax = [b[1] for b in bounds]
    assert rmax == pytest.approx([1, 1, 1, 1 + 2 * 10 / 35, 2, 1 + 2 * 20 / 35, 3, 3])
    assert dmax == pytest.approx([0, 0, 0, 2.5, 4.375, 5, 5, 5])
    assert renorm_bounds(0, 3.0, 5.0, 0, 40000, 25000) == (3.0, 5.0)  # no warm-up: final bounds at once
    layer = BatchRenorm2d(3)
    assert (layer.warmup_steps, layer.rmax_ramp_end, layer.dmax_ramp_end) == (5000, 40000, 25000)
    assert layer.current_bounds() == (1.0, 0.0)


@pytest.mark.parametrize("rmax,dmax", [(1.5, 0.5), (3.0, 5.0), (math.inf, math.inf)])
def test_training_output_matches_closed_form(rmax, dmax):
    layer = BatchRenorm2d(3, rmax=rmax, dmax=dmax, warmup_steps=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        layer.weight.copy_(1 + torch.rand(3, generator=gen))
        layer.bias.copy_(torch.randn(3, generator=gen))
    for step in range(3):
        x = shifted_batch((4, 3, 3, 3), seed=step)
        rm, rv = layer.running_mean.clone(), layer.running_var.clone()
        y = layer(x)
        expected, r, d = closed_form(x, rm, rv, layer.weight.detach(), layer.bias.detach(), layer.eps, rmax, dmax)
        assert_close(y.double(), expected, atol=1e-5, rtol=1e-5, what=f"step {step}")
        if rmax == 1.5:
            assert (r == rmax).any() or (r == 1 / rmax).any() or (d.abs() == dmax).any()  # clipping is exercised
        bn = normkit.BatchNorm2d(3)
        bn.running_mean.copy_(rm)
        bn.running_var.copy_(rv)
        bn(x)
        assert_close(layer.running_mean, bn.running_mean, what="running_mean")  # BN's update
        assert_close(layer.running_var, bn.running_var, what="running_var")
    layer.eval()
    ref = normkit.BatchNorm2d(3).eval()
    ref.load_state_dict(layer.state_dict())
    x = shifted_batch((4, 3, 3, 3), seed=11)
    assert_close(layer(x), ref(x), what="eval is batch norm")


def test_unclipped_with_running_stats_equal_to_batch_gives_running_normalization():
    """r, d unclipped: the training output is (x - running_mean) / sqrt(running_var + eps) (variants.md R1)."""
    x = shifted_batch((6, 3), seed=4)
    rm, rv = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([2.0, 0.3, 1.5])
    y = batch_renorm(x, rm.clone(), rv.clone(), training=True, rmax=math.inf, dmax=math.inf)
    assert_close(y, (x - rm) / torch.sqrt(rv + 1e-5), atol=1e-5)


def test_r_and_d_are_stop_gradient():
    """Gradients equal batch norm's with the effective affine (r * gamma, d * gamma + beta) held constant."""
    x = shifted_batch((4, 3, 3, 3), seed=2, dtype=torch.float64).requires_grad_()
    rm, rv = torch.randn(3, dtype=torch.float64), 0.5 + torch.rand(3, dtype=torch.float64)
    w = (1 + torch.rand(3, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    y = batch_renorm(x, rm.clone(), rv.clone(), w, b, training=True, eps=1e-5, rmax=math.inf, dmax=math.inf)
    _, r, d = closed_form(x.detach(), rm, rv, torch.ones(3), torch.zeros(3), 1e-5, math.inf, math.inf)
    x2 = x.detach().clone().requires_grad_()
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    y2 = torch.nn.functional.batch_norm(x2, None, None, None, None, True, 0.1, 1e-5)
    view = [1, -1, 1, 1]
    y2 = (y2 * r.view(view) + d.view(view)) * w2.view(view) + b2.view(view)
    g = torch.randn_like(y)
    y.backward(g)
    y2.backward(g)
    for a, e in ((y, y2), (x.grad, x2.grad), (w.grad, w2.grad), (b.grad, b2.grad)):
        assert_close(a.detach(), e.detach(), atol=1e-10, rtol=1e-10)


def test_gradcheck_float64():
    x = shifted_batch((4, 2, 2, 2), seed=3, dtype=torch.float64).requires_grad_()
    w = torch.rand(2, dtype=torch.float64).add(0.5).requires_grad_()
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)

    # r and d are stop-gradient, so numerical and analytical gradients agree only where they are locally constant:
    # this batch (means ~3 away from 0, spreads far from 1) has every r and d at its clipping bound
    def f(x, w, b):  # fresh running stats each call
        return batch_renorm(x, rm.clone(), rv.clone(), w, b, training=True, rmax=1.5, dmax=0.5)

    assert torch.autograd.gradcheck(f, (x, w, b))
    assert torch.autograd.gradgradcheck(f, (x, w, b))


def test_channels_last_and_dtypes():
    layer = BatchRenorm2d(3, warmup_steps=0)
    x = shifted_batch((4, 3, 5, 5), seed=1)
    ref = BatchRenorm2d(3, warmup_steps=0)
    y = layer(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, ref(x))
    assert_close(layer.running_var, ref.running_var)
    half = BatchRenorm2d(3, warmup_steps=0)
    assert half(x.bfloat16()).dtype == torch.bfloat16


def test_state_dict_is_batch_norms():
    layer, plain = BatchRenorm2d(3), torch.nn.BatchNorm2d(3)
    assert isinstance(layer, normkit.BatchNorm2d)
    assert list(layer.state_dict()) == list(plain.state_dict())
    layer.load_state_dict(plain.state_dict())
    assert "rmax=3.0" in repr(layer)


@pytest.mark.parametrize("kw,match", [
    ({"rmax": 0.5}, "rmax must be a number >= 1"),
    ({"dmax": -1.0}, "dmax must be a number >= 0"),
    ({"warmup_steps": -1}, "warmup_steps must be a non-negative int"),
    ({"rmax_ramp_end": 1.5}, "rmax_ramp_end must be a non-negative int"),
    ({"keras_compatible": True, "momentum": None}, "keras_compatible=True needs a float momentum"),
    ({"renorm_momentum": 2.0}, "renorm_momentum must be None or a number in"),
])
def test_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        BatchRenorm2d(3, **kw)


def test_bad_functional_bounds_and_input_touch_nothing():
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="rmax must be a number >= 1"):
        batch_renorm(torch.randn(4, 3), rm, rv, training=True, rmax=0.9)
    with pytest.raises(ValueError, match="dmax must be a number >= 0"):
        batch_renorm(torch.randn(4, 3), rm, rv, training=True, dmax=-0.1)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))
    for keras_compatible in (False, True):
        layer = BatchRenorm2d(3, keras_compatible=keras_compatible, warmup_steps=0)
        layer(torch.randn(4, 3, 2, 2))
        before = snapshot(layer)
        with pytest.raises(RuntimeError):
            layer(torch.randn(4, 5, 2, 2))
        with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
            layer(torch.randn(1, 3, 1, 1))
        assert_unchanged(layer, before)


def test_keras_first_step_numbers_without_keras():
    """semantics.md item 23: Keras defaults, clipping (1/3, 3, 5), x = [1, 2, 3, 4]."""
    layer = BatchRenorm1d(1, eps=1e-3, momentum=0.01, warmup_steps=0, keras_compatible=True)
    y = layer(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
    assert_close(y.flatten(), torch.tensor([1.0, 2.0, 3.0, 4.0]), atol=1e-6, rtol=0)
    assert_close(layer.moving_stddev, torch.tensor([1.0011848]), atol=1e-6, rtol=0)
    assert_close(layer.renorm_stddev, torch.tensor([1.0011848]), atol=1e-6, rtol=0)
    assert_close(layer.running_var, torch.tensor([1.001371]), atol=1e-6, rtol=0)
    assert_close(layer.running_mean, torch.tensor([0.025]), atol=1e-7, rtol=0)
    assert list(layer.state_dict())[-3:] == ["moving_stddev", "renorm_mean", "renorm_stddev"]
    layer.reset_running_stats()
    assert torch.equal(layer.moving_stddev, torch.ones(1)) and torch.equal(layer.renorm_mean, torch.zeros(1))


def _keras():
    os.environ["KERAS_BACKEND"] = "torch"
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was already imported with the {keras.backend.backend()} backend")
    return keras


@pytest.mark.parametrize("clipping,rmax,dmax", [({"rmin": 1 / 1.5, "rmax": 1.5, "dmax": 0.5}, 1.5, 0.5),
                                                ({"rmin": 1 / 3, "rmax": 3.0, "dmax": 5.0}, 3.0, 5.0)])
def test_keras_parity_over_training_steps(clipping, rmax, dmax):
    keras = _keras()
    kl = keras.layers.BatchNormalization(renorm=True, renorm_clipping=clipping, momentum=0.9, renorm_momentum=0.8)
    kl.build((6, 3))
    gamma, beta = torch.tensor([2.0, 0.5, 1.0]), torch.tensor([3.0, -1.0, 0.0])
    kl.gamma.assign(gamma.numpy())
    kl.beta.assign(beta.numpy())
    ours = BatchRenorm1d(3, eps=1e-3, momentum=0.1, renorm_momentum=0.2, rmax=rmax, dmax=dmax, warmup_steps=0,
                         keras_compatible=True)
    with torch.no_grad():
        ours.weight.copy_(gamma)
        ours.bias.copy_(beta)
    gen = torch.Generator().manual_seed(0)
    clipped = False
    for step in range(5):
        x = torch.randn(6, 3, generator=gen) * torch.tensor([3.0, 0.2, 1.0]) + torch.tensor([1.0, -2.0, 5.0])
        sigma = torch.clamp_min(ours.renorm_stddev.clone(), math.sqrt(1e-3))
        d = (x.mean(0) - ours.renorm_mean) / sigma
        r = torch.sqrt(x.var(0, unbiased=False) + 1e-3) / sigma
        clipped |= bool((d.abs() > dmax).any() or (r > rmax).any() or (r < 1 / rmax).any())
        xk = x.clone().requires_grad_()
        xo = x.clone().requires_grad_()
        yk = kl(xk, training=True)
        yo = ours(xo)
        what = f"step {step}"
        assert_close(yo.detach(), yk.detach(), atol=1e-5, rtol=1e-5, what=what)
        g = torch.randn(6, 3, generator=gen)
        (gk,) = torch.autograd.grad(yk, xk, g)
        (go,) = torch.autograd.grad(yo, xo, g)
        # Keras's torch backend differentiates var = E[x^2] - E[x]^2 in float32: on channel 1 (mean -2, std 0.2)
        # its gradient is off by ~5e-5 from a float64 evaluation, ours by ~1e-6; hence the wider tolerance
        assert_close(go, gk, atol=1e-4, rtol=1e-4, what=f"{what} grad")
        for ours_name, keras_var in (("running_mean", kl.moving_mean), ("running_var", kl.moving_variance),
                                     ("moving_stddev", kl.moving_stddev), ("renorm_mean", kl.renorm_mean),
                                     ("renorm_stddev", kl.renorm_stddev)):
            assert_close(getattr(ours, ours_name), keras_var.value.detach().cpu(), atol=1e-5, rtol=1e-5,
                         what=f"{what} {ours_name}")
    assert clipped, "the test data must make the clipping active"
    ours.eval()
    x = torch.randn(6, 3, generator=gen)
    assert_close(ours(x).detach(), kl(x, training=False).detach(), atol=1e-5, rtol=1e-5, what="inference")


def test_keras_first_step_against_keras_defaults():
    keras = _keras()
    kl = keras.layers.BatchNormalization(renorm=True, renorm_clipping={"rmin": 1 / 3, "rmax": 3.0, "dmax": 5.0})
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    yk = kl(x, training=True).detach()
    ours = BatchRenorm1d(1, eps=1e-3, momentum=0.01, warmup_steps=0, keras_compatible=True)
    yo = ours(x)
    assert_close(yk, x, atol=1e-6, rtol=0)  # Keras's own first step returns the input
    assert_close(yo.detach(), yk, atol=1e-6, rtol=0)
    assert_close(ours.running_var, kl.moving_variance.value.detach().cpu(), atol=1e-6, rtol=0)
    assert_close(ours.moving_stddev, kl.moving_stddev.value.detach().cpu(), atol=1e-6, rtol=0)


def test_keras_functional_validation():
    bufs = [torch.zeros(2), torch.ones(2), torch.ones(2), torch.zeros(2), torch.ones(2)]
    with pytest.raises(ValueError, match="need 0 <= rmin <= rmax"):
        batch_renorm_keras(torch.randn(4, 2), *bufs, training=True, rmin=2.0, rmax=1.5)
    with pytest.raises(ValueError, match="renorm_stddev must be a tensor like moving_mean"):
        batch_renorm_keras(torch.randn(4, 2), *bufs[:4], torch.ones(3), training=True)
    assert torch.equal(bufs[0], torch.zeros(2)) and torch.equal(bufs[2], torch.ones(2))
