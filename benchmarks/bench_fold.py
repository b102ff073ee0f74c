"""Eval inference of a small ResNet before and after normkit.tools.fold, and recalibration throughput.

    python benchmarks/bench_fold.py                  # both tables (markdown rows)
    python benchmarks/bench_fold.py --only fold      # or --only recalibrate

Fold: the same eval model unfolded (baseline) and folded (candidate), timed in paired, interleaved rounds (runner.py)
under ``torch.inference_mode()``, for torch's and normkit's BatchNorm2d, at a throughput batch and at batch 1.
Recalibrate: ``torch.optim.swa_utils.update_bn`` (baseline) against ``recalibrate`` with each estimator (candidate)
over the same batches; samples/s = samples per call / median time per call.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import normkit
from normkit.tools.fold import fold
from normkit.tools.recalibrate import recalibrate

from runner import machine, paired, today

COMMAND = "python benchmarks/bench_fold.py"
THREADS_SET = False


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.skip(x))


def small_resnet(bn=nn.BatchNorm2d, channels: int = 16, classes: int = 10) -> nn.Module:
    """The small ResNet of bench_monitor.py (stem + three basic blocks, 9 BNs), with a choice of batch norm."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, 1, 1, bias=False), bn(channels), nn.ReLU(),
        Block(channels, channels, 1, bn), Block(channels, 2 * channels, 2, bn),
        Block(2 * channels, 4 * channels, 2, bn),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * channels, classes),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    return model.eval()


def command(only: str) -> str:
    threads = f" --threads {torch.get_num_threads()}" if THREADS_SET else ""
    return f"{COMMAND} --only {only}{threads}"


def inference(model: nn.Module, x: torch.Tensor):
    def run() -> None:
        with torch.inference_mode():
            model(x)

    return run


def bench_fold(size: int, rounds: int) -> None:
    print("| fold | model | input | unfolded ms | folded ms | speed-up | max abs diff | machine | date | command |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, bn in (("torch", nn.BatchNorm2d), ("normkit", normkit.BatchNorm2d)):
        model = small_resnet(bn)
        folded, report = fold(model, report=True)
        layers = f"{len(report.folded)}/{len(report.folded) + len(report.kept)}"
        for batch in (32, 1):
            x = torch.randn(batch, 3, size, size)
            with torch.inference_mode():
                diff = (folded(x) - model(x)).abs().max().item()
            result = paired(inference(model, x), inference(folded, x), rounds=rounds, sample_ms=50.0)
            print(f"| eval forward, {name} BN | small ResNet, {layers} BN folded | "
                  f"{batch}x3x{size}x{size} fp32 | {result.baseline_ms:.3f} | {result.candidate_ms:.3f} | "
                  f"{result.speedup:.2f}x | {diff:.1e} | {machine()} | {today()} | {command('fold')} |")


def bench_recalibrate(size: int, batches: int, batch: int, rounds: int) -> None:
    torch.manual_seed(0)
    data = [torch.randn(batch, 3, size, size) for _ in range(batches)]
    samples = batches * batch
    print("| recalibrate | model | data | update_bn ms | normkit ms | update_bn samples/s | normkit samples/s | "
          "speed-up | machine | date | command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for estimator in ("population", "mean_of_batches"):
        model = small_resnet(normkit.BatchNorm2d)
        theirs = small_resnet(normkit.BatchNorm2d)
        result = paired(lambda: torch.optim.swa_utils.update_bn(data, theirs),
                        lambda: recalibrate(model, data, estimator=estimator, progress=False),
                        rounds=rounds, warmup_s=1.0, sample_ms=1.0)
        print(f"| {estimator} | small ResNet, 9 normkit BN | {batches} x {batch}x3x{size}x{size} fp32 | "
              f"{result.baseline_ms:.1f} | {result.candidate_ms:.1f} | {samples / result.baseline_ms * 1e3:,.0f} | "
              f"{samples / result.candidate_ms * 1e3:,.0f} | {result.speedup:.2f}x | {machine()} | {today()} | "
              f"{command('recalibrate')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("fold", "recalibrate"))
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        global THREADS_SET
        torch.set_num_threads(args.threads)
        THREADS_SET = True
    if args.only in (None, "fold"):
        bench_fold(args.size, args.rounds)
    if args.only in (None, "recalibrate"):
        bench_recalibrate(args.size, args.batches, args.batch, args.rounds)


if __name__ == "__main__":
    main()
