"""Per-call cost: normkit's modules against torch's on tiny tensors, where the Python around the kernel is the cost.

    python benchmarks/bench_overhead.py               # markdown rows for BENCHMARKS.md
    python benchmarks/bench_overhead.py --rounds 41   # more rounds on a noisy machine

One torch thread (the kernels take a few microseconds; threads would only add noise). Each row times torch's and
normkit's module on the same input in interleaved rounds and reports the median per-call times and the median of
the per-round ratios (normkit / torch; 1.00x is the same cost). Goal (issue 12): at most 1.25x on every row.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from torch import nn

import normkit

from runner import interleaved, machine, today

COMMAND = "python benchmarks/bench_overhead.py"
GOAL = 1.25


def cases():
    """(row name, torch module, normkit module, input shape, backward?)."""
    bn = (nn.BatchNorm2d(8), normkit.BatchNorm2d(8), (4, 8, 5, 5))
    return [
        ("BatchNorm2d train fwd", *bn, False),
        ("BatchNorm2d eval fwd", nn.BatchNorm2d(8).eval(), normkit.BatchNorm2d(8).eval(), (4, 8, 5, 5), False),
        ("BatchNorm2d train fwd+bwd", *bn, True),
        ("BatchNorm1d train fwd+bwd", nn.BatchNorm1d(16), normkit.BatchNorm1d(16), (8, 16), True),
        ("GroupNorm fwd", nn.GroupNorm(2, 8), normkit.nn.GroupNorm(2, 8), (4, 8, 5, 5), False),
        ("GroupNorm fwd+bwd", nn.GroupNorm(2, 8), normkit.nn.GroupNorm(2, 8), (4, 8, 5, 5), True),
        ("LayerNorm fwd", nn.LayerNorm(16), normkit.nn.LayerNorm(16), (8, 16), False),
        ("LayerNorm fwd+bwd", nn.LayerNorm(16), normkit.nn.LayerNorm(16), (8, 16), True),
        ("InstanceNorm2d fwd+bwd", nn.InstanceNorm2d(8), normkit.nn.InstanceNorm2d(8), (4, 8, 5, 5), True),
    ]


def _call(module, x, backward):
    if not backward:
        def forward():
            with torch.no_grad():
                return module(x)
        return forward
    xi = x.detach().requires_grad_()

    def forward_backward():
        module(xi).sum().backward()
    return forward_backward


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=31, help="interleaved rounds per row (median reported)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ratios = []
    print("| call | torch µs | normkit µs | normkit / torch | machine | date | command |")
    print("|---|---|---|---|---|---|---|")
    for name, theirs, ours, shape, backward in cases():
        theirs.load_state_dict(ours.state_dict())
        x = torch.randn(shape)
        timing = interleaved({"torch": _call(theirs, x, backward), "normkit": _call(ours, x, backward)},
                             rounds=args.rounds, warmup=50, sample_ms=20.0, max_repeats=100_000)
        ratio = timing.ratio("normkit", "torch")  # median over rounds of normkit / torch
        ratios.append(ratio)
        print(f"| {name} | {timing.median('torch') * 1e3:.1f} | {timing.median('normkit') * 1e3:.1f} | "
              f"{ratio:.2f}x | {machine()} | {today()} | `{COMMAND}` |")
    worst = max(ratios)
    print(f"\nworst {worst:.2f}x, median {statistics.median(ratios):.2f}x (goal: at most {GOAL:.2f}x)", file=sys.stderr)


if __name__ == "__main__":
    main()
