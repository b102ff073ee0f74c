"""The Triton batch norm's host side: launches per step, the state the kernels move themselves, the ops that
compilers and fake tensors trace, and CUDA_PLAN (which CUDA calls take the kernels by default).

On CPU the kernels run under Triton's interpreter (conftest sets ``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import normkit
from normkit.functional import _dispatch

pytest.importorskip("triton")
kernels = pytest.importorskip("normkit.kernels")
DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NONFINITE = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) warns on inf - inf


@pytest.fixture
def bench_host(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import bench_host

    return bench_host


@pytest.fixture
def triton_backend(monkeypatch):
    monkeypatch.setenv("NORMKIT_BACKEND", "triton")


def _pair(cls=torch.nn.BatchNorm2d, ours=normkit.BatchNorm2d, channels=3, **kwargs):
    theirs = cls(channels, **kwargs).to(DEVICE)
    mine = ours(channels, **kwargs).to(DEVICE)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5)
        theirs.bias.uniform_(-1, 1)
    mine.load_state_dict(theirs.state_dict())
    return theirs, mine


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_training_step_is_four_launches_and_no_aten_op(bench_host, triton_backend, channels_last):
    layer = normkit.BatchNorm2d(4).to(DEVICE)
    x = torch.randn(3, 4, 5, 6, device=DEVICE)
    x = x.to(memory_format=torch.channels_last) if channels_last else x
    x.requires_grad_()
    bench_host._step(layer, x, torch.randn_like(x))  # the first call allocates the zeroed ticket counters
    triton, aten = bench_host.count_launches(layer, x, torch.randn_like(x))
    kind = "rows" if channels_last else "planes"
    assert triton == [f"moments_{kind}", "normalize", f"grad_sums_{kind}", "grad_input"]
    assert aten == []  # running statistics, counter, affine gradients: all inside the kernels
    assert int(layer.num_batches_tracked) == 2
    layer.eval()
    assert bench_host.count(lambda: layer(x.detach())) == (["normalize"], [])


def test_add_relu_backward_reads_the_bitmask_not_the_residual(bench_host, triton_backend):
    """BN+add+ReLU in training: the forward writes ReLU's sign bits, the backward reads them instead of the residual
    (6 element passes instead of 7), and the result is the fused closed form's."""
    from normkit.kernels import _bn_launch

    layer = normkit.nn.BatchNormAct2d(4, act="relu").to(DEVICE)
    x = torch.randn(2, 4, 3, 5, device=DEVICE, requires_grad=True)
    residual = torch.randn_like(x, requires_grad=True)
    options = []
    original = _bn_launch.LAUNCH
    _bn_launch.LAUNCH = lambda kernel, grid, args, opts: (options.append(opts), original(kernel, grid, args, opts))
    try:
        layer(x, residual).backward(torch.ones_like(x))
    finally:
        _bn_launch.LAUNCH = original
    normalize, grad_sums, grad_input = options[1], options[2], options[3]
    assert normalize["WRITE_BITS"] and grad_sums["RELU_BITS"] and not grad_sums["HAS_RES"]
    assert grad_input["DZ_GIVEN"] and not grad_input["HAS_RES"]
    reference = normkit.nn.BatchNormAct2d(4, act="relu").to(DEVICE)
    xr, rr = x.detach().clone().requires_grad_(), residual.detach().clone().requires_grad_()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NORMKIT_BACKEND", "cpu")
        reference(xr, rr).backward(torch.ones_like(xr))
    torch.testing.assert_close(x.grad, xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(residual.grad, rr.grad)
    torch.testing.assert_close(layer.weight.grad, reference.weight.grad, atol=1e-5, rtol=1e-5)


def test_bench_host_prints_its_line(bench_host, capsys):
    assert bench_host.main(["--rounds", "3", "--shape", "2", "3", "4", "4", "--device", DEVICE]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"host: launches 4, normkit/torch host time \d+\.\d\dx", last), last


@NONFINITE
@pytest.mark.parametrize("nonfinite", ["skip", "propagate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_moves_the_running_statistics_and_the_counter_as_torch_does(triton_backend, nonfinite, dtype):
    """Three training steps, channel 2 of the second batch holding an inf: channels 0-1 move as torch's, channel 2
    as torch's fed only the finite batches ("skip") or as torch's, inf/NaN included ("propagate")."""
    theirs, mine = _pair(momentum=0.3)
    skipping = torch.nn.BatchNorm2d(3, momentum=0.3).to(DEVICE).to(dtype)
    mine.nonfinite = nonfinite
    theirs, mine = theirs.to(dtype), mine.to(dtype)
    for step in range(3):
        x = (torch.randn(4, 3, 2, 5, device=DEVICE) * 2 + 1).to(dtype)
        if step == 1:
            x[0, 2, 0, 0] = float("inf")
        else:
            skipping(x)
        ours, ref = mine(x), theirs(x)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(ours[:, :2], ref[:, :2], atol=tol, rtol=tol)
    assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    assert mine.running_mean.dtype == mine.running_var.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    for ours, ref, finite_only in ((mine.running_mean, theirs.running_mean, skipping.running_mean),
                                   (mine.running_var, theirs.running_var, skipping.running_var)):
        torch.testing.assert_close(ours[:2], ref[:2], atol=tol, rtol=tol)
        if nonfinite == "skip":
            torch.testing.assert_close(ours[2], finite_only[2], atol=tol, rtol=tol)
        else:  # propagated: not finite (torch's Welford may give inf where the shifted sums give NaN)
            assert not torch.isfinite(ours[2]) and not torch.isfinite(ref[2])


def test_fake_tensors_trace_the_ops_with_torchs_output_layout():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(4, 3, 5, 5, device=DEVICE).to(memory_format=torch.channels_last)
        rm, rv = torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE)
        y, mean, var = kernels.batch_norm_train(x, None, None, 1e-5, running_mean=rm, running_var=rv)
        assert y.shape == x.shape and y.is_contiguous(memory_format=torch.channels_last)
        assert mean.shape == var.shape == (3,) and mean.dtype == torch.float32
        assert kernels.batch_norm_eval(x, rm, rv, None, None, 1e-5, activation="relu").shape == x.shape


# torch's Dynamo instantiates torch.autograd.Function itself while tracing any autograd.Function (torch 2.13 warns)
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize("act", [None, "relu"])
def test_compile_fullgraph_runs_the_kernels_inside_the_graph(triton_backend, act):
    """torch.compile(fullgraph=True) traces the custom ops (no graph break) and the compiled step matches eager:
    output, gradients, running statistics and the counter."""
    torch._dynamo.reset()
    layers = [normkit.nn.BatchNormAct2d(3, act=act, momentum=0.2).to(DEVICE) for _ in range(2)]
    layers[1].load_state_dict(layers[0].state_dict())
    x = torch.randn(4, 3, 3, 5, device=DEVICE)
    residual, seed = torch.randn_like(x), torch.randn_like(x)

    def step(layer, x, residual):
        return (layer(x, residual) * seed).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for layer, fn in zip(layers, (step, compiled), strict=True):
        xi = x.clone().requires_grad_()
        loss = fn(layer, xi, residual)
        loss.backward()
        results.append((loss.detach(), xi.grad, layer.weight.grad, layer.running_mean, layer.running_var,
                        layer.num_batches_tracked))
    for eager, traced in zip(*results, strict=True):
        torch.testing.assert_close(traced, eager, atol=1e-4, rtol=1e-4)
    layers[1].eval()
    eval_compiled = torch.compile(lambda x: layers[1](x), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(eval_compiled(x), layers[0].eval()(x))


def test_cuda_plan_is_empty_until_a_gpu_run_measures_and_never_applies_off_cuda(monkeypatch):
    assert _dispatch.CUDA_PLAN == {}  # nothing measured on a GPU yet: every CUDA call runs torch's kernels
    x = torch.randn(8, 16, 4, 4)
    assert _dispatch.cuda_plan_key("batch_norm_train", x) == ("batch_norm_train", "nchw", "float32", "small")
    cl = torch.randn(64, 64, 32, 32).to(memory_format=torch.channels_last)
    assert _dispatch.cuda_plan_key("batch_norm_eval", cl) == ("batch_norm_eval", "channels_last", "float32", "large")
    assert _dispatch.cuda_plan_key("layer_norm", x.half())[1:3] == ("rows", "float16")
    monkeypatch.setitem(_dispatch.CUDA_PLAN, ("batch_norm_train", "nchw", "float32", "small"), "triton")
    monkeypatch.delenv("NORMKIT_BACKEND", raising=False)
    assert not _dispatch.planned("batch_norm_train", x)  # a CPU tensor
    assert _dispatch.backend_for(x, op="batch_norm_train") == "cpu"


DIGEST = """
import hashlib, os, torch, normkit
os.environ["NORMKIT_BACKEND"] = "triton"
torch.manual_seed(0)
layer = normkit.nn.BatchNormAct2d(6, act="relu").to("{device}")
x = torch.randn(4, 6, 5, 7, device="{device}", requires_grad=True)
residual = torch.randn_like(x)
y = layer(x, residual)
y.backward(torch.randn_like(y))
parts = (y, x.grad, layer.weight.grad, layer.bias.grad, layer.running_mean, layer.running_var)
print(hashlib.sha256(b"".join(t.detach().cpu().numpy().tobytes() for t in parts)).hexdigest())
"""


def test_two_processes_get_the_same_bits():
    """No launch choice depends on timing and every reduction merges in a fixed order: a training step gives the
    same bits in a fresh process (output, gradients, running statistics)."""
    import subprocess
    import sys

    code = DIGEST.format(device=DEVICE)
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=os.environ.copy(), timeout=300).stdout.strip() for _ in range(2)}
    assert len(digests) == 1 and len(next(iter(digests))) == 64, digests
