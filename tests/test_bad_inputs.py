"""Bad input: a clear error naming what was expected, what came and the fix; and nothing changes."""

from __future__ import annotations

import pytest
import torch

import normkit
import normkit.functional as F

from helpers import assert_unchanged, snapshot


def _trained(module_class, channels=3):
    module = module_class(channels)
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-1, 1)
    shape = {normkit.BatchNorm1d: (5, channels), normkit.BatchNorm2d: (5, channels, 2, 2),
             normkit.BatchNorm3d: (5, channels, 2, 2, 2)}[module_class]
    module(torch.randn(shape)).sum().backward()  # non-trivial buffers, counter 1, gradients present
    return module


BAD_CALLS = [
    # (module class, input, error type, regex the message must match)
    (normkit.BatchNorm2d, torch.randn(2, 3, 4), ValueError, r"expected 4D input \(got 3D input\)"),
    (normkit.BatchNorm1d, torch.randn(2, 3, 4, 5), ValueError, r"expected 2D or 3D input \(got 4D input\)"),
    (normkit.BatchNorm3d, torch.randn(2, 3, 4, 5), ValueError, r"expected 5D input \(got 4D input\)"),
    (normkit.BatchNorm2d, torch.randn(2, 4, 3, 3), RuntimeError,
     r"running_mean should contain 4 elements not 3.*num_features=4"),
    (normkit.BatchNorm1d, torch.randn(1, 3), ValueError,
     r"Expected more than 1 value per channel when training, got input size torch.Size\(\[1, 3\]\).*eval"),
    (normkit.BatchNorm2d, torch.randn(1, 3, 1, 1), ValueError, r"Expected more than 1 value per channel"),
    (normkit.BatchNorm1d, torch.ones(4, 3, dtype=torch.long), TypeError, r"floating-point input.*torch.int64.*float"),
    (normkit.BatchNorm1d, torch.randn(4, 3, dtype=torch.float64), RuntimeError,
     r"mixed dtype \(CPU\): all inputs must share same datatype.*float64.*\.to\("),
    (normkit.BatchNorm1d, torch.randn(4, 3, device="meta"), RuntimeError,
     r"same device.*running_mean is on cpu.*input is on meta"),
]


@pytest.mark.parametrize("module_class,x,error,message", BAD_CALLS,
                         ids=[m.__name__ + str(tuple(x.shape)) + str(x.dtype) for m, x, _, _ in BAD_CALLS])
def test_bad_module_input_raises_and_changes_nothing(module_class, x, error, message):
    module = _trained(module_class)
    before = snapshot(module)
    with pytest.raises(error, match=message):
        module(x)
    assert_unchanged(module, before)


def test_same_error_class_as_torch_for_every_bad_call():
    for module_class, x, error, _ in BAD_CALLS:
        if x.device.type == "meta" or not x.is_floating_point():
            continue
        twin = getattr(torch.nn, module_class.__name__)(3)
        with pytest.raises(error):
            twin(x)


def test_eps_must_be_positive_in_training():
    module = _trained(normkit.BatchNorm1d)
    module.eps = 0.0
    before = snapshot(module)
    with pytest.raises(ValueError, match=r"batch_norm eps must be positive during training, but got 0.0"):
        module(torch.randn(4, 3))
    assert_unchanged(module, before)
    module.eval()
    module(torch.randn(4, 3))  # eval with eps 0 is allowed, as in torch
    module.eps = -1e-5
    with pytest.raises(ValueError, match=r"must be non-negative"):
        module(torch.randn(4, 3))


def test_nonfinite_raise_leaves_module_untouched():
    module = normkit.BatchNorm1d(3, nonfinite="raise")
    module(torch.randn(4, 3))
    before = snapshot(module)
    x = torch.randn(4, 3)
    x[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="left unchanged"):
        module(x)
    assert_unchanged(module, before)


@pytest.mark.parametrize("kwargs,message", [
    ({"running_var": "sample"}, r"running_var must be one of 'unbiased', 'biased'; got 'sample'"),
    ({"nonfinite": "ignore"}, r"nonfinite must be one of 'skip', 'propagate', 'raise'; got 'ignore'"),
])
def test_bad_constructor_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        normkit.BatchNorm2d(3, **kwargs)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"channel_dim": 0}, ValueError, "points at the batch dimension"),
    ({"channel_dim": 5}, ValueError, r"channel_dim must be an int in \[-3, 2\]"),
    ({"momentum": "0.1"}, TypeError, "argument 'momentum' must be float, not str"),
    ({"momentum": None}, TypeError, "argument 'momentum' must be float, not NoneType"),
    ({"running_var_mode": "sample"}, ValueError, "running_var_mode must be one of"),
])
def test_bad_functional_options_change_nothing(kwargs, error, message):
    rm, rv = torch.zeros(3), torch.ones(3)
    with pytest.raises(error, match=message):
        F.batch_norm(torch.randn(4, 3, 5), rm, rv, training=True, **kwargs)
    assert torch.equal(rm, torch.zeros(3)) and torch.equal(rv, torch.ones(3))


def test_functional_eval_needs_running_statistics():
    with pytest.raises(RuntimeError, match="running_mean must be defined in evaluation mode"):
        F.batch_norm(torch.randn(4, 3), None, None)
    with pytest.raises(ValueError, match="must either both be None or neither be None"):
        F.batch_norm(torch.randn(4, 3), torch.zeros(3), None, training=True)


def test_functional_input_must_be_a_tensor_with_a_batch():
    with pytest.raises(TypeError, match="expected input to be a torch.Tensor, got list"):
        F.batch_norm([[1.0, 2.0]], None, None, training=True)
    with pytest.raises(ValueError, match=r"at least 2D.*unsqueeze"):
        F.batch_norm(torch.randn(3), None, None, training=True)


def test_mismatched_buffer_dtypes():
    module = normkit.BatchNorm1d(3)
    module.running_var = module.running_var.double()
    before = snapshot(module)
    with pytest.raises(RuntimeError, match="running_var: torch.float64"):
        module(torch.randn(4, 3))
    assert_unchanged(module, before)
