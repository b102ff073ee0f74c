"""Triton GroupNorm (+ fused activation) and LayerNorm kernels against the oracle (``functional.reference``) and
torch: outputs and gradients on odd tiny shapes (several tiles per group, groups split along channels and
positions, channels_last, 1-3 normalized dims), each dtype, double backward, the launch plans and grids of huge
shapes (computed, not launched), the 2**31 refusals, and the dispatch from ``normkit.functional`` (forced,
defaults, fallbacks). Without a GPU the kernels run under Triton's interpreter (``conftest.py``); every test also
holds on a GPU."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import normkit.kernels as K  # noqa: E402
from normkit.functional import group_norm, layer_norm, reference  # noqa: E402
from normkit.nn import GroupNorm, LayerNorm  # noqa: E402

gk = importlib.import_module("normkit.kernels._group_norm")  # the host modules
lk = importlib.import_module("normkit.kernels._layer_norm")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


@pytest.fixture(autouse=True)
def _private_rng():
    """Seeded, and leaves the global RNG as it found it (later tests that draw from it stay deterministic)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


def _params(c, affine, dtype=torch.float32):
    w = torch.randn(c, device=DEVICE, dtype=dtype) if affine in ("both", "weight") else None
    b = torch.randn(c, device=DEVICE, dtype=dtype) if affine == "both" else None
    return w, b


def _oracle_grads(fn, dy, *tensors):
    """Float64 outputs and gradients of ``fn`` (the reference) at ``tensors``."""
    leaves = [None if t is None else t.detach().double().requires_grad_() for t in tensors]
    y = fn(*leaves)
    y.backward(dy.double())
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _close(actual, expected, dtype=torch.float32):
    if expected is None:
        assert actual is None
        return
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


# (shape, groups, activation, tile, split_threshold, channels_last, affine)
GN_CASES = [
    ((2, 6, 5, 3), 2, None, 8, 10**6, False, "both"),     # K=3 channels, 2 tiles along S: masked edges
    ((2, 6, 5, 3), 2, "silu", 8, 8, False, "weight"),     # split along channels and positions, no bias
    ((3, 4, 7), 4, "relu", 4, 2, False, "both"),          # one channel per group, split along positions
    ((2, 16, 3, 3), 1, "silu", 8, 4, False, "both"),      # one group: 16 channel x 2 position chunks
    ((2, 8, 3, 5), 2, "silu", 8, 10, True, "both"),       # channels_last: channels innermost, split
    ((2, 12, 4, 5), 2, "relu", 4, 2, True, "weight"),     # channels_last, 20 position x 2 channel chunks (masked)
    ((2, 8, 3, 5), 2, None, 8, 10**6, True, "none"),      # channels_last, fused, no affine
    ((2, 6), 3, "silu", None, None, False, "both"),       # (N, C): one position
    ((2, 5, 9), 5, None, None, None, False, "none"),      # groups of one channel, no affine
]


@pytest.mark.parametrize("case", GN_CASES, ids=lambda c: f"{c[0]}-G{c[1]}-{c[2]}-t{c[3]}-s{c[4]}-cl{c[5]:d}-{c[6]}")
def test_group_norm_kernels_match_oracle(case):
    shape, groups, act, tile, threshold, channels_last, affine = case
    x = torch.randn(shape, device=DEVICE) * 2 + 3
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w, b = _params(shape[1], affine)
    dy = torch.randn(shape, device=DEVICE)
    p = gk._launch_plan(gk._ncs(x), groups, tile, threshold)
    assert (p.splits > 1) == (threshold is not None and threshold < 1000)  # small thresholds: the split kernels
    y, mean, rstd = gk.forward(x, groups, w, b, 1e-5, act, tile=tile, split_threshold=threshold)
    dx, dw, db = gk.backward(dy, x, groups, w, b, mean, rstd, act, tile=tile, split_threshold=threshold)
    ref, (rdx, rdw, rdb) = _oracle_grads(
        lambda x_, w_, b_: reference.group_norm(x_, groups, w_, b_, 1e-5, activation=act), dy, x, w, b)
    _close(y, ref)
    assert y.stride() == x.stride() and dx.stride() == x.stride()
    _close(dx, rdx)
    _close(dw, rdw)
    _close(db, rdb)
    _close(mean, x.double().reshape(shape[0], groups, -1).mean(-1))


