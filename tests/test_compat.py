"""normkit.compat: momentum conversions, keras_batch_norm, load_keras_weights and every input it refuses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import normkit
from normkit import compat
from normkit.compat import keras_batch_norm, load_keras_weights, momentum_from_keras, momentum_to_keras

C = 4


def bits(module: torch.nn.Module) -> dict:
    """Every parameter and buffer of ``module``, byte for byte, with its dtype, device, identity and grad flag."""
    state = {}
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        lazy = torch.nn.parameter.is_lazy(t)
        raw = torch.empty(0) if lazy else t.detach().reshape(-1).view(torch.uint8).clone()
        state[name] = (raw, t.dtype, t.device, id(t), t.requires_grad)
    return state


def assert_bit_identical(module: torch.nn.Module, before: dict) -> None:
    after = bits(module)
    assert after.keys() == before.keys()
    for name, (raw, *meta) in before.items():
        assert after[name][1:] == tuple(meta), name
        assert torch.equal(after[name][0], raw), f"{name} changed"


def keras_arrays(c: int = C, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "gamma": rng.normal(1.0, 0.3, c),
        "beta": rng.normal(0.0, 0.3, c),
        "moving_mean": rng.normal(0.0, 1.0, c),
        "moving_variance": rng.uniform(0.5, 2.0, c),
    }


def used_module(**kw) -> torch.nn.Module:
    """A BatchNorm whose state differs from a fresh one everywhere, so an accidental write shows."""
    module = normkit.BatchNorm2d(C, **kw)
    with torch.no_grad():
        for t in (module.weight, module.bias, module.running_mean, module.running_var):
            if t is not None:
                t.copy_(torch.rand(C) + 0.5)
        module.num_batches_tracked.fill_(7)
    return module


# --- momentum ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keras", "torch_m"), [(0.99, 0.01), (0.9, 0.1), (0.0, 1.0), (1.0, 0.0), (0, 1.0), (1, 0.0)])
def test_momentum_from_keras(keras, torch_m):
    assert momentum_from_keras(keras) == pytest.approx(torch_m, abs=1e-15)
    assert isinstance(momentum_from_keras(keras), float)


@pytest.mark.parametrize("m", [0.0, 0.1, 0.5, 0.9, 0.99, 0.999, 1.0, np.float64(0.97)])
def test_momentum_round_trip(m):
    assert momentum_to_keras(momentum_from_keras(m)) == pytest.approx(m, abs=1e-15)
    assert momentum_from_keras(momentum_to_keras(m)) == pytest.approx(m, abs=1e-15)


def test_momentum_from_keras_is_exactly_one_minus_m():
    assert momentum_from_keras(0.99) == 1 - 0.99
    assert momentum_to_keras(0.1) == 1 - 0.1


@pytest.mark.parametrize("convert", [momentum_from_keras, momentum_to_keras])
@pytest.mark.parametrize("bad", [-0.1, 1.0000001, 99.0, float("nan"), float("inf"), -1])
def test_momentum_out_of_range(convert, bad):
    with pytest.raises(ValueError, match=r"expected a momentum in \[0, 1\], got " + re.escape(repr(bad))):
        convert(bad)


@pytest.mark.parametrize("convert", [momentum_from_keras, momentum_to_keras])
@pytest.mark.parametrize("bad", [None, True, False, "0.9", torch.tensor(0.9), [0.9]])
def test_momentum_wrong_type(convert, bad):
    with pytest.raises(TypeError, match="number in") as info:
        convert(bad)
    assert "cumulative average" in str(info.value)


def test_momentum_to_keras_explains_none():
    with pytest.raises(TypeError, match="momentum=None means a cumulative average.*no equivalent"):
        momentum_to_keras(None)


# --- keras_batch_norm ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("dim", "cls"), [(1, normkit.BatchNorm1d), (2, normkit.BatchNorm2d), (3, normkit.BatchNorm3d)])
def test_keras_batch_norm_configuration(dim, cls):
    bn = keras_batch_norm(C, dim=dim)
    assert type(bn) is cls
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert (bn.num_features, bn.eps, bn.momentum) == (C, 1e-3, 1 - 0.99)
    assert bn.running_var_mode == "biased"
    assert bn.affine and bn.track_running_stats
    assert bn.weight.requires_grad and bn.bias.requires_grad


def test_keras_batch_norm_arguments():
    bn = keras_batch_norm(C, momentum=0.9, epsilon=1e-5, dtype=torch.float64, nonfinite="raise")
    assert (bn.momentum, bn.eps) == (pytest.approx(0.1), 1e-5)
    assert bn.weight.dtype == bn.running_var.dtype == torch.float64
    assert bn.nonfinite == "raise"
    assert keras_batch_norm(C, track_running_stats=False).running_mean is None


@pytest.mark.parametrize(
    ("center", "scale", "weight", "bias"),
    [(True, True, "trained", "trained"), (False, True, "trained", None), (True, False, "frozen", "trained"),
     (False, False, None, None)],
)
def test_keras_batch_norm_center_scale(center, scale, weight, bias):
    bn = keras_batch_norm(C, center=center, scale=scale)
    for name, expected, identity in (("weight", weight, 1.0), ("bias", bias, 0.0)):
        t = getattr(bn, name)
        if expected is None:
            assert t is None
        else:
            assert torch.equal(t, torch.full((C,), identity))
            assert t.requires_grad is (expected == "trained")
    assert bn.affine is (center or scale)


def test_keras_batch_norm_frozen_weight_stays_one():
    bn = keras_batch_norm(C, center=True, scale=False)
    x = torch.randn(8, C, 3, 3)
    bn(x).square().sum().backward()
    assert bn.weight.grad is None and bn.bias.grad is not None
    assert [name for name, p in bn.named_parameters() if p.requires_grad] == ["bias"]


@pytest.mark.parametrize(("name", "fix"), [("eps", "epsilon="), ("affine", "center="), ("bias", "center="),
                                           ("running_var", "biased")])
def test_keras_batch_norm_refuses_torch_names(name, fix):
    with pytest.raises(TypeError, match=f"{name}= is set from the Keras arguments.*{fix}"):
        keras_batch_norm(C, **{name: 1})


@pytest.mark.parametrize("dim", [0, 4, True, "2d"])
def test_keras_batch_norm_bad_dim(dim):
    with pytest.raises(ValueError, match=f"dim must be 1, 2 or 3.*got {re.escape(repr(dim))}"):
        keras_batch_norm(C, dim=dim)


def test_keras_batch_norm_bad_momentum():
    with pytest.raises(ValueError, match=r"momentum in \[0, 1\], got 1.5"):
        keras_batch_norm(C, momentum=1.5)


def test_keras_reference_numbers():
    """Keras 3 numbers measured by running Keras (research notes, semantics section 6, items 18, 19, 21)."""
    x = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    bn = keras_batch_norm(1, dim=1)
    torch.testing.assert_close(bn(x).flatten(), torch.tensor([-1.341104, -0.447035, 0.447035, 1.341104]),
                               atol=1e-6, rtol=0)
    torch.testing.assert_close((bn.running_mean, bn.running_var), (torch.tensor([0.025]), torch.tensor([1.0025])))
    torch.testing.assert_close(bn.eval()(x).flatten(), torch.tensor([0.973298, 1.971553, 2.969807, 3.968061]),
                               atol=1e-6, rtol=0)
    bn = keras_batch_norm(1, dim=1, momentum=0.0)
    bn(x)
    assert (bn.running_mean.item(), bn.running_var.item()) == (2.5, 1.25)


# --- load_keras_weights: what it loads ------------------------------------------------------------------------


def test_load_keras_weights_copies_into_place():
    bn = used_module()
    params = {name: id(p) for name, p in bn.named_parameters()}
    arrays = keras_arrays()
    assert load_keras_weights(bn, *arrays.values()) is bn
    for name, keras_name in (("weight", "gamma"), ("bias", "beta"), ("running_mean", "moving_mean"),
                             ("running_var", "moving_variance")):
        t = getattr(bn, name)
        assert t.dtype == torch.float32
        assert torch.equal(t.detach(), torch.from_numpy(arrays[keras_name]).float()), name
    assert {name: id(p) for name, p in bn.named_parameters()} == params
    assert bn.weight.requires_grad and bn.bias.requires_grad
    assert bn.num_batches_tracked.item() == 7


@pytest.mark.parametrize("kind", ["numpy32", "tensor", "list", "requires_grad", "column", "keras_ghost_shape"])
def test_load_keras_weights_input_kinds(kind):
    arrays = keras_arrays()
    convert = {
        "numpy32": lambda a: a.astype(np.float32),
        "tensor": torch.from_numpy,
        "list": lambda a: a.tolist(),
        "requires_grad": lambda a: torch.tensor(a, requires_grad=True),
        "column": lambda a: a.reshape(C, 1),
        "keras_ghost_shape": lambda a: a.reshape(1, 1, 1, C),
    }[kind]
    bn = load_keras_weights(used_module(), *(convert(a) for a in arrays.values()))
    torch.testing.assert_close(bn.running_var, torch.tensor(arrays["moving_variance"], dtype=torch.float32))
    assert bn.running_var.shape == (C,)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_load_keras_weights_keeps_module_dtype(dtype):
    bn = normkit.BatchNorm2d(C, dtype=dtype)
    arrays = keras_arrays()
    load_keras_weights(bn, *arrays.values())
    for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert t.dtype == dtype
    assert torch.equal(bn.running_mean, torch.tensor(arrays["moving_mean"]).to(dtype))


@pytest.mark.parametrize("module", [torch.nn.BatchNorm1d(C), torch.nn.BatchNorm2d(C), torch.nn.BatchNorm3d(C),
                                    normkit.BatchNorm1d(C), torch.nn.SyncBatchNorm(C)], ids=repr)
def test_load_keras_weights_any_batch_norm(module):
    load_keras_weights(module, *keras_arrays().values())
    assert module.num_batches_tracked.item() == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_keras_weights_keeps_module_device():
    bn = load_keras_weights(normkit.BatchNorm2d(C, device="cuda"), *keras_arrays().values())
    assert {t.device.type for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var)} == {"cuda"}


def test_load_keras_weights_inference_formula():
    arrays = {k: torch.tensor(v, dtype=torch.float64) for k, v in keras_arrays().items()}
    bn = load_keras_weights(keras_batch_norm(C, dtype=torch.float64).eval(), *arrays.values())
    x = torch.randn(3, C, 2, 2, dtype=torch.float64)
    shape = (1, C, 1, 1)
    expected = ((x - arrays["moving_mean"].view(shape)) / (arrays["moving_variance"].view(shape) + 1e-3).sqrt()
                * arrays["gamma"].view(shape) + arrays["beta"].view(shape))
    torch.testing.assert_close(bn(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("center", "scale"), [(True, False), (False, True), (False, False)])
def test_load_keras_weights_missing_gamma_or_beta(center, scale):
    bn = keras_batch_norm(C, center=center, scale=scale)
    with torch.no_grad():
        for t in (bn.weight, bn.bias):
            if t is not None:
                t.fill_(5.0)
    arrays = keras_arrays()
    gamma = arrays["gamma"] if scale else None
    beta = arrays["beta"] if center else None
    load_keras_weights(bn, gamma, beta, arrays["moving_mean"], arrays["moving_variance"])
    if scale:
        assert torch.equal(bn.weight.detach(), torch.tensor(gamma, dtype=torch.float32))
    elif bn.weight is not None:
        assert torch.equal(bn.weight, torch.ones(C)) and not bn.weight.requires_grad
    if center:
        assert torch.equal(bn.bias.detach(), torch.tensor(beta, dtype=torch.float32))
    else:
        assert bn.bias is None


def test_load_keras_weights_allows_zero_variance():
    arrays = keras_arrays()
    arrays["moving_variance"][1] = 0.0
    bn = load_keras_weights(used_module(), *arrays.values())
    assert bn.running_var[1].item() == 0.0


# --- load_keras_weights: what it refuses, leaving the module bit-identical ------------------------------------


def _with(name, value):
    arrays = keras_arrays()
    arrays[name] = value
    return arrays


BAD_ARRAYS = [
    ("gamma", np.ones(C + 1), ValueError, r"gamma must hold num_features=4 values \(shape \(4,\)\), got 5"),
    ("beta", np.ones(C - 1), ValueError, r"beta must hold num_features=4 values .* got 3"),
    ("moving_mean", np.ones((2, 2)), ValueError, r"moving_mean must hold num_features=4 .* got 4 \(shape \(2, 2\)\)"),
    ("moving_variance", np.ones(2 * C), ValueError, r"moving_variance must hold num_features=4 .* got 8"),
    ("moving_variance", np.float64(1.0), ValueError, r"moving_variance must hold num_features=4 .* got 1"),
    ("gamma", np.array([1.0, np.nan, 1.0, 1.0]), ValueError, "gamma must be finite, got nan at channel 1"),
    ("beta", np.array([0.0, 0.0, 0.0, -np.inf]), ValueError, "beta must be finite, got -inf at channel 3"),
    ("moving_mean", np.full(C, np.inf), ValueError, "moving_mean must be finite, got inf at channel 0"),
    ("moving_variance", np.array([1.0, -0.5, 1.0, -1e-9]), ValueError,
     r"moving_variance must be >= 0, got -0.5 at channel 1, -1e-09 at channel 3.*numpy.maximum"),
    ("moving_mean", None, TypeError, "moving_mean is required, got None"),
    ("moving_variance", None, TypeError, "moving_variance is required, got None"),
    ("gamma", "1.0", TypeError, "gamma must be an array of numbers.*got str"),
    ("beta", [{"a": 1}] * C, TypeError, "beta must be an array of numbers.*got list"),
    ("moving_mean", np.ones(C, dtype=bool), TypeError, "moving_mean must hold real numbers, got dtype torch.bool"),
    ("moving_variance", np.ones(C, dtype=np.complex64), TypeError, "must hold real numbers, got dtype torch.complex64"),
]


@pytest.mark.parametrize(("name", "value", "error", "match"), BAD_ARRAYS,
                         ids=[f"{name}-{i}" for i, (name, *_) in enumerate(BAD_ARRAYS)])
def test_load_keras_weights_bad_array(name, value, error, match):
    bn = used_module()
    before = bits(bn)
    with pytest.raises(error, match=match):
        load_keras_weights(bn, *_with(name, value).values())
    assert_bit_identical(bn, before)


def test_load_keras_weights_overflow_in_module_dtype():
    bn = used_module(dtype=torch.float16)
    before = bits(bn)
    with pytest.raises(ValueError, match=r"gamma does not fit the module's torch.float16, got 1000000 at channel 2"
                                         r".*module.float\(\)"):
        load_keras_weights(bn, *_with("gamma", np.array([1.0, 1.0, 1e6, 1.0])).values())
    assert_bit_identical(bn, before)


BAD_MODULES = [
    ({"affine": False}, {}, ValueError, r"got gamma but the BatchNorm2d has no weight \(affine=False\).*gamma=None"),
    ({"affine": False}, {"gamma": None}, ValueError, r"got beta but the BatchNorm2d has no bias"),
    ({"bias": False}, {}, ValueError, r"got beta but the BatchNorm2d has no bias \(bias=False\).*center=False"),
    ({}, {"gamma": None}, ValueError, r"gamma=None \(a Keras layer with scale=False\) but the BatchNorm2d has a "
                                      r"trainable weight.*numpy.full\(C, 1.0\)"),
    ({}, {"beta": None}, ValueError, r"beta=None \(a Keras layer with center=False\) .* trainable bias"),
    ({"track_running_stats": False}, {}, ValueError, r"has no running statistics \(track_running_stats=False\)"),
]


@pytest.mark.parametrize(("kw", "arrays", "error", "match"), BAD_MODULES)
def test_load_keras_weights_mismatched_module(kw, arrays, error, match):
    if kw.get("track_running_stats") is False:
        bn = normkit.BatchNorm2d(C, **kw)
    else:
        bn = used_module(**kw)
    before = bits(bn)
    given = keras_arrays()
    given.update(arrays)
    with pytest.raises(error, match=match):
        load_keras_weights(bn, *given.values())
    assert_bit_identical(bn, before)


@pytest.mark.parametrize(("module", "error", "match"), [
    (torch.nn.Linear(C, C), TypeError, "expected a batch-norm module .* got Linear"),
    (torch.nn.Sequential(torch.nn.BatchNorm2d(C)), TypeError, "got Sequential.*get_submodule"),
    (torch.nn.LazyBatchNorm2d(), ValueError, "lazy and not initialized yet.*num_features=C"),
], ids=["linear", "sequential", "lazy"])
def test_load_keras_weights_not_a_batch_norm(module, error, match):
    before = bits(module)
    with pytest.raises(error, match=match):
        load_keras_weights(module, *keras_arrays().values())
    assert_bit_identical(module, before)


def test_load_keras_weights_failure_after_valid_arrays_changes_nothing():
    """The last array is the bad one: the valid ones before it must not have been written."""
    bn = used_module()
    before = bits(bn)
    arrays = keras_arrays()
    arrays["moving_variance"][-1] = -1.0
    with pytest.raises(ValueError, match="moving_variance must be >= 0"):
        load_keras_weights(bn, *arrays.values())
    assert_bit_identical(bn, before)


# --- the module itself --------------------------------------------------------------------------------------


def test_import_does_not_import_keras():
    code = "import sys, normkit.compat; print(sorted(m for m in sys.modules if m.split('.')[0] == 'keras'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_docs_table_matches_docstring():
    docs = (Path(__file__).resolve().parents[1] / "docs" / "conventions.md").read_text()
    table = [line for line in compat.__doc__.splitlines() if line.startswith("|")]
    assert len(table) >= 10
    assert "\n".join(table) in docs


def test_public_names():
    assert set(compat.__all__) == {"keras_batch_norm", "load_keras_weights", "momentum_from_keras",
                                   "momentum_to_keras"}
