"""Train a small CNN on the 8x8 digits with DDP and normkit's SyncBatchNorm on 2 CPU processes (gloo), then check
that the synchronized model's running statistics equal those of one process trained on the same global batches.

Run with torchrun::

    torchrun --nproc-per-node 2 examples/ddp_digits.py

or let the script start the processes itself (on 127.0.0.1)::

    python examples/ddp_digits.py --nproc 2

Every step draws one global batch of 64 examples and splits it *unevenly* between the ranks (one step gives rank 0
nothing at all). Each rank's loss is its share of the global mean loss (``sum * world / 64``; DDP averages the
gradients over ranks), so the DDP model takes exactly the steps of a single process on the whole batch. After
training, rank 0 retrains the same model in one process with plain ``normkit.nn.BatchNorm2d`` and prints the
largest differences.

The model runs in float64 by default. In float32 the two runs agree to ~1e-7 for about 30 steps and then drift
apart: not because of the synchronization but because this training is chaotic -- a 1e-7 perturbation of the
initial weights of a *single-process* run grows to ~5e-2 in the weights after 100 steps (``--dtype float32`` shows
it). float64 starts ~1e-16 apart and stays far below any visible difference.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkit
import normkit.tools
from normkit.data import load_digits
from normkit.distributed import DistributedDataParallel

GLOBAL_BATCH = 64


def small_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """Conv-BN-ReLU twice, global average pooling, a linear classifier; plain (single-process) BatchNorm."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Unflatten(1, (1, 8, 8)),
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), normkit.nn.BatchNorm2d(16), torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), normkit.nn.BatchNorm2d(32), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 10),
    ).to(dtype)


def schedule(steps: int, world: int, seed: int = 0):
    """Per step: the indices of the global batch and each rank's share (uneven; step 3 leaves rank 0 empty)."""
    gen = torch.Generator().manual_seed(seed)
    num_train = len(load_digits().y_train)
    for step in range(steps):
        indices = torch.randint(num_train, (GLOBAL_BATCH,), generator=gen)
        cuts = sorted(torch.randint(0, GLOBAL_BATCH + 1, (world - 1,), generator=gen).tolist())
        if step == 3:
            cuts = [0] * (world - 1)
        bounds = [0, *cuts, GLOBAL_BATCH]
        yield indices, [(bounds[r], bounds[r + 1]) for r in range(world)]


def train(model: torch.nn.Module, steps: int, world: int, rank: int | None, lr: float = 0.1):
    """SGD on the schedule's batches: the whole batch when ``rank`` is None, else this rank's share."""
    data = load_digits()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    sizes = []
    for indices, shares in schedule(steps, world):
        start, stop = (0, GLOBAL_BATCH) if rank is None else shares[rank]
        x, y = data.x_train[indices[start:stop]], data.y_train[indices[start:stop]]
        x = x.to(next(model.parameters()).dtype)
        scale = (1 if rank is None else world) / GLOBAL_BATCH  # DDP averages gradients over the ranks
        loss = torch.nn.functional.cross_entropy(model(x), y, reduction="sum") * scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sizes.append(stop - start)
    return sizes


def accuracy(model: torch.nn.Module) -> float:
    data = load_digits()
    model.eval()
    with torch.no_grad():
        x = data.x_test.to(next(model.parameters()).dtype)
        return (model(x).argmax(1) == data.y_test).float().mean().item()


def batch_norms(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def run(steps: int, dtype: torch.dtype) -> None:
    """The body of every rank (the process group is initialised)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = normkit.tools.sync(small_cnn(dtype=dtype))
    ddp = DistributedDataParallel(model)
    start = time.perf_counter()
    sizes = train(ddp, steps, world, rank)
    elapsed = time.perf_counter() - start
    print(f"rank {rank}: {steps} steps in {elapsed:.1f}s, local batch sizes {sizes[:6]}... "
          f"(min {min(sizes)}, max {max(sizes)})", flush=True)
    dist.barrier()
    if rank != 0:
        return
    single = small_cnn(dtype=dtype)
    train(single, steps, world, None)
    print(f"{dtype}, single process ({steps} steps of {GLOBAL_BATCH}): test accuracy {accuracy(single):.4f}")
    print(f"{dtype}, DDP + SyncBatchNorm on {world} ranks:    test accuracy {accuracy(model):.4f}")
    print("layer      max |running_mean diff|  max |running_var diff|  num_batches_tracked (sync, single)")
    for i, (ours, theirs) in enumerate(zip(batch_norms(model), batch_norms(single), strict=True)):
        mean_diff = (ours.running_mean - theirs.running_mean).abs().max().item()
        var_diff = (ours.running_var - theirs.running_var).abs().max().item()
        print(f"bn{i}        {mean_diff:.2e}                 {var_diff:.2e}                "
              f"({ours.num_batches_tracked.item()}, {theirs.num_batches_tracked.item()})")
    weight_diff = max((a - b).abs().max().item()
                      for a, b in zip(model.parameters(), single.parameters(), strict=True))
    print(f"max |parameter diff| after {steps} SGD steps: {weight_diff:.2e}")


def _spawned(rank: int, world: int, port: int, steps: int, dtype: torch.dtype) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        run(steps, dtype)
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100, help="SGD steps (default: 100)")
    parser.add_argument("--nproc", type=int, default=2, help="processes to start without torchrun (default: 2)")
    parser.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                        help="of the model and data (default: float64; see the module docstring)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if "RANK" in os.environ:  # started by torchrun
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
        try:
            run(args.steps, dtype)
        finally:
            dist.destroy_process_group()
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_spawned, args=(args.nproc, port, args.steps, dtype), nprocs=args.nproc)


if __name__ == "__main__":
    main()
