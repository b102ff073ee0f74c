"""The Triton batch-norm kernels (``normkit.kernels``) against the float64 oracle, and their dispatch.

Without a GPU, conftest sets ``TRITON_INTERPRET=1`` before triton is imported, so every kernel runs in Triton's
interpreter (numpy, one program after another): shapes stay tiny, and the tile settings of ``_bn_tiling`` make
even these shapes take several tiles per channel, several chunks per tile and masked edges.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

import normkit.functional as F
from normkit.functional import reference
from normkit.functional.reference import activate
from normkit.nn import BatchNormAct2d

pytest.importorskip("triton")

kernels = pytest.importorskip("normkit.kernels")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
TOL = {torch.float32: 2e-5, torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.fixture(autouse=True)
def _own_random_state():
    """Seed each test and leave the global RNG as it was, so later test files see the same random numbers."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def make(shape, dtype=torch.float32, channels_last=False, scale=2.0, shift=1.0):
    x = torch.randn(shape, dtype=torch.float64) * scale + shift
    x = x.to(device=DEVICE, dtype=dtype)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def oracle(x, weight, bias, residual, act, channel, running=None, eps=1e-5):
    """``act(bn(x) + residual)`` by the float64 reference, with the leaves it differentiates."""
    leaves = [t.detach().double().requires_grad_() if t is not None else None for t in (x, weight, bias, residual)]
    xd, wd, bd, rd = leaves
    rm, rv = (t.double() for t in running) if running is not None else (None, None)
    z = reference.batch_norm(xd, rm, rv, wd, bd, running is None, 0.1, eps, channel_dim=channel)
    return activate(z + rd if rd is not None else z, act), leaves


def check(ours, expected, dtype, scale=1.0):
    tol = TOL[dtype] * scale
    torch.testing.assert_close(ours.double(), expected.detach().double(), atol=tol, rtol=tol)


def run_case(shape, channel, act, with_residual, dtype, channels_last, training, affine_grad=True):
    torch.manual_seed(zlib.crc32(repr((shape, act, with_residual, dtype, channels_last, training)).encode()))
    x = make(shape, dtype, channels_last).requires_grad_()
    c = shape[channel]
    param_dtype = torch.float32
    weight = (torch.rand(c, device=DEVICE, dtype=param_dtype) + 0.5).requires_grad_(affine_grad)
    bias = torch.randn(c, device=DEVICE, dtype=param_dtype).requires_grad_(affine_grad)
    residual = make(shape, dtype, channels_last).requires_grad_() if with_residual else None
    running = (torch.randn(c, device=DEVICE), torch.rand(c, device=DEVICE) + 0.5)
    if training:
        y, mean, var = kernels.batch_norm_train(x, weight, bias, 1e-5, channel_dim=channel, activation=act,
                                                residual=residual)
        expected, leaves = oracle(x, weight, bias, residual, act, channel % x.dim())
        m64, v64 = reference.batch_moments(x.detach().double(), channel % x.dim())
        assert mean.dtype == var.dtype == torch.float32
        check(mean, m64, torch.float32, 10)
        check(var, v64, torch.float32, 10)
    else:
        y = kernels.batch_norm_eval(x, *running, weight, bias, 1e-5, channel_dim=channel, activation=act,
                                    residual=residual)
        expected, leaves = oracle(x, weight, bias, residual, act, channel % x.dim(), running)
    assert y.dtype == dtype and y.shape == x.shape
    if channels_last:
        assert y.is_contiguous(memory_format=torch.channels_last)
    check(y, expected, dtype)
    grad = torch.randn(shape, dtype=torch.float64).to(device=DEVICE, dtype=dtype)
    inputs = [t for t in (x, weight, bias, residual) if t is not None and t.requires_grad]
    ours = torch.autograd.grad(y, inputs, grad)
    theirs = torch.autograd.grad(expected, [d for t, d in zip((x, weight, bias, residual), leaves, strict=True)
                                            if t is not None and t.requires_grad], grad.double())
    for a, t, b in zip(ours, inputs, theirs, strict=True):
        assert a.dtype == t.dtype
        check(a, b, dtype, 10)


TRAIN_CASES = [  # shape, channel_dim, activation, residual, dtype, channels_last
    ((2, 3, 5, 7), 1, None, False, torch.float32, False),
    ((3, 5, 4, 4), 1, "relu", True, torch.float32, False),
    ((2, 5, 3, 4), 1, "silu", True, torch.float32, True),
    ((37, 12), 1, "relu", False, torch.float32, False),  # (N, C): C not a multiple of the channel block
    ((4, 6, 11), 1, "silu", False, torch.float32, False),  # (N, C, L)
    ((4, 5, 6), -1, None, True, torch.float32, False),  # (N, L, C) rows
    ((2, 3), 1, "relu", False, torch.float32, False),  # N * HW = 2
    ((1, 3, 2), 1, None, True, torch.float32, False),  # N * HW = 2 on planes
    ((3, 4, 5, 3), 1, "relu", True, torch.float16, False),
    ((2, 5, 3, 3), 1, "silu", False, torch.bfloat16, True),
    ((2, 5, 3, 4), 1, "relu", True, torch.bfloat16, True),  # the ReLU bitmask on rows
    ((3, 3, 5), 1, "relu", True, torch.float32, False),  # 45 values: a bitmask with a partial last byte
]


