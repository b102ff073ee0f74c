"""Cross-iteration BN: window = concatenated batches, exact mean compensation, window 1 = BN, burn-in, errors."""

from __future__ import annotations

import pytest
import torch

from normkit.nn.batchnorm import BatchNorm2d
from normkit.nn.cross_iteration import CrossIterationBatchNorm2d

from helpers import assert_unchanged, snapshot

D = torch.float64


def make(window=4, burn_in=0, seed=0, dtype=D, **kw):
    torch.manual_seed(seed)
    conv = torch.nn.Conv2d(3, 4, 3, bias=False).to(dtype)
    cbn = CrossIterationBatchNorm2d(4, window=window, burn_in=burn_in, weight_of=conv, dtype=dtype, **kw)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 2.0)
        cbn.bias.uniform_(-1.0, 1.0)
    return conv, cbn


def batches(k, n=3, dtype=D, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 6, 6, generator=gen, dtype=dtype) * 2 + 0.5 for _ in range(k)]


def normalize(z, mean, var, cbn):
    s = (1, -1, 1, 1)
    return (z - mean.view(s)) / (var.view(s) + cbn.eps).sqrt() * cbn.weight.view(s) + cbn.bias.view(s)


def test_window_one_is_exactly_bn():
    conv, cbn = make(window=1, dtype=torch.float32)
    bn = BatchNorm2d(4)
    bn.load_state_dict(cbn.state_dict())
    assert cbn.state_dict().keys() == bn.state_dict().keys()
    for x in batches(3, dtype=torch.float32):
        outs = []
        for m in (cbn, bn):
            z = conv(x).detach().requires_grad_()
            y = m(z)
            y.backward(torch.cos(y.detach()))
            outs.append((y, z.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var,
                         m.num_batches_tracked))
        for a, e in zip(*outs, strict=True):
            assert torch.equal(a, e)


@pytest.mark.parametrize("dtype,tol", [(D, 1e-10), (torch.float32, 1e-5)])
def test_window_statistics_equal_concatenated_window_when_weights_fixed(dtype, tol):
    conv, cbn = make(window=4, dtype=dtype)
    zs = []
    for step, x in enumerate(batches(6, dtype=dtype)):
        y = cbn(conv(x))
        zs.append(conv(x).detach())
        window = torch.cat(zs[-4:])  # the current batch and up to 3 before it
        expected = normalize(zs[-1], window.mean((0, 2, 3)), window.var((0, 2, 3), unbiased=False), cbn)
        torch.testing.assert_close(y, expected, atol=tol, rtol=tol, msg=lambda m, s=step: f"step {s}: {m}")
    assert cbn.window_length == 3


def test_mean_compensation_is_exact_and_variance_is_first_order():
    conv, cbn = make(window=2)
    x1, x2 = batches(2)
    cbn(conv(x1))
    w1 = conv.weight.detach().clone()
    delta = torch.randn_like(w1) * 0.05
    with torch.no_grad():
        conv.weight.add_(delta)
    w2 = conv.weight.detach()

    def moments(w):
        z = torch.nn.functional.conv2d(x1, w)
        return z.mean((0, 2, 3)), (z * z).mean((0, 2, 3))

    mean_c, meanx2_c = cbn.compensated_statistics(w2)
    # mu is linear in the weight: first order is exact
    torch.testing.assert_close(mean_c[0], moments(w2)[0], atol=1e-12, rtol=1e-12)
    # nu = E[z^2] is quadratic in the weight: the compensation is exactly its first-order Taylor term
    # nu(w1) + 2 E[z(w1) z(delta)] (z is linear in the weight), so the error is O(|delta|^2)
    _, nu1 = moments(w1)
    z1 = torch.nn.functional.conv2d(x1, w1)
    dnu = 2 * (z1 * torch.nn.functional.conv2d(x1, delta)).mean((0, 2, 3))
    torch.testing.assert_close(meanx2_c[0], nu1 + dnu, atol=1e-12, rtol=1e-12)
    # what is left is exactly the second-order term E[z(delta)^2]
    residual = (torch.nn.functional.conv2d(x1, delta) ** 2).mean((0, 2, 3))
    torch.testing.assert_close(moments(w2)[1] - meanx2_c[0], residual, atol=1e-10, rtol=1e-10)
    # rho = 0 turns the compensation off
    cbn.rho = 0.0
    torch.testing.assert_close(cbn.compensated_statistics(w2)[0][0], moments(w1)[0])
    cbn.rho = 1.0

    # the forward pools the current batch with the compensated past one; gradients flow through the current only
    z2 = conv(x2)
    z2_ref = z2.detach().clone().requires_grad_()
    y = cbn(z2)
    mu = (z2_ref.mean((0, 2, 3)) + mean_c[0]) / 2
    var = ((z2_ref * z2_ref).mean((0, 2, 3)) + meanx2_c[0]) / 2 - mu * mu
    expected = normalize(z2_ref, mu, var, cbn)
    torch.testing.assert_close(y, expected.detach(), atol=1e-10, rtol=1e-10)
    up = torch.sin(torch.arange(y.numel(), dtype=D)).view_as(y)
    (grad,) = torch.autograd.grad(y, z2, up)
    expected.backward(up)
    torch.testing.assert_close(grad, z2_ref.grad, atol=1e-10, rtol=1e-10)