GPU_PLAN = gk.GPU_LIMITS  # the GPU's plan constants (the interpreter's are small)
H100_PROGRAMS = 8 * 132  # PROGRAMS_PER_SM x SMs


def _check_chunks(k, s, p):
    """The chunks of a plan tile the group exactly: whole tiles each, none empty, every value covered."""
    assert p.chunk_c * p.splits_c >= k and (p.splits_c - 1) * p.chunk_c < k
    assert p.chunk_s * p.splits_s >= s and (p.splits_s - 1) * p.chunk_s < s
    assert p.chunk_c % p.block_c == 0 or p.chunk_c == k
    assert p.chunk_s % p.block_s == 0 or p.chunk_s == s
    assert p.splits <= gk.MAX_SPLITS


def test_group_norm_split_plan():
    small = gk.plan(2, 32, 10, 64, False, split_threshold=4096)
    large = gk.plan(2, 32, 10, 4096, False, tile=256, split_threshold=4096)
    assert small.splits == 1 and (small.chunk_c, small.chunk_s) == (10, 64)
    assert large.splits > 1
    _check_chunks(10, 4096, large)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_splits_channels_to_fill_the_gpu(channels_last):
    """GroupNorm(1, 2048) on (8, 2048, 7, 7): 8 groups of 49 positions, formerly 8 programs; now split along
    channels (and positions) into about 8 programs per SM."""
    p = gk.plan(8, 1, 2048, 49, channels_last, programs=H100_PROGRAMS, **GPU_PLAN)
    _check_chunks(2048, 49, p)
    programs = gk.grid(8, 1, p)[0]
    assert H100_PROGRAMS // 2 <= programs <= H100_PROGRAMS
    assert p.splits_c > 1 and p.tile >= GPU_PLAN["min_tile"]
    assert gk.plan(8, 1, 2048, 49, channels_last, programs=1, **GPU_PLAN).splits <= 8  # ~16k values a chunk