@pytest.mark.parametrize("case", TRAIN_CASES, ids=str)
def test_train_matches_reference(case):
    run_case(*case, training=True)


EVAL_CASES = [  # shape, channel_dim, activation, residual, dtype, channels_last, affine gradients
    ((2, 3, 4, 5), 1, "relu", True, torch.float32, False, True),
    ((2, 3, 4, 5), 1, "silu", True, torch.float32, True, False),  # dz written by the pointwise pass
    ((9, 10), 1, None, False, torch.float16, False, True),
    ((3, 4, 6), 1, "relu", False, torch.bfloat16, False, False),
]


@pytest.mark.parametrize("case", EVAL_CASES, ids=str)
def test_eval_matches_reference(case):
    *args, affine_grad = case
    run_case(*args, training=False, affine_grad=affine_grad)


def test_reduction_is_split_and_exact_for_a_large_mean():
    from normkit.kernels import _bn_launch

    x = make((3, 2, 40), scale=1e-2, shift=1e3)  # mean >> std: no cancellation with the shifted sums
    plan = _bn_launch.plan_for(x, 1)
    assert plan.kind == "planes" and plan.split["tiles"] > 1
    assert _bn_launch.plan_for(make((37, 12)), 1).split["tiles"] > 1  # as in TRAIN_CASES
    stats = _bn_launch.moments(plan, plan.view(x), None, None, None, 0.1, 1.0, True)
    m64, v64 = reference.batch_moments(x.double(), 1)
    torch.testing.assert_close(stats[0].double(), m64, rtol=1e-7, atol=0)
    torch.testing.assert_close(stats[1].double(), v64, rtol=1e-5, atol=0)


def test_no_autotuning_the_launch_is_a_function_of_the_shape():
    """Every process (every DDP rank) picks the same variant for a shape: no kernel autotunes, the split is cached
    by shape and fits CUDA's grid limits; on the interpreter the blocks are the tiny test ones."""

    from normkit.kernels import _bn_pointwise, _bn_reduce, _bn_tiling

    kernels_ = [_bn_reduce.moments_planes, _bn_reduce.moments_rows, _bn_reduce.grad_sums_planes,
                _bn_reduce.grad_sums_rows, _bn_pointwise.normalize, _bn_pointwise.grad_input]
    assert all(type(k).__name__ in ("JITFunction", "InterpretedFunction") for k in kernels_)  # no Autotuner
    first = _bn_tiling.plane_split(256, 64, 3136, 1056)
    assert first is _bn_tiling.plane_split(256, 64, 3136, 1056)
    assert (_bn_tiling.REDUCE_BLOCK == 16) == INTERPRET


