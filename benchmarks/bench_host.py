"""Host side of normkit's Triton batch norm: launches per training step and the Python time around them.

    TRITON_INTERPRET=1 python benchmarks/bench_host.py            # on CPU (what CI runs): the kernels' host code
    python benchmarks/bench_host.py --device cuda                  # on a GPU: the same, on CUDA tensors
    python benchmarks/bench_host.py --rounds 41 --shape 8 16 8 8   # more rounds, another tiny shape

A ``normkit.BatchNorm2d`` training forward+backward on the Triton path (``backend="triton"``) is run once with
every launch counted: Triton kernel launches through the launch hook (``normkit.kernels._bn_launch.LAUNCH``) and
ATen ops that launch work on a device, through a ``TorchDispatchMode`` (allocations, views and metadata ops
launch nothing and are not counted). Then its host time is measured with the Triton launches replaced by no-ops,
against torch's CPU ``BatchNorm2d`` forward+backward on the same tiny shape in the same run (interleaved rounds,
median of per-round ratios). torch's CPU layer on a tiny input is nearly all host time, so the ratio says how much
Python normkit adds around its kernels. What is not in it: Triton's own launcher (argument binding, cache lookup),
which runs inside the replaced call; a GPU run's CUDA-graph timings in ``gpu_check`` show that part.

Last line, exactly: ``host: launches N, normkit/torch host time R.RRx``. Goals (issue 13): N <= 4, R <= 1.5.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import normkit

from runner import interleaved, machine, today

COMMAND = "TRITON_INTERPRET=1 python benchmarks/bench_host.py"
# ATen ops that launch no device work: allocation, views, metadata.
NO_LAUNCH = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "view", "_unsafe_view",
             "as_strided", "reshape", "expand", "t", "detach", "alias", "unsqueeze", "squeeze", "permute",
             "transpose", "slice", "select", "_reshape_alias", "lift_fresh", "is_same_size", "set_", "sym_size",
             "sym_stride", "sym_numel", "sym_storage_offset", "resize_"}


class AtenLaunches(TorchDispatchMode):
    """Records every ATen op that would launch device work."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in NO_LAUNCH:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def _step(layer, x, grad):
    """One training forward+backward; gradients set to ``None`` first, so autograd steals rather than adds."""
    layer.weight.grad = layer.bias.grad = x.grad = None
    layer(x).backward(grad)


def count_launches(layer, x, grad) -> tuple[list[str], list[str]]:
    """``(triton kernel names, aten op names)`` launched by one training step."""
    return count(lambda: _step(layer, x, grad))


def count(fn) -> tuple[list[str], list[str]]:
    """``(triton kernel names, aten op names)`` launched by ``fn()``."""
    from normkit.kernels import _bn_launch

    kernels: list[str] = []
    original = _bn_launch.LAUNCH

    def record(kernel, grid, args, options):
        kernels.append(getattr(kernel, "__name__", None) or kernel.fn.__name__)
        with _disable_current_modes():  # the interpreter's own copies are not the kernel's launches
            original(kernel, grid, args, options)

    _bn_launch.LAUNCH = record
    try:
        with AtenLaunches() as aten:
            fn()
    finally:
        _bn_launch.LAUNCH = original
    return kernels, aten.ops


def host_ratio(layer, torch_layer, x, grad, rounds: int):
    """Interleaved host times (ms per step) of normkit's step with no-op launches and torch's CPU step."""
    from normkit.kernels import _bn_launch

    x_cpu, grad_cpu = x.detach().cpu().requires_grad_(), grad.cpu()
    original = _bn_launch.LAUNCH
    _bn_launch.LAUNCH = lambda kernel, grid, args, options: None
    try:
        result = interleaved({"torch": lambda: _step(torch_layer, x_cpu, grad_cpu),
                              "normkit": lambda: _step(layer, x, grad)}, rounds=rounds, warmup=20)
    finally:
        _bn_launch.LAUNCH = original
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (under TRITON_INTERPRET=1) or cuda")
    parser.add_argument("--shape", type=int, nargs=4, default=(8, 16, 8, 8), metavar=("N", "C", "H", "W"))
    parser.add_argument("--rounds", type=int, default=21)
    args = parser.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        print("bench_host: on CPU the Triton path needs TRITON_INTERPRET=1 (set before triton is imported): "
              f"{COMMAND}", file=sys.stderr)
        return 2
    threads, backend = torch.get_num_threads(), os.environ.get("NORMKIT_BACKEND")
    torch.set_num_threads(1)  # both left as they were found (the test suite calls main)
    os.environ["NORMKIT_BACKEND"] = "triton"
    try:
        torch.manual_seed(0)
        shape, channels = tuple(args.shape), args.shape[1]
        layer = normkit.BatchNorm2d(channels).to(args.device)
        torch_layer = torch.nn.BatchNorm2d(channels)
        x = torch.randn(shape, device=args.device).requires_grad_()
        grad = torch.randn(shape, device=args.device)
        _step(layer, x, grad)  # compile (or interpret) once before counting
        kernels, aten = count_launches(layer, x, grad)
        result = host_ratio(layer, torch_layer, x, grad, args.rounds)
        where = machine()
    finally:
        torch.set_num_threads(threads)
        if backend is None:
            del os.environ["NORMKIT_BACKEND"]
        else:
            os.environ["NORMKIT_BACKEND"] = backend
    ratio = result.ratio("normkit", "torch")
    print(f"# bench_host: {today()}, {where}, device {args.device}, shape {shape}, `{COMMAND}`")
    print(f"triton launches: {len(kernels)} ({', '.join(kernels)})")
    print(f"aten launches: {len(aten)} ({', '.join(aten) or 'none'})")
    print(f"host time per training step: normkit {result.median('normkit') * 1e3:.0f} us (launches as no-ops), "
          f"torch CPU BatchNorm2d {result.median('torch') * 1e3:.0f} us (median of {args.rounds} rounds)")
    print(f"host: launches {len(kernels) + len(aten)}, normkit/torch host time {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