@pytest.mark.parametrize("shape", [(1, 64, 9, 9), (3, 20, 1, 37), (2, 48, 5, 1)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_plans_cover_each_group(shape, channels_last):
    n, c, h, w = shape
    for groups in (1, 2, 4):
        for threshold in (4, 16, 64, 10**6):
            p = gk.plan(n, groups, c // groups, h * w, channels_last, tile=16, split_threshold=threshold,
                        programs=32, min_tile=4)
            _check_chunks(c // groups, h * w, p)
            whole = p.block_c >= c // groups and p.block_s >= h * w  # one tile holds the group
            assert (p.splits == 1) == (c // groups * h * w <= threshold or whole)


def test_group_norm_split_by_default_through_autograd():
    """The interpreter's own plan constants split a (2, 32, 5, 5) GroupNorm(2) along channels: the public path
    through autograd takes the split kernels and stays exact."""
    x = (torch.randn(2, 32, 5, 5, device=DEVICE) * 2 + 3).requires_grad_()
    w, b = (torch.randn(32, device=DEVICE).requires_grad_() for _ in range(2))
    if not torch.cuda.is_available():
        assert gk._launch_plan(gk._ncs(x), 2, None, None).splits_c > 1
    y = K.group_norm(x, 2, w, b, 1e-5, activation="silu")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref, (rdx, rdw, rdb) = _oracle_grads(
        lambda x_, w_, b_: reference.group_norm(x_, 2, w_, b_, 1e-5, activation="silu"), dy, x, w, b)
    for actual, expected in ((y, ref), (x.grad, rdx), (w.grad, rdw), (b.grad, rdb)):
        _close(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_group_norm_low_precision(dtype):
    x = (torch.randn(2, 6, 4, 3, device=DEVICE) + 1).to(dtype).requires_grad_()
    w, b = (torch.randn(6, device=DEVICE).requires_grad_() for _ in range(2))  # float32 parameters (AMP)
    y = K.group_norm(x, 3, w, b, 1e-5, activation="silu")
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    ref, (rdx, rdw, rdb) = _oracle_grads(
        lambda x_, w_, b_: reference.group_norm(x_, 3, w_, b_, 1e-5, activation="silu"), dy, x, w, b)
    _close(y, ref, dtype)
    _close(x.grad, rdx, dtype)
    assert w.grad.dtype == torch.float32
    _close(w.grad, rdw, dtype)
    _close(b.grad, rdb, dtype)


# (shape, normalized_shape, max_block, affine)
LN_CASES = [
    ((5, 7), (7,), None, "both"),             # short rows: several rows per program
    ((3, 100), (100,), None, "both"),         # row longer than the block: tiled rows
    ((2, 3, 5, 6), (5, 6), 16, "weight"),     # 2 normalized dims, tiled
    ((2, 2, 3, 5), (2, 3, 5), None, "none"),  # 3 normalized dims, no affine
    ((9, 33), (33,), 16, "both"),             # tiled, several rows per backward program
]


@pytest.mark.parametrize("case", LN_CASES, ids=lambda c: f"{c[0]}-{c[1]}-b{c[2]}-{c[3]}")
def test_layer_norm_kernels_match_oracle(case):
    shape, normalized, max_block, affine = case
    x = torch.randn(shape, device=DEVICE) * 3 + 2
    w = torch.randn(normalized, device=DEVICE) if affine in ("both", "weight") else None
    b = torch.randn(normalized, device=DEVICE) if affine == "both" else None
    dy = torch.randn(shape, device=DEVICE)
    y, mean, rstd = lk.forward(x, normalized, w, b, 1e-5, max_block=max_block)
    dx, dw, db = lk.backward(dy, x, normalized, w, b, mean, rstd, max_block=max_block)
    ref, (rdx, rdw, rdb) = _oracle_grads(lambda x_, w_, b_: reference.layer_norm(x_, normalized, w_, b_), dy, x, w, b)
    _close(y, ref)
    _close(dx, rdx)
    _close(dw, rdw)
    _close(db, rdb)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_low_precision(dtype):
    x = (torch.randn(6, 24, device=DEVICE) + 1).to(dtype).requires_grad_()
    w, b = (torch.randn(24, device=DEVICE, dtype=dtype).requires_grad_() for _ in range(2))
    y = K.layer_norm(x, 24, w, b, 1e-5)
    assert y.dtype == dtype
    dy = torch.randn_like(y)
    y.backward(dy)
    ref, (rdx, rdw, rdb) = _oracle_grads(lambda x_, w_, b_: reference.layer_norm(x_, 24, w_, b_), dy, x, w, b)
    _close(y, ref, dtype)
    _close(x.grad, rdx, dtype)
    assert w.grad.dtype == dtype
    _close(w.grad, rdw, dtype)
    _close(b.grad, rdb, dtype)


GRID_LIMITS = (2**31 - 1, 65535, 65535)  # CUDA: x, y, z


def _assert_launchable(grid):
    assert 1 <= len(grid) <= 3
    assert all(1 <= g <= limit for g, limit in zip(grid, GRID_LIMITS, strict=False)), grid


# GroupNorm shapes (N, C, S) and groups with up to just below 2**31 values (some with 2**31 - 1 groups)
HUGE_GN = [((1, 1, 2**31 - 1), 1), ((2**31 - 1, 1, 1), 1), ((2**30 - 1, 2, 1), 2), ((8, 2048, 2**17 - 1), 32),
           ((65536, 32, 1023), 32), ((1, 2**20, 2047), 1), ((2**15, 2**16 - 1, 1), 3), ((3, 5, 143165576), 5)]


@pytest.mark.parametrize("case", HUGE_GN, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("constants", ["gpu", "interpreter"])
def test_group_norm_grids_of_huge_shapes_fit_cuda(case, channels_last, constants):
    (n, c, s), groups = case
    assert n * c * s < 2**31
    kw = GPU_PLAN if constants == "gpu" else {}
    p = gk.plan(n, groups, c // groups, s, channels_last, programs=H100_PROGRAMS, **kw)
    _check_chunks(c // groups, s, p)
    grid = gk.grid(n, groups, p)
    _assert_launchable(grid)
    assert grid[0] == n * groups * p.splits


@pytest.mark.parametrize("m, d", [(2**31 - 1, 1), (1, 2**31 - 1), (2**20, 2047), (131071, 16384), (65535, 32768),
                                  (2**27 - 1, 16), (3, 715827882)])
@pytest.mark.parametrize("constants", ["gpu", "interpreter"])
def test_layer_norm_grids_of_huge_shapes_fit_cuda(m, d, constants):
    assert m * d < 2**31
    limits = lk.GPU_LIMITS if constants == "gpu" else lk.INTERPRETER_LIMITS
    forward_grid, backward_grid = lk.grids(m, d, 2 * 132, limits=limits)
    _assert_launchable(forward_grid)
    _assert_launchable(backward_grid)
    count, per_program = lk.backward_programs(m, lk.plan(d, backward=True, limits=limits), 2 * 132)
    assert backward_grid == (count,) and count <= 2 * 132
    assert count * per_program >= m and (count - 1) * per_program < m  # every row, no empty program


def test_launch_refuses_a_grid_cuda_cannot_run():
    from normkit.kernels._tuning import check_grid

    assert check_grid((2**31 - 1, 65535, 65535)) == (2**31 - 1, 65535, 65535)
    for grid in ((2**31,), (1, 65536), (1, 1, 65536), (0,), (1, 1, 1, 1)):
        with pytest.raises(ValueError, match="grid"):
            check_grid(grid)


def _stand_in(*shape):
    """A tensor of ``shape`` (2**31 values or more) backed by one float: expanded, nothing allocated."""
    return torch.zeros((1,) * len(shape), device=DEVICE).expand(*shape)


def test_two_to_the_31_values_are_refused():
    assert "2**31" in K.supports_layer_norm(_stand_in(2, 2**30), 2**30)
    assert "2**31" in K.supports_layer_norm(_stand_in(2**31, 1), 1)
    assert K.supports_layer_norm(_stand_in(2, 2**30 - 1), 2**30 - 1) is None  # 2**31 - 2 values
    assert "2**31" in K.supports_group_norm(_stand_in(1, 2, 2**30), 2)  # a sample of 2**31 values
    assert K.supports_group_norm(_stand_in(3, 2, 2**30 - 1), 2) is None  # samples below 2**31: 64-bit bases


def test_two_to_the_31_values_fall_back_to_aten(monkeypatch):
    """On meta tensors (no memory): with the device check waived, the kernels refuse 2**31 values and the
    functionals run torch's ops (meta outputs) instead of the kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets backend_for take a non-CUDA tensor; triton is unaffected
    monkeypatch.setattr(gk, "refusal", lambda x: None)
    monkeypatch.setattr(lk, "refusal", lambda x: None)
    calls_gn, calls_ln = _spy(monkeypatch, "group_norm"), _spy(monkeypatch, "layer_norm")
    x = torch.empty(2, 2**30, device="meta")
    assert "2**31" in K.supports_layer_norm(x, 2**30)
    y = layer_norm(x, 2**30, backend="triton")
    assert y.device.type == "meta" and y.shape == x.shape
    x = torch.empty(1, 4, 2**29, device="meta")
    assert "2**31" in K.supports_group_norm(x, 2)
    y = group_norm(x, 2, backend="triton", activation="silu")
    assert y.device.type == "meta" and y.shape == x.shape
    assert calls_gn == [] and calls_ln == []


def _second_order(fn, *tensors):
    """d/d(inputs) of sum(grad_x(fn) * v): exercises create_graph through the kernels' Function."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    v = torch.linspace(-1, 1, y.numel(), device=y.device, dtype=y.dtype).view_as(y)  # on y's device (GPU too)
    gx = torch.autograd.grad(y, leaves[0], v, create_graph=True)[0]
    (gx * gx).sum().backward()
    return [t.grad for t in leaves]


def test_double_backward_falls_back_to_the_formula():
    """Tensors on DEVICE: CPU tensors reach the kernels only under the interpreter (on a GPU machine they would
    launch Triton on host memory), and the direction ``v`` lives with ``y``."""
    x, w, b = (torch.randn(*shape, device=DEVICE) for shape in ((2, 4, 3), (4,), (4,)))
    ours = _second_order(lambda x_, w_, b_: K.group_norm(x_, 2, w_, b_, 1e-5, activation="silu"), x, w, b)
    theirs = _second_order(lambda x_, w_, b_: reference.group_norm(x_, 2, w_, b_, 1e-5, activation="silu"), x, w, b)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)
    x2, w2 = torch.randn(3, 5, device=DEVICE), torch.randn(5, device=DEVICE)
    ours = _second_order(lambda x_, w_: K.layer_norm(x_, 5, w_, None), x2, w2)
    theirs = _second_order(lambda x_, w_: reference.layer_norm(x_, 5, w_, None), x2, w2)
    for a, e in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


def _spy(monkeypatch, name):
    calls = []
    original = getattr(K, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(K, name, spy)
    return calls


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_public_path_forced_triton(monkeypatch, how):
    calls_gn, calls_ln = _spy(monkeypatch, "group_norm"), _spy(monkeypatch, "layer_norm")
    kw = {"backend": "triton"} if how == "argument" else {}
    if how == "environment":
        monkeypatch.setenv("NORMKIT_BACKEND", "triton")
    x = torch.randn(2, 6, 3, 3, device=DEVICE).contiguous(memory_format=torch.channels_last).requires_grad_()
    gn = torch.nn.GroupNorm(3, 6).to(DEVICE)
    y = group_norm(x, 3, gn.weight, gn.bias, 1e-5, activation="silu", **kw)
    expected = torch.nn.functional.silu(gn(x))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert y.is_contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, gn.weight, gn.bias), dy)
    expected_grads = torch.autograd.grad(expected, (x, gn.weight, gn.bias), dy)
    for a, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5)
    t = torch.randn(3, 4, 10, device=DEVICE)
    torch.testing.assert_close(layer_norm(t, (4, 10), **kw), torch.nn.functional.layer_norm(t, (4, 10)),
                               atol=1e-5, rtol=1e-5)
    assert calls_gn == ["group_norm"] and calls_ln == ["layer_norm"]


def test_modules_under_normkit_backend_triton(monkeypatch):
    monkeypatch.setenv("NORMKIT_BACKEND", "triton")
    calls = _spy(monkeypatch, "layer_norm")
    torch.manual_seed(0)
    ours, theirs = LayerNorm(12).to(DEVICE), torch.nn.LayerNorm(12).to(DEVICE)
    x = torch.randn(2, 3, 12, device=DEVICE, requires_grad=True)
    ours(x).square().sum().backward()
    gx = x.grad.clone()
    x.grad = None
    theirs(x).square().sum().backward()
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    assert calls == ["layer_norm"]
    g = GroupNorm(2, 4).to(DEVICE)
    torch.testing.assert_close(g(torch.ones(2, 4, 3, device=DEVICE) * torch.arange(3.0, device=DEVICE)),
                               torch.nn.GroupNorm(2, 4).to(DEVICE)(torch.ones(2, 4, 3, device=DEVICE)
                                                                   * torch.arange(3.0, device=DEVICE)))


def test_unsupported_calls_fall_back_to_aten(monkeypatch):
    calls_gn, calls_ln = _spy(monkeypatch, "group_norm"), _spy(monkeypatch, "layer_norm")
    x = torch.randn(2, 4, 5, dtype=torch.float64, device=DEVICE)
    assert "float64" in K.supports_group_norm(x, 2)
    assert "float64" in K.supports_layer_norm(x, 5)
    assert "gelu" in K.supports_group_norm(x.float(), 2, "gelu")
    assert K.supports_group_norm(x.float()[:0], 2) == "empty input"
    torch.testing.assert_close(group_norm(x, 2, backend="triton", activation="relu"),
                               torch.relu(torch.nn.functional.group_norm(x, 2)))
    torch.testing.assert_close(layer_norm(x, 5, backend="triton"), torch.nn.functional.layer_norm(x, (5,)))
    assert calls_gn == [] and calls_ln == []
    with pytest.raises(ValueError, match="activation"):
        group_norm(x, 2, activation="gelu")


def test_cpu_without_interpreter_is_not_supported(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 4, 3)
    assert "CUDA" in K.supports_group_norm(x, 2) and "CUDA" in K.supports_layer_norm(x, 3)
    assert torch.equal(group_norm(x, 2), torch.nn.functional.group_norm(x, 2))  # the default stays "cpu"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        layer_norm(x, 3, backend="triton")


def test_activation_on_the_cpu_backend():
    x, w, b = torch.randn(2, 6, 4), torch.randn(6), torch.randn(6)
    for act, fn in (("silu", torch.nn.functional.silu), ("relu", torch.relu), (None, lambda t: t)):
        for backend in ("cpu", "reference"):
            torch.testing.assert_close(group_norm(x, 3, w, b, activation=act, backend=backend),
                                       fn(torch.nn.functional.group_norm(x, 3, w, b)))


def test_package_import_is_light_and_names_are_functions():
    code = ("import sys, normkit.kernels as k, normkit.kernels._group_norm, normkit.kernels._layer_norm, "
            "normkit.kernels._tuning, normkit.kernels._tune_cache; "
            "print('triton' in sys.modules, callable(k.group_norm), callable(k.layer_norm))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True", "True"]