def test_running_statistics_follow_the_current_batch_like_bn():
    conv, cbn = make(window=3)
    bn = BatchNorm2d(4, dtype=D)
    for x in batches(4):
        cbn(conv(x))
        bn(conv(x).detach())
    torch.testing.assert_close(cbn.running_mean, bn.running_mean, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(cbn.running_var, bn.running_var, atol=1e-12, rtol=1e-12)
    assert int(cbn.num_batches_tracked) == 4
    cbn.eval()
    bn.eval()
    bn.load_state_dict(cbn.state_dict())
    z = conv(batches(1, seed=5)[0])
    assert torch.equal(cbn(z), bn(z))


@pytest.mark.parametrize("two_stage", [True, False])
def test_burn_in_uses_batch_statistics(two_stage):
    conv, cbn = make(window=3, burn_in=2, two_stage=two_stage)
    xs = batches(5)
    for step, x in enumerate(xs):
        z = conv(x)
        y = cbn(z)
        zd = z.detach()
        if step < 2 and two_stage:  # iterations 1 and 2: batch statistics, nothing stored
            torch.testing.assert_close(y, normalize(zd, zd.mean((0, 2, 3)), zd.var((0, 2, 3), unbiased=False), cbn))
            assert cbn.window_length == 0
    assert cbn.window_length == 2
    assert cbn.iteration == 5


def test_no_grad_training_is_bn():
    conv, cbn = make(window=3)
    bn = BatchNorm2d(4, dtype=D)
    bn.load_state_dict(cbn.state_dict())
    with torch.no_grad():
        for x in batches(2):
            assert torch.equal(cbn(conv(x)), bn(conv(x)))
    assert cbn.window_length == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_window(bad):
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        CrossIterationBatchNorm2d(4, window=bad)


def test_bad_burn_in_and_bad_binding():
    with pytest.raises(ValueError, match="burn_in must be an int >= 0"):
        CrossIterationBatchNorm2d(4, burn_in=-1)
    with pytest.raises(ValueError, match="dim 0 has 4 output channels"):
        CrossIterationBatchNorm2d(4, weight_of=torch.nn.Conv2d(3, 5, 1))
    with pytest.raises(ValueError, match="dim 0 has 4 output channels"):
        CrossIterationBatchNorm2d(4).bind(torch.nn.ReLU())


def test_failed_forward_changes_nothing():
    conv, cbn = make(window=3)
    cbn(conv(batches(1)[0]))
    unbound = CrossIterationBatchNorm2d(4, window=3, dtype=D)
    before = snapshot(unbound)
    with pytest.raises(ValueError, match="needs the preceding layer's weight"):
        unbound(conv(batches(1)[0]))
    assert_unchanged(unbound, before)
    assert unbound.iteration == 0
    before, length, iteration = snapshot(cbn), cbn.window_length, cbn.iteration
    other = torch.randn(3, 4, 4, 4, dtype=D, requires_grad=True)  # not computed from the bound conv
    with pytest.raises(RuntimeError, match="does not depend on the bound weight"):
        cbn(other)
    with pytest.raises(ValueError, match="expected 4D input"):
        cbn(torch.randn(3, 4, 4, dtype=D, requires_grad=True))
    assert_unchanged(cbn, before)
    assert (cbn.window_length, cbn.iteration) == (length, iteration)


def test_deepcopy_and_pickle_keep_the_window_settings():
    import copy
    import pickle

    conv, cbn = make(window=3, burn_in=2)
    cbn(conv(batches(1)[0]))
    for clone in (copy.deepcopy(cbn), pickle.loads(pickle.dumps(cbn))):  # noqa: S301 - our own object
        assert (clone.window, clone.burn_in, clone.iteration) == (3, 2, 1)
        assert clone.state_dict().keys() == cbn.state_dict().keys()
    assert "window=3, burn_in=2" in repr(cbn)
