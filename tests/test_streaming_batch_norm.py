"""StreamingBatchNorm*: Equinox's EMA mode with Online Normalization's streamed variance."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

from normkit.nn.streaming import StreamingBatchNorm1d, StreamingBatchNorm2d, StreamingBatchNorm3d

from helpers import assert_close, assert_unchanged, snapshot


def _closed_form(batches: list[torch.Tensor], momentum: float | None):
    """Exponentially weighted mean and (population) variance of every value of the stream, per channel.

    Batch t gets weight f_t (1 for the first, then momentum, or 1/t for momentum=None), shared by its values;
    older batches are multiplied by (1 - f_t)."""
    weights: list[float] = []
    for t in range(len(batches)):
        f = 1.0 if t == 0 else (1.0 / (t + 1) if momentum is None else momentum)
        weights = [w * (1.0 - f) for w in weights] + [f]
    values, value_weights = [], []
    for w, b in zip(weights, batches, strict=True):
        flat = b.transpose(0, 1).reshape(b.shape[1], -1)
        values.append(flat)
        value_weights.append(torch.full((flat.shape[1],), w / flat.shape[1], dtype=b.dtype))
    x, w = torch.cat(values, 1), torch.cat(value_weights)
    mean = (x * w).sum(1)
    var = ((x - mean[:, None]) ** 2 * w).sum(1)
    return mean, var


@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_statistics_equal_closed_form_ema_of_the_stream(momentum):
    gen = torch.Generator().manual_seed(0)
    bn = StreamingBatchNorm2d(3, momentum=momentum, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.5, 2.0]))
        bn.bias.copy_(torch.tensor([0.1, 0.2, -0.3]))
    batches = []
    for t, n in enumerate([1, 4, 1, 1, 3, 1, 2, 1]):
        x = torch.randn(n, 3, 2, 2, generator=gen, dtype=torch.float64) * (1 + t) + t
        batches.append(x)
        y = bn(x)
        mean, var = _closed_form(batches, momentum)
        assert_close(bn.running_mean, mean, atol=1e-12, rtol=1e-12, what=f"mean after {t + 1}")
        assert_close(bn.running_var, var, atol=1e-12, rtol=1e-12, what=f"var after {t + 1}")
        expected = F.batch_norm(x, mean, var, bn.weight, bn.bias, training=False, eps=bn.eps)
        assert_close(y, expected, atol=1e-12, rtol=1e-12, what="output uses the statistics including the batch")
    assert int(bn.num_batches_tracked) == len(batches)


@pytest.mark.parametrize("cls,shape", [(StreamingBatchNorm1d, (1, 5)), (StreamingBatchNorm1d, (1, 5, 1)),
                                       (StreamingBatchNorm2d, (1, 5, 1, 1)), (StreamingBatchNorm3d, (1, 5, 1, 1, 1))])
def test_one_value_per_channel_trains(cls, shape):
    bn = cls(5)
    for _ in range(3):
        x = torch.randn(shape, requires_grad=True)
        y = bn(x)
        y.square().sum().backward()
        assert y.shape == x.shape and torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    assert int(bn.num_batches_tracked) == 3


def test_single_sample_output_is_bounded_by_sqrt_one_minus_f_over_f():
    # For one value x: x - mu_t = (1 - f)(x - mu_{t-1}) and var_t >= f(1 - f)(x - mu_{t-1})^2.
    gen = torch.Generator().manual_seed(1)
    for momentum in (0.01, 0.1, 0.5):
        bn = StreamingBatchNorm1d(4, momentum=momentum, dtype=torch.float64)
        bound = math.sqrt((1 - momentum) / momentum)
        worst = 0.0
        for t in range(300):
            x = torch.randn(1, 4, generator=gen, dtype=torch.float64) * 10.0 ** (t % 7 - 3)  # wildly varying scale
            worst = max(worst, bn(x).abs().max().item())
        assert worst <= bound * (1 + 1e-12)
        assert worst > 0.5 * bound  # the bound is attained within a factor 2 by a jump in scale: not vacuous


def test_constant_stream_converges_to_plain_batch_norm():
    gen = torch.Generator().manual_seed(2)
    bn = StreamingBatchNorm2d(3, momentum=0.2, dtype=torch.float64)
    bn(torch.randn(4, 3, 3, 3, generator=gen, dtype=torch.float64) * 5 + 3)  # a different first batch
    x = torch.randn(8, 3, 3, 3, generator=gen, dtype=torch.float64)
    gaps = []
    for _ in range(120):
        y = bn(x)
        gaps.append((y - F.batch_norm(x, None, None, training=True, eps=bn.eps)).abs().max().item())
    assert gaps[0] > 1e-2
    assert gaps[-1] < 1e-9  # 0.8 ** 120 ~ 2.5e-12
    assert all(b <= a * (1 + 1e-9) + 1e-15 for a, b in zip(gaps[5:], gaps[6:], strict=False))


def test_momentum_one_is_batch_norm_forward_and_backward():
    gen = torch.Generator().manual_seed(3)
    bn = StreamingBatchNorm2d(3, momentum=1.0, dtype=torch.float64)
    bn(torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64))
    x = torch.randn(5, 3, 4, 4, generator=gen, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    w = torch.randn(3, generator=gen, dtype=torch.float64)
    with torch.no_grad():
        bn.weight.copy_(w)
    up = torch.randn(x.shape, generator=gen, dtype=torch.float64)
    bn(x1).backward(up)
    F.batch_norm(x2, None, None, w, torch.zeros(3, dtype=torch.float64), training=True, eps=bn.eps).backward(up)
    assert_close(x1.grad, x2.grad, atol=1e-12, rtol=1e-10)


def test_gradient_flows_only_through_the_current_batch_share():
    # momentum 0 after the first batch: statistics are constants, the gradient is weight / sqrt(var + eps).
    bn = StreamingBatchNorm1d(2, momentum=0.0, dtype=torch.float64)
    bn(torch.tensor([[1.0, 2.0], [3.0, -2.0]], dtype=torch.float64))
    x = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    bn(x).sum().backward()
    expected = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().expand(3, 2)
    assert_close(x.grad, expected, atol=1e-12, rtol=1e-12)
    assert_close(bn.running_var, torch.tensor([1.0, 4.0], dtype=torch.float64))


def test_gradcheck_float64():
    gen = torch.Generator().manual_seed(4)
    bn = StreamingBatchNorm2d(3, momentum=0.3, dtype=torch.float64)
    bn(torch.randn(4, 3, 2, 2, generator=gen, dtype=torch.float64))
    state = {k: v.clone() for k, v in bn.state_dict().items()}

    def f(x, weight, bias):
        bn.load_state_dict(state)  # every call sees the same running statistics
        return torch.func.functional_call(bn, {"weight": weight, "bias": bias}, (x,))

    x = torch.randn(1, 3, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x, w, b))


def test_eval_uses_running_statistics_and_changes_nothing():
    bn = StreamingBatchNorm1d(4)
    for _ in range(5):
        bn(torch.randn(1, 4))
    bn.eval()
    before = snapshot(bn)
    x = torch.randn(6, 4)
    expected = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, training=False, eps=bn.eps)
    assert_close(bn(x), expected)
    assert_unchanged(bn, before)
    assert_close(bn(x[:1]), expected[:1])


def test_state_dict_is_batch_norm_and_loads_a_pretrained_one():
    torch_bn = torch.nn.BatchNorm2d(3)
    torch_bn(torch.randn(4, 3, 2, 2) * 2 + 1)
    bn = StreamingBatchNorm2d(3)
    assert list(bn.state_dict()) == list(torch_bn.state_dict())
    bn.load_state_dict(torch_bn.state_dict())
    x = torch.randn(1, 3, 2, 2)
    bn(x)  # continues the stream from the loaded statistics (num_batches_tracked = 1 > 0)
    mean = 0.9 * torch_bn.running_mean + 0.1 * x.mean((0, 2, 3))
    assert_close(bn.running_mean, mean)


def test_channels_last_and_low_precision():
    bn = StreamingBatchNorm2d(4)
    x = torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
    assert bn(x).is_contiguous(memory_format=torch.channels_last)
    y = bn(torch.randn(1, 4, 3, 3, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and bn.running_var.dtype == torch.float32


@pytest.mark.parametrize("mode", ["skip", "raise", "propagate"])
def test_nonfinite(mode):
    bn = StreamingBatchNorm1d(3, nonfinite=mode)
    bn(torch.randn(2, 3))
    before = snapshot(bn)
    x = torch.tensor([[float("nan"), 1.0, 2.0]])
    if mode == "raise":
        with pytest.raises(FloatingPointError, match="channel"):
            bn(x)
        assert_unchanged(bn, before)
        return
    bn(x)
    if mode == "skip":
        assert bn.running_mean[0] == before["running_mean"][0] and bn.running_var[0] == before["running_var"][0]
        assert bn.running_mean[1] != before["running_mean"][1]
    else:
        assert torch.isnan(bn.running_mean[0])


@pytest.mark.parametrize("x,error,match", [
    (torch.randn(2, 4), RuntimeError, "should contain 4 elements not 3"),
    (torch.ones(2, 3, dtype=torch.int64), TypeError, "floating-point"),
    (torch.randn(2, 3, 4, 4), ValueError, "expected 2D or 3D input"),
    (torch.randn(0, 3), ValueError, "non-empty"),
    ("not a tensor", TypeError, "torch.Tensor"),
])
def test_bad_input_changes_nothing(x, error, match):
    bn = StreamingBatchNorm1d(3)
    bn(torch.randn(1, 3))
    before = snapshot(bn)
    with pytest.raises(error, match=match):
        bn(x)
    assert_unchanged(bn, before)


def test_bad_options():
    with pytest.raises(ValueError, match="track_running_stats=True"):
        StreamingBatchNorm1d(3, track_running_stats=False)
    with pytest.raises(ValueError, match="momentum"):
        StreamingBatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="nonfinite"):
        StreamingBatchNorm1d(3, nonfinite="ignore")
    bn = StreamingBatchNorm1d(3)
    bn.eps = 0.0
    before = snapshot(bn)
    with pytest.raises(ValueError, match="eps must be positive"):
        bn(torch.randn(1, 3))
    assert_unchanged(bn, before)


def test_online_training_on_digits_with_batch_size_one():
    from normkit.data import load_digits

    data = load_digits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), StreamingBatchNorm1d(32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for i in range(400):
        x, y = data.x_train[i:i + 1], data.y_train[i:i + 1]
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    first, last = sum(losses[:50]) / 50, sum(losses[-50:]) / 50
    assert last < 0.5 * first, (first, last)
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    assert accuracy > 0.8, accuracy
