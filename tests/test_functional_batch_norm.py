"""normkit.functional.batch_norm: the numbers torch gives, every implementation of every pass, the options."""

from __future__ import annotations

import pytest
import torch

import normkit.functional as F
from normkit.functional import _dispatch, reference

from helpers import assert_close

X = torch.tensor([[1.0], [2.0], [3.0], [4.0]])


def test_known_numbers_from_torch():
    rm, rv = torch.zeros(1), torch.ones(1)
    y = F.batch_norm(X, rm, rv, training=True)
    assert_close(y.flatten(), torch.tensor([-1.341635, -0.447212, 0.447212, 1.341635]))
    assert_close(rm, torch.tensor([0.25]))
    assert_close(rv, torch.tensor([1.0666667]))
    y = F.batch_norm(X, rm, rv)
    assert_close(y.flatten(), torch.tensor([0.726181, 1.694422, 2.662664, 3.630905]))


def test_momentum_one_stores_the_batch_statistics():
    rm, rv = torch.zeros(1), torch.ones(1)
    F.batch_norm(X, rm, rv, training=True, momentum=1.0)
    assert_close(rm, torch.tensor([2.5]))
    assert_close(rv, torch.tensor([5 / 3]))
    F.batch_norm(X, rm, rv, training=True, momentum=1.0, running_var_mode="biased")
    assert_close(rv, torch.tensor([1.25]))


def test_momentum_zero_keeps_the_running_statistics():
    rm, rv = torch.full((1,), 3.0), torch.full((1,), 2.0)
    F.batch_norm(X, rm, rv, training=True, momentum=0.0)
    assert rm.item() == 3.0 and rv.item() == 2.0


def test_reduces_over_batch_and_length():
    x = torch.arange(12.0).reshape(2, 2, 3)
    rm, rv = torch.zeros(2), torch.ones(2)
    F.batch_norm(x, rm, rv, training=True)
    assert_close(rm, torch.tensor([0.4, 0.7]))
    assert_close(rv, torch.tensor([2.06, 2.06]))


def test_known_gradient():
    x = X.clone().requires_grad_()
    w, b = torch.ones(1, requires_grad=True), torch.zeros(1, requires_grad=True)
    F.batch_norm(x, None, None, w, b, training=True).backward(torch.tensor([[1.0], [0.0], [0.0], [0.0]]))
    assert_close(x.grad.flatten(), torch.tensor([0.268330, -0.357768, -0.089443, 0.178882]))
    assert_close(w.grad, torch.tensor([-1.341635]))
    assert_close(b.grad, torch.tensor([1.0]))


@pytest.mark.parametrize("shape,channel_dim", [((4, 6, 3), -1), ((3, 5, 2, 3), 2), ((2, 3, 4, 5), 3)])
def test_channel_dim_equals_moving_the_channels(shape, channel_dim):
    torch.manual_seed(0)
    x = torch.randn(shape) * 3 + 1
    channels = shape[channel_dim]
    w, b = torch.rand(channels) + 0.5, torch.randn(channels)
    rm1, rv1, rm2, rv2 = torch.zeros(channels), torch.ones(channels), torch.zeros(channels), torch.ones(channels)
    y = F.batch_norm(x, rm1, rv1, w, b, training=True, channel_dim=channel_dim)
    moved = F.batch_norm(x.movedim(channel_dim, 1), rm2, rv2, w, b, training=True).movedim(1, channel_dim)
    assert_close(y, moved)
    assert_close(rm1, rm2)
    assert_close(rv1, rv2)
    assert y.shape == x.shape


