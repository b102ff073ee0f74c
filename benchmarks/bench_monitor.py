"""Overhead of normkit.diagnostics.Monitor on a small ResNet-style training step, and the docs figure.

    python benchmarks/bench_monitor.py                       # overhead: markdown rows (every=10 and every=1)
    python benchmarks/bench_monitor.py --plot docs/monitor.png   # the figure of docs/diagnostics.md

The overhead compares two identical models side by side (paired, interleaved rounds from runner.py): one bare,
one with a Monitor attached (auto-step: each forward is a step). The figure trains a small CNN on the digits and
shifts the input distribution (contrast x2.5, offset +0.5) at step 150.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from normkit.diagnostics import Monitor

from runner import machine, paired, today

COMMAND = "python benchmarks/bench_monitor.py"


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def small_resnet(channels: int = 16, in_channels: int = 3, classes: int = 10) -> nn.Module:
    """A ResNet-style CNN: stem, three stages of one block each (8 BNs in all), global pool, linear head."""
    return nn.Sequential(
        nn.Conv2d(in_channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
        Block(channels, channels, 1), Block(channels, 2 * channels, 2), Block(2 * channels, 4 * channels, 2),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * channels, classes),
    )


def training_step(model: nn.Module, optimizer, x: torch.Tensor, y: torch.Tensor):
    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def overhead(batch: int, size: int, rounds: int, threads: int | None) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    print("| monitor | model | input | bare step ms | monitored step ms | overhead | machine | date | command |")
    print("|---|---|---|---|---|---|---|---|---|")
    for every in (10, 1):
        bare = small_resnet()
        watched = copy.deepcopy(bare)
        base = training_step(bare, torch.optim.SGD(bare.parameters(), lr=0.01, momentum=0.9), x, y)
        cand = training_step(watched, torch.optim.SGD(watched.parameters(), lr=0.01, momentum=0.9), x, y)
        with Monitor(watched, every=every):
            result = paired(base, cand, rounds=rounds, sample_ms=200.0)
        print(f"| every={every} | small ResNet, 8 BN | {batch}x3x{size}x{size} fp32 | {result.baseline_ms:.2f} | "
              f"{result.candidate_ms:.2f} | {1 / result.speedup - 1:+.1%} | {machine()} | {today()} | "
              f"{COMMAND}{f' --threads {torch.get_num_threads()}' if threads else ''} |")


def figure(path: str, steps: int = 300, shift_at: int = 150) -> None:
    from normkit.data import load_digits

    torch.manual_seed(0)
    data = load_digits()
    images = data.x_train.reshape(-1, 1, 8, 8)
    model = small_resnet(channels=8, in_channels=1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    with Monitor(model, every=2) as monitor:
        for step in range(steps):
            index = torch.randint(0, len(images), (64,), generator=generator)
            x = images[index]
            if step >= shift_at:
                x = x * 2.5 + 0.5  # the injected shift: contrast and offset change
            training_step(model, optimizer, x, data.y_train[index])()
    out = monitor.plot(path)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB): {len(monitor.records)} records, shift at step "
          f"{shift_at}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--plot", metavar="PNG", help="write the docs figure to PNG instead of timing")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.plot:
        figure(args.plot)
    else:
        overhead(args.batch, args.size, args.rounds, args.threads)


if __name__ == "__main__":
    main()
