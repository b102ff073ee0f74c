"""GroupNorm / LayerNorm / InstanceNorm on CPU: normkit vs torch eager, side by side.

    python benchmarks/bench_norms.py            # end to end, markdown rows for BENCHMARKS.md

normkit runs torch's own ops behind its front (InstanceNorm without running statistics: ATen's group norm with one
channel per group), so what the table shows is the front's per-call cost, and InstanceNorm's faster route.

Same method as bench_batchnorm.py: paired, interleaved rounds (runner.paired), median of per-round ratios.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

from normkit.nn.instancenorm import InstanceNorm2d
from normkit.nn.normalization import GroupNorm, LayerNorm

from runner import machine, paired, today

# (op, shape, layout)
CASES = [
    ("gn32", (8, 256, 32, 32), "nchw"),
    ("gn32", (8, 256, 32, 32), "channels_last"),
    ("gn32", (2, 320, 64, 64), "nchw"),
    ("gn32", (2, 320, 64, 64), "channels_last"),
    ("ln", (4096, 1024), "-"),
    ("ln", (64, 196, 768), "-"),
    ("in", (8, 64, 64, 64), "nchw"),
]
COMMAND = "python benchmarks/bench_norms.py"


def make_input(shape, layout):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen) * 2 + 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def module_pair(op, shape):
    if op == "gn32":
        ours, theirs = GroupNorm(32, shape[1]), torch.nn.GroupNorm(32, shape[1])
    elif op == "ln":
        ours, theirs = LayerNorm(shape[-1]), torch.nn.LayerNorm(shape[-1])
    else:
        ours, theirs = InstanceNorm2d(shape[1], affine=True), torch.nn.InstanceNorm2d(shape[1], affine=True)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.normal_()
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def _call(module, x, upstream, backward):
    if not backward:
        with torch.no_grad():
            return module(x)
    xi = x.detach().requires_grad_()
    return torch.autograd.grad(module(xi), (xi, module.weight, module.bias), upstream)


def end_to_end(rounds, repeat):
    results: dict[tuple[str, str, str, str], list] = {}
    for attempt in range(repeat):
        for op, shape, layout in CASES:
            x = make_input(shape, layout)
            ours, theirs = module_pair(op, shape)
            upstream = torch.randn_like(x)
            for pass_name in ("fwd", "fwd+bwd"):
                backward = pass_name == "fwd+bwd"
                r = paired(lambda m=theirs, b=backward: _call(m, x, upstream, b),
                           lambda m=ours, b=backward: _call(m, x, upstream, b), rounds=rounds)
                key = (op, pass_name, "x".join(map(str, shape)), layout)
                results.setdefault(key, []).append(r)
                print(f"  [{attempt + 1}/{repeat}] {op:5s} {pass_name:8s} {key[2]:>14s} {layout:13s} torch "
                      f"{r.baseline_ms:7.2f} ms  normkit {r.candidate_ms:7.2f} ms  {r.speedup:.2f}x", file=sys.stderr)
    print("\n| op | shape | layout | dtype | torch ms | normkit ms | speed-up | range over runs | machine | date | "
          "command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (op, pass_name, shape, layout), runs in results.items():
        speedups = sorted(r.speedup for r in runs)
        print(f"| {op} {pass_name} | {shape} | {layout} | fp32 | "
              f"{statistics.median(r.baseline_ms for r in runs):.2f} | "
              f"{statistics.median(r.candidate_ms for r in runs):.2f} | {statistics.median(speedups):.2f}x | "
              f"{speedups[0]:.2f}-{speedups[-1]:.2f}x | {machine()} | {today()} | `{COMMAND} --repeat {repeat}` |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=11, help="timed rounds per measurement (median reported)")
    parser.add_argument("--repeat", type=int, default=2, help="times the whole end-to-end suite runs")
    args = parser.parse_args(argv)
    end_to_end(args.rounds, args.repeat)


if __name__ == "__main__":
    main()
