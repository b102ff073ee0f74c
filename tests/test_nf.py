"""Normalizer-free tools: ScaledStdConv2d (scaled weight standardization) and adaptive gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from normkit.nn.scaled_std_conv import ScaledStdConv2d
from normkit.tools.agc import adaptive_clip_grad, unitwise_norm

from helpers import assert_close, snapshot

# ---------------------------------------------------------------- ScaledStdConv2d


@pytest.mark.parametrize("groups,kernel", [(1, 3), (2, (3, 1)), (4, 1)])
def test_standardized_weight_mean_zero_std_closed_form(groups, kernel):
    torch.manual_seed(0)
    conv = ScaledStdConv2d(8, 6 if groups != 4 else 8, kernel, groups=groups, gamma=1.7, dtype=torch.float64)
    with torch.no_grad():
        conv.weight.mul_(torch.arange(1, conv.out_channels + 1, dtype=torch.float64).view(-1, 1, 1, 1)).add_(0.3)
        conv.gain.copy_(torch.linspace(-2, 3, conv.out_channels, dtype=torch.float64).view(-1, 1, 1, 1))
    w = conv.standardized_weight().flatten(1)
    fan_in = conv.weight[0].numel()
    assert fan_in == 8 // groups * math.prod(conv.kernel_size)
    raw_var = conv.weight.flatten(1).var(1, correction=0)
    expected_std = conv.gain.flatten().abs() * 1.7 * fan_in ** -0.5 * torch.sqrt(raw_var / (raw_var + conv.eps))
    assert_close(w.mean(1), torch.zeros_like(w[:, 0]), atol=1e-14, rtol=0)
    assert_close(w.std(1, correction=0), expected_std, atol=1e-14, rtol=1e-12)


def test_std_is_exactly_gain_times_fan_in_power_when_eps_is_zero():
    conv = ScaledStdConv2d(16, 4, 3, eps=0.0, dtype=torch.float64)
    w = conv.standardized_weight().flatten(1)
    assert conv.scale == pytest.approx(1 / 12)  # 16 * 3 * 3 = 144
    assert_close(w.std(1, correction=0), torch.full((4,), 1 / 12, dtype=torch.float64), atol=1e-15, rtol=1e-13)


def test_forward_equals_conv2d_with_the_standardized_weight_and_gradients_flow():
    torch.manual_seed(1)
    conv = ScaledStdConv2d(3, 5, 3, stride=2, padding=1, dilation=1, bias=True)
    x = torch.randn(2, 3, 9, 9)
    w = conv.weight
    mean = w.mean((1, 2, 3), keepdim=True)
    var = w.var((1, 2, 3), keepdim=True, correction=0)
    w_hat = conv.gain * (w - mean) / torch.sqrt(var + 1e-6) * 27 ** -0.5
    assert_close(conv(x), F.conv2d(x, w_hat, conv.bias, stride=2, padding=1))
    conv(x).sum().backward()
    assert conv.weight.grad is not None and conv.gain.grad is not None and conv.bias.grad is not None
    # weight standardization is invariant to a per-filter affine change of the raw weight (up to eps)
    with torch.no_grad():
        before = conv(x)
        conv.weight.mul_(3.0).add_(1.0)
    assert_close(conv(x), before, atol=1e-4, rtol=1e-4)


def test_state_dict_like_conv2d():
    plain = torch.nn.Conv2d(3, 4, 3)
    no_gain = ScaledStdConv2d(3, 4, 3, gain=False)
    assert list(no_gain.state_dict()) == list(plain.state_dict())
    no_gain.load_state_dict(plain.state_dict())
    assert torch.equal(no_gain.weight, plain.weight)
    with_gain = ScaledStdConv2d(3, 4, 3, gain_init=0.5)
    assert list(with_gain.state_dict()) == ["weight", "bias", "gain"]
    with_gain.load_state_dict(plain.state_dict())  # a Conv2d checkpoint loads; the gain is kept
    assert torch.equal(with_gain.weight, plain.weight) and torch.equal(with_gain.gain, torch.full((4, 1, 1, 1), 0.5))
    copy = ScaledStdConv2d(3, 4, 3)
    copy.load_state_dict(with_gain.state_dict())
    assert torch.equal(copy.gain, with_gain.gain)
    assert isinstance(with_gain, torch.nn.Conv2d)


@pytest.mark.parametrize("kw,match", [({"gamma": 0.0}, "gamma"), ({"gamma": float("nan")}, "gamma"),
                                      ({"eps": -1e-6}, "eps"), ({"gain": False, "gain_init": 2.0}, "gain=True")])
def test_scaled_std_conv_bad_options(kw, match):
    with pytest.raises(ValueError, match=match):
        ScaledStdConv2d(3, 4, 3, **kw)


# ---------------------------------------------------------------- adaptive_clip_grad


def _param(weight, grad):
    p = torch.nn.Parameter(torch.as_tensor(weight, dtype=torch.float64).clone())
    p.grad = torch.as_tensor(grad, dtype=torch.float64).clone()
    return p


def test_agc_rows_clipped_exactly_and_others_untouched():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(6, 3, 2, 2, generator=gen, dtype=torch.float64)
    w[5] = 0.0  # a zero row: its threshold is clip_factor * eps
    g = torch.randn(6, 3, 2, 2, generator=gen, dtype=torch.float64) * 1e-3
    g[1] *= 1e3
    g[3] *= 1e3
    g[5] *= 1e-6  # norm ~1e-8 < 0.01 * 1e-3: untouched
    p = _param(w, g)
    original = p.grad.clone()
    adaptive_clip_grad([p], clip_factor=0.01, eps=1e-3)
    w_norm = w.flatten(1).norm(dim=1).clamp_min(1e-3)
    threshold = 0.01 * w_norm
    before_norm = original.flatten(1).norm(dim=1)
    clipped = before_norm > threshold
    assert clipped.tolist() == [False, True, False, True, False, False]
    assert_close(p.grad.flatten(1).norm(dim=1)[clipped], threshold[clipped], atol=0, rtol=1e-12)
    assert_close(p.grad[clipped], original[clipped] * (threshold / before_norm)[clipped].view(-1, 1, 1, 1),
                 atol=0, rtol=1e-12)
    assert torch.equal(p.grad[~clipped], original[~clipped])  # bit for bit


def test_agc_paper_numbers_ones_and_zeros():
    p = _param(torch.ones(4, 3, 2, 2), torch.ones(4, 3, 2, 2))
    adaptive_clip_grad(p)
    assert_close(p.grad.flatten(1).norm(dim=1), torch.full((4,), 0.01 * math.sqrt(12), dtype=torch.float64),
                 atol=0, rtol=1e-12)
    z = _param(torch.zeros(4, 3), torch.ones(4, 3))
    adaptive_clip_grad(z)
    assert_close(z.grad.norm(dim=1), torch.full((4,), 1e-5, dtype=torch.float64), atol=0, rtol=1e-12)


def test_agc_vector_uses_full_norm():
    b = _param([3.0, 4.0], [30.0, 40.0])  # ||W|| = 5, ||G|| = 50 > 0.1 * 5
    adaptive_clip_grad([b], clip_factor=0.1)
    assert_close(b.grad, torch.tensor([0.3, 0.4], dtype=torch.float64), atol=0, rtol=1e-12)
    assert unitwise_norm(torch.ones(3, 4)).shape == (3, 1)


def test_agc_skip_final_classifier_and_module_input():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model(torch.randn(5, 4)).pow(2).sum().mul(1e4).backward()
    before = snapshot(model)
    adaptive_clip_grad(model, 1e-3, skip=[model[2]])
    assert torch.equal(model[2].weight.grad, before["2.weight.grad"])
    assert torch.equal(model[2].bias.grad, before["2.bias.grad"])
    assert not torch.equal(model[0].weight.grad, before["0.weight.grad"])
    # skip by parameter: only the listed tensor is excluded
    model.zero_grad()
    model(torch.randn(5, 4)).pow(2).sum().mul(1e4).backward()
    before = snapshot(model)
    adaptive_clip_grad(model.parameters(), 1e-3, skip=model[2].weight)
    assert torch.equal(model[2].weight.grad, before["2.weight.grad"])
    assert not torch.equal(model[2].bias.grad, before["2.bias.grad"])


def test_agc_ignores_missing_grads_and_duplicates():
    p = _param(torch.ones(2, 2), torch.ones(2, 2))
    q = torch.nn.Parameter(torch.ones(3))
    adaptive_clip_grad([p, p, q])
    assert q.grad is None
    assert_close(p.grad.norm(dim=1), torch.full((2,), 0.01 * math.sqrt(2), dtype=torch.float64), atol=0, rtol=1e-12)


@pytest.mark.parametrize("kw,error,match", [
    ({"clip_factor": 0.0}, ValueError, "clip_factor must be a finite positive"),
    ({"clip_factor": -0.01}, ValueError, "clip_factor"),
    ({"clip_factor": float("inf")}, ValueError, "clip_factor"),
    ({"clip_factor": True}, ValueError, "clip_factor"),
    ({"eps": -1e-3}, ValueError, "eps must be a finite non-negative"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"skip": ["fc"]}, TypeError, "skip must hold tensors"),
])
def test_agc_bad_arguments_change_nothing(kw, error, match):
    p = _param(torch.ones(2, 2), torch.ones(2, 2) * 5)
    before = p.grad.clone()
    with pytest.raises(error, match=match):
        adaptive_clip_grad([p], **kw)
    assert torch.equal(p.grad, before)
    with pytest.raises(TypeError, match="parameters must hold"):
        adaptive_clip_grad([p, "x"])
    assert torch.equal(p.grad, before)
