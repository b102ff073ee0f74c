"""Online learning, one sample per training step: StreamingBatchNorm1d against the same MLP without a norm.

    python examples/streaming_digits.py

Linear(64, 32) -> [StreamingBatchNorm1d(32)] -> ReLU -> Linear(32, 10), SGD lr 0.05, one digit per step over the
first 400 training digits of ``normkit.data.load_digits()``, seed 0. ``normkit.BatchNorm1d`` refuses such a batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from normkit.data import load_digits
from normkit.nn import BatchNorm1d, StreamingBatchNorm1d

STEPS = 400


def run(norm) -> tuple[float, float, bool, float]:
    """(mean loss of the first 50 steps, of the last 50, every loss finite, eval test accuracy)."""
    data = load_digits()
    torch.manual_seed(0)
    layers = [torch.nn.Linear(64, 32), *([norm(32)] if norm else []), torch.nn.ReLU(), torch.nn.Linear(32, 10)]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for i in range(STEPS):
        loss = F.cross_entropy(model(data.x_train[i:i + 1]), data.y_train[i:i + 1])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        accuracy = (model(data.x_test).argmax(1) == data.y_test).float().mean().item()
    return sum(losses[:50]) / 50, sum(losses[-50:]) / 50, all(map(math.isfinite, losses)), accuracy


def main() -> None:
    print("| model | mean loss, first 50 steps | mean loss, last 50 steps | losses finite | test accuracy |")
    print("|---|---|---|---|---|")
    for name, norm in (("with StreamingBatchNorm1d", StreamingBatchNorm1d), ("same MLP, no normalization", None)):
        first, last, finite, accuracy = run(norm)
        print(f"| {name} | {first:.3f} | {last:.3f} | {finite} | {accuracy:.3f} |")
    try:
        BatchNorm1d(32)(torch.randn(1, 32))
    except ValueError as error:
        print(f"\nnormkit.BatchNorm1d on a (1, 32) batch: {str(error).split(';')[0]}")


if __name__ == "__main__":
    main()