@pytest.mark.parametrize("kind", list(_dispatch.CPU_PLAN))
@pytest.mark.parametrize("impl", ["compose", "aten"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.usefixtures("composition_from_128_values")
def test_every_plan_choice_matches_the_reference(kind, impl, dtype, training, monkeypatch):
    monkeypatch.setitem(_dispatch.CPU_PLAN, kind, impl)
    torch.manual_seed(0)
    shape = (2, 3, 8, 16) if kind == "planes" else (4, 3, 5, 6)  # 128 values per plane
    if kind == "rows" and impl == "compose":
        pytest.skip("the composition takes contiguous planes only")
    x = torch.randn(shape, dtype=dtype) * 2 + 7
    if kind == "rows":
        x = x.contiguous(memory_format=torch.channels_last)
    w = (torch.rand(3, dtype=dtype) + 0.5).requires_grad_()
    b = torch.randn(3, dtype=dtype).requires_grad_()
    tol = 1e-5 if dtype == torch.float32 else 1e-10
    outputs = []
    for fn in (F.batch_norm, reference.batch_norm):
        rm, rv = torch.full((3,), 6.0, dtype=dtype), torch.full((3,), 3.0, dtype=dtype)
        xi = x.clone().requires_grad_()
        y = fn(xi, rm, rv, w, b, training=training)
        grads = torch.autograd.grad(y, (xi, w, b), torch.cos(torch.arange(y.numel(), dtype=dtype)).view_as(y))
        outputs.append((y, *grads, rm, rv))
    for name, mine, ref in zip(("y", "dx", "dw", "db", "rm", "rv"), *outputs, strict=True):
        assert_close(mine, ref, atol=tol, rtol=tol, what=name)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_gradcheck_and_gradgradcheck_float64(training, affine, memory_format):
    torch.manual_seed(0)
    x = torch.randn(3, 2, 3, 2, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(2, dtype=torch.float64, requires_grad=True) if affine else None
    rm, rv = torch.randn(2, dtype=torch.float64), torch.rand(2, dtype=torch.float64) + 0.5
    inputs = (x, w, b) if affine else (x,)

    def fn(*args):
        xi, wi, bi = (*args, None, None)[:3]
        return F.batch_norm(xi, rm.clone(), rv.clone(), wi, bi, training=training)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# channels_last training statistics come from ATen's kernel (faster there; see CPU_PLAN), which is exact to 1e-5
# up to |mean| / std ~ 1e3; NCHW statistics are normkit's corrected two-pass, exact further out.
@pytest.mark.parametrize("shift,memory_format", [
    *[(s, f) for s in (0.0, 1e2, 1e3) for f in (torch.contiguous_format, torch.channels_last)],
    (1e4, torch.contiguous_format),
])
@pytest.mark.usefixtures("composition_from_128_values")
def test_large_means_cost_no_precision(shift, memory_format):
    torch.manual_seed(0)
    x = (torch.randn(8, 4, 16, 16) + shift).contiguous(memory_format=memory_format)
    rm, rv = torch.zeros(4), torch.ones(4)
    y = F.batch_norm(x, rm, rv, training=True, momentum=1.0)
    exact = x.double()
    var, mean = torch.var_mean(exact, dim=(0, 2, 3), correction=1)
    assert_close(rm.double(), mean, atol=1e-6, rtol=1e-6, what="mean")
    assert_close(rv.double(), var, atol=0, rtol=1e-5, what="var")
    expected = reference.batch_norm(exact, None, None, training=True)
    # The output itself is x * scale + shift in fp32 (as in torch): it keeps |mean| / std ulps of error.
    assert_close(y.double(), expected, atol=1e-5 + 1e-6 * shift, rtol=0, what="output")


def test_biased_running_var():
    rm, rv = torch.zeros(1), torch.ones(1)
    F.batch_norm(X, rm, rv, training=True, running_var_mode="biased")
    assert_close(rv, torch.tensor([0.9 + 0.1 * 1.25]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_skip_keeps_the_poisoned_channel(bad):
    x = torch.randn(6, 3)
    x[2, 1] = bad
    rm, rv = torch.zeros(3), torch.ones(3)
    y = F.batch_norm(x, rm, rv, training=True)
    assert rm[1].item() == 0.0 and rv[1].item() == 1.0
    assert rm[0].item() != 0.0 and rm[2].item() != 0.0
    assert torch.isfinite(y[:, 0]).all() and not torch.isfinite(y[:, 1]).all()


def test_nonfinite_propagate_is_torchs_behaviour():
    x = torch.randn(6, 3)
    x[2, 1] = float("nan")
    rm, rv = torch.zeros(3), torch.ones(3)
    rm_t, rv_t = rm.clone(), rv.clone()
    F.batch_norm(x, rm, rv, training=True, nonfinite="propagate")
    torch.nn.functional.batch_norm(x, rm_t, rv_t, training=True)
    torch.testing.assert_close(rm, rm_t, equal_nan=True)
    torch.testing.assert_close(rv, rv_t, equal_nan=True)
    assert rm[1].isnan()


def test_nonfinite_raise_changes_nothing():
    x = torch.randn(6, 3)
    x[0, 2] = float("inf")
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(FloatingPointError, match=r"1 channel\(s\).*channels 2"):
        F.batch_norm(x, rm, rv, training=True, nonfinite="raise")
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_backend_selection(monkeypatch):
    x = torch.randn(4, 3)  # backend="triton" itself is covered in test_kernels_batch_norm.py
    with pytest.raises(ValueError, match="unknown normkit backend 'cuda'"):
        F.batch_norm(x, None, None, training=True, backend="cuda")
    monkeypatch.setenv("NORMKIT_BACKEND", "reference")
    y = F.batch_norm(x.requires_grad_(), None, None, training=True)
    assert "BatchNormBackward" not in type(y.grad_fn).__name__
    monkeypatch.setenv("NORMKIT_BACKEND", "cpu")
    assert_close(F.batch_norm(x, None, None, training=True), y)


def test_empty_batch_keeps_statistics_and_has_gradients():
    rm, rv = torch.zeros(3), torch.ones(3)
    x = torch.randn(0, 3, 4, requires_grad=True)
    w = torch.ones(3, requires_grad=True)
    y = F.batch_norm(x, rm, rv, w, None, training=True)
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


@pytest.mark.parametrize("shape,memory_format", [
    ((2, 3, 16, 16), torch.contiguous_format),  # planes: normkit's statistics
    ((2, 3, 4, 4), torch.contiguous_format),  # short planes: ATen moves the buffers, normkit restores
    ((2, 3, 4, 4), torch.channels_last),  # rows: likewise
])
@pytest.mark.usefixtures("composition_from_128_values")
def test_a_skipped_nonfinite_batch_still_backpropagates(shape, memory_format):
    x = torch.randn(shape).contiguous(memory_format=memory_format)
    x[0, 1, 0, 0] = float("inf")
    x.requires_grad_()
    w, b = torch.ones(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    rm, rv = torch.zeros(3), torch.ones(3)
    y = F.batch_norm(x, rm, rv, w, b, training=True)
    y[:, 0].sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad[:, 0]).all()
    assert rm[1].item() == 0.0 and rv[1].item() == 1.0
    assert rm[0].item() != 0.0


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_moments_block_by_block_equal_the_reference(memory_format, monkeypatch):
    from normkit.functional import _compose
    from normkit.functional._layout import layout_of

    monkeypatch.setattr(_compose, "BLOCK_BYTES", 1000)  # many blocks, and a last one that is shorter
    x = (torch.randn(7, 5, 6, 6) * 3 + 40).contiguous(memory_format=memory_format)
    layout = layout_of(x, 1)
    mean, var = _compose.moments(layout.view(x), layout.kind)
    expected_mean, expected_var = reference.batch_moments(x.double(), 1)
    assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-6, what="mean")
    assert_close(var.double(), expected_var, atol=1e-6, rtol=1e-5, what="var")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_moments_when_the_first_sample_is_far_from_the_rest(memory_format):
    from normkit.functional import _compose
    from normkit.functional._layout import layout_of

    torch.manual_seed(0)
    x = torch.randn(4000, 3, 2, 4)
    x[0] += 1e4  # the first sample's mean (the default shift) lies ~60 std away: the shift must be redone
    x = x.contiguous(memory_format=memory_format)
    layout = layout_of(x, 1)
    mean, var = _compose.moments(layout.view(x), layout.kind)
    expected_mean, expected_var = reference.batch_moments(x.double(), 1)
    assert_close(mean.double(), expected_mean, atol=1e-5, rtol=1e-6, what="mean")
    assert_close(var.double(), expected_var, atol=0, rtol=1e-5, what="var")


def test_cuda_tensors_default_to_torchs_kernels(monkeypatch):
    """The Triton kernels run on request only, until a GPU run has measured them (issue 13's safe default)."""
    monkeypatch.delenv("NORMKIT_BACKEND", raising=False)
    cuda_like = torch.empty(2, 3, device="meta")
    monkeypatch.setattr(type(cuda_like), "is_cuda", property(lambda self: True))
    assert _dispatch.backend_for(cuda_like) == "cpu"
    assert _dispatch.backend_for(cuda_like, "reference") == "reference"
