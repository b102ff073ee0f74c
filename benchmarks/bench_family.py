"""The family's training cost relative to plain BatchNorm: forward + backward, side by side in one run.

    python benchmarks/bench_family.py

Each row times a training step (forward, then backward of the sum) of one layer against ``normkit.BatchNorm2d`` on
the same input, with ``runner.paired`` (alternating calls, median of per-round ratios). The cross-iteration row
includes the 3x3 convolution it compensates for, and so does its baseline.
"""

from __future__ import annotations

import torch

import normkit.nn as nkn

from runner import machine, paired, today

COMMAND = "python benchmarks/bench_family.py"


def step(module, x, residual=None):
    xi = x.detach().requires_grad_()
    out = module(xi) if residual is None else module(xi, residual)
    out.sum().backward()


def main(rounds: int = 15) -> None:
    torch.manual_seed(0)
    x = torch.randn(32, 64, 28, 28)
    residual = torch.randn_like(x)
    bn = nkn.BatchNorm2d(64)
    members = {
        "act": nkn.BatchNormAct2d(64, act="silu"),
        "renorm": nkn.BatchRenorm2d(64, warmup_steps=0),
        "ghost": nkn.GhostBatchNorm2d(64, 8),
        "ghost_strided": nkn.GhostBatchNorm2d(64, 8, grouping="strided"),
        "streaming": nkn.StreamingBatchNorm2d(64),
    }
    with_silu = torch.nn.Sequential(bn, torch.nn.SiLU())
    rows = [
        ("BatchNormAct2d(silu) + residual", "silu(BatchNorm2d(x) + r)",
         lambda: step(members["act"], x, residual), lambda: step(with_silu, x + residual)),
        ("BatchRenorm2d (warmup_steps=0)", "BatchNorm2d", lambda: step(members["renorm"], x), lambda: step(bn, x)),
        ("GhostBatchNorm2d(64, 8), contiguous", "BatchNorm2d", lambda: step(members["ghost"], x),
         lambda: step(bn, x)),
        ("GhostBatchNorm2d(64, 8), strided", "BatchNorm2d", lambda: step(members["ghost_strided"], x),
         lambda: step(bn, x)),
        ("StreamingBatchNorm2d", "BatchNorm2d", lambda: step(members["streaming"], x), lambda: step(bn, x)),
    ]
    conv = torch.nn.Conv2d(32, 64, 3, padding=1, bias=False)
    small = torch.randn(8, 32, 32, 32)
    cbn = nkn.CrossIterationBatchNorm2d(64, window=4, weight_of=conv)
    rows.append(("conv + CrossIterationBatchNorm2d(window=4)", "conv + BatchNorm2d",
                 lambda: step(torch.nn.Sequential(conv, cbn), small),
                 lambda: step(torch.nn.Sequential(conv, bn), small)))
    print("| layer | baseline | input | baseline ms | layer ms | cost vs baseline | machine | date | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, baseline_name, layer, baseline in rows:
        r = paired(baseline, layer, rounds=rounds)
        shape = "8x32x32x32" if "conv" in name else "32x64x28x28"
        print(f"| {name} | {baseline_name} | {shape} | {r.baseline_ms:.2f} | {r.candidate_ms:.2f} | "
              f"{1 / r.speedup:.2f}x | {machine()} | {today()} | `{COMMAND}` |")


if __name__ == "__main__":
    main()