def test_grids_fit_cuda_limits_up_to_the_32_bit_refusal():
    from normkit.kernels import _bn_tiling
    from normkit.kernels._tuning import check_grid

    biggest = 2**31 - 1
    for planes, channels, size in [(1, 1, biggest), (biggest // 7, 1, 7), (2, 3, 2**28), (2**20, 2048, 1)]:
        split = _bn_tiling.plane_split(planes, channels, size, 132 * 8)
        check_grid(split["grid"])
        args = split["args"]  # the tiles cover every plane and every value of a plane
        assert split["tiles"] // args["tiles_s"] * args["per_tile"] >= planes and args["tiles_s"] * args["span"] >= size
    for rows, channels in [(biggest // 3, 3), (2**20, 2048), (1, 2**30)]:
        check_grid(_bn_tiling.row_split(rows, channels, 132 * 8)["grid"])
    check_grid(_bn_tiling.pointwise_grid(biggest))
    with pytest.raises(ValueError, match="exceeds CUDA's limits"):
        check_grid((1, 65_536))
    big = torch.zeros(1, 1, device=DEVICE).expand(2, 2**30)  # 2**31 elements, no memory
    assert "2**31" in kernels.supports(big)
    assert kernels.supports(big[:, : 2**30 - 1]) is None


# numpy (the interpreter's engine) warns on inf - inf; filterwarnings=error would turn that into an error
NONFINITE = pytest.mark.filterwarnings("ignore::RuntimeWarning")


@NONFINITE
@pytest.mark.parametrize("mode", ["unbiased", "biased"])
def test_public_path_running_statistics(mode):
    x = make((4, 3, 2, 2))
    x[1, 2, 0, 0] = float("inf")  # channel 2: non-finite statistics -> skipped
    state = {b: (torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)) for b in ("triton", "reference")}
    outputs = {b: F.batch_norm(x, *state[b], training=True, momentum=0.2, running_var_mode=mode, backend=b)
               for b in state}
    torch.testing.assert_close(outputs["triton"][:, :2], outputs["reference"][:, :2])
    for ours, theirs in zip(state["triton"], state["reference"], strict=True):
        torch.testing.assert_close(ours, theirs)
        assert ours[2] == theirs[2] and ours[2] in (0.0, 1.0)  # untouched
    y = F.batch_norm(x[:, :2], state["triton"][0][:2], state["triton"][1][:2], backend="triton")
    torch.testing.assert_close(y, F.batch_norm(x[:, :2], state["reference"][0][:2], state["reference"][1][:2]))


@NONFINITE
def test_public_path_nonfinite_raise_changes_nothing():
    x = make((4, 3))
    x[0, 1] = float("nan")
    rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
    with pytest.raises(FloatingPointError, match="channels 1"):
        F.batch_norm(x, rm, rv, training=True, nonfinite="raise", backend="triton")
    assert torch.equal(rm, torch.zeros_like(rm)) and torch.equal(rv, torch.ones_like(rv))


def test_public_path_double_backward():
    x = make((3, 2, 4)).requires_grad_()
    w = torch.rand(2, device=DEVICE, requires_grad=True)
    seeds = torch.randn(3, 2, 4, device=DEVICE)
    results = []
    for backend in ("triton", "reference"):
        y = F.batch_norm(x, None, None, w, None, training=True, backend=backend)
        if backend == "triton":
            assert "TrainFunction" in type(y.grad_fn).__name__
        (gx,) = torch.autograd.grad((y * seeds).sum(), x, create_graph=True)
        results.append(torch.autograd.grad(gx.pow(2).sum(), [x, w]))
    for ours, theirs in zip(*results, strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_batchnormact_uses_the_fused_kernel(monkeypatch):
    layers = {b: BatchNormAct2d(3, act="relu", momentum=0.3).to(DEVICE) for b in ("triton", "cpu")}
    layers["cpu"].load_state_dict(layers["triton"].state_dict())
    x, residual = make((2, 3, 3, 4)), make((2, 3, 3, 4))
    grads = {}
    for backend, layer in layers.items():
        monkeypatch.setenv("NORMKIT_BACKEND", backend)
        xi, ri = x.clone().requires_grad_(), residual.clone().requires_grad_()
        y = layer(xi, ri)
        assert ("TrainFunction" in type(y.grad_fn).__name__) == (backend == "triton")
        y.backward(torch.ones_like(y))
        grads[backend] = (y, xi.grad, ri.grad, layer.weight.grad, layer.bias.grad)
    for ours, theirs in zip(grads["triton"], grads["cpu"], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    for key, value in layers["cpu"].state_dict().items():
        torch.testing.assert_close(layers["triton"].state_dict()[key], value)
    monkeypatch.setenv("NORMKIT_BACKEND", "triton")
    layers["triton"].eval()
    y = layers["triton"](x, residual)
    torch.testing.assert_close(y, layers["cpu"].eval()(x, residual))


def test_a_forced_triton_call_the_kernels_refuse_runs_torchs_ops(monkeypatch):
    assert "float64" in kernels.supports(torch.zeros(2, 3, dtype=torch.float64))
    assert "gelu" in kernels.supports(torch.zeros(2, 3), "gelu")
    assert kernels.supports(torch.zeros(3)) is not None
    assert kernels.supports(make((2, 3)), "silu") is None
    x = make((4, 3), dtype=torch.float64).requires_grad_()
    y = F.batch_norm(x, None, None, training=True, backend="triton")
    assert type(y.grad_fn).__name__ == "NativeBatchNormBackward0"  # torch's op, behind normkit's front
    torch.testing.assert_close(y, reference.batch_norm(x, None, None, training=True))
    monkeypatch.setenv("NORMKIT_BACKEND", "triton")
    layer = BatchNormAct2d(3, act="gelu").to(DEVICE)
    x = make((2, 3, 2, 2)).requires_grad_()
    y = layer(x)
    assert "TrainFunction" not in type(y.grad_fn).__name__
    monkeypatch.setenv("NORMKIT_BACKEND", "cpu")
    torch.testing.assert_close(y, BatchNormAct2d(3, act="gelu").to(DEVICE)(x))


def test_forced_triton_on_cpu_without_the_interpreter_raises_and_import_stays_light():
    code = (
        "import sys, torch, normkit, normkit.kernels, normkit.functional as F\n"
        "assert 'triton' not in sys.modules, 'import normkit.kernels imported triton'\n"
        "rm, rv = torch.zeros(3), torch.ones(3)\n"
        "try:\n"
        "    F.batch_norm(torch.randn(4, 3), rm, rv, training=True, backend='triton')\n"
        "except ValueError as error:\n"
        "    assert rm.eq(0).all() and rv.eq(1).all()\n"
        "    print(error)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "NORMKIT_BACKEND")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "expects a CUDA tensor, got one on 'cpu'" in result.stdout
    assert "TRITON_INTERPRET=1" in result.stdout and "backend='cpu'" in result.stdout
