"""``normkit demo``: the same sigmoid MLP trained with and without batch norm, steps to a target test accuracy.

A small version of the MNIST experiment of Ioffe & Szegedy (2015, section 4.1): three hidden layers of 100
sigmoid units, batch norm after each hidden linear layer (before the sigmoid), plain SGD, mini-batches of 60.
Both arms share the seed, the initial linear weights, the learning rate and the exact sequence of batches; the only
difference is the batch norm layers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from ..data import load_digits
from ..nn import BatchNorm1d

ARMS = ("plain", "batchnorm")
LABELS = {"plain": "without BN", "batchnorm": "with BN"}
HIDDEN = (100, 100, 100)
BATCH_SIZE = 60

Progress = Callable[[str, int, int], None]


def build_mlp(in_features: int, num_classes: int, *, batch_norm: bool, seed: int) -> nn.Sequential:
    """The demo's MLP: ``in -> 100 -> 100 -> 100 -> classes``, sigmoid hidden units, optional batch norm.

    Args:
        in_features: input features.
        num_classes: output logits.
        batch_norm: put a :class:`normkit.nn.BatchNorm1d` after every hidden linear layer, before the sigmoid.
        seed: seed of the initial weights. Batch norm layers draw no random numbers, so both variants built with
            the same seed start from the same linear weights. The global RNG state is left as it was.

    Returns:
        The model, in training mode.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = in_features
        for hidden in HIDDEN:
            layers.append(nn.Linear(width, hidden))
            if batch_norm:
                layers.append(BatchNorm1d(hidden))
            layers.append(nn.Sigmoid())
            width = hidden
        layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def batch_schedule(num_examples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of the training batches: a fresh random permutation every epoch, incomplete last batch dropped.

    Args:
        num_examples: size of the training set.
        batch_size: examples per batch; at most ``num_examples``.
        steps: number of batches to return.
        seed: seed of the permutations.

    Returns:
        ``steps`` int64 tensors of ``batch_size`` indices each.
    """
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_examples // batch_size
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        permutation = torch.randperm(num_examples, generator=generator)
        batches.extend(permutation[: per_epoch * batch_size].split(batch_size))
    return batches[:steps]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``, in eval mode (batch norm uses running statistics)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        correct = (model(x).argmax(dim=1) == y).sum().item()
    model.train(was_training)
    return correct / len(y)


def _validate(steps: int, lr: float, target: float, eval_every: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Expected steps to be a positive int, got {steps!r}. Pass e.g. steps=600.")
    if not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"Expected eval_every to be a positive int, got {eval_every!r}. Pass e.g. eval_every=10.")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"Expected lr to be a positive finite number, got {lr!r}. Pass e.g. lr=2.0.")
    if not (isinstance(target, (int, float)) and 0 < target <= 1):
        raise ValueError(f"Expected target to be a test accuracy in (0, 1], got {target!r}. Pass e.g. target=0.9.")


def _train_arm(arm, split, batches, *, seed, lr, target, eval_every, progress):
    model = build_mlp(split.num_features, split.num_classes, batch_norm=arm == "batchnorm", seed=seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    steps = len(batches)
    curve = [[0, accuracy(model, split.x_test, split.y_test)]]
    start = time.perf_counter()
    for step, indices in enumerate(batches, start=1):
        loss = nn.functional.cross_entropy(model(split.x_train[indices]), split.y_train[indices])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % eval_every == 0 or step == steps:
            curve.append([step, accuracy(model, split.x_test, split.y_test)])
        if progress is not None:
            progress(arm, step, steps)
    seconds = time.perf_counter() - start
    return {
        "label": LABELS[arm],
        "curve": curve,
        "final_accuracy": curve[-1][1],
        "final_loss": loss.item(),
        "steps_to_target": next((step for step, acc in curve if acc >= target), None),
        "seconds": seconds,
    }


def run_demo(
    steps: int = 600,
    seed: int = 0,
    lr: float = 2.0,
    target: float = 0.9,
    eval_every: int = 10,
    progress: Progress | None = None,
) -> dict:
    """Train the demo MLP with and without batch norm on the digits and measure the steps to ``target``.

    The default learning rate is chosen for the arm *without* batch norm: on this problem it learns fastest around
    ``lr`` 2 to 4 (at 0.5 it barely moves in 600 steps; at 6 and above it often stalls at chance), and batch norm
    gets the same value. Without batch norm the network needs on the order of 1000 or more steps to reach 0.9, so
    with the default 600 steps expect ``steps_to_target`` of ``None`` for that arm and only a lower bound on the
    ratio; pass ``steps=2000`` to measure it.

    Args:
        steps: SGD steps per arm (default 600).
        seed: seed of the split, the initial weights and the batch order (default 0).
        lr: SGD learning rate, the same for both arms (default 2.0).
        target: test accuracy whose first crossing is reported (default 0.9).
        eval_every: evaluate the test accuracy every this many steps, and after the last one (default 10).
        progress: called as ``progress(arm, step, steps)`` after every step, e.g. to drive a progress bar.

    Returns:
        Plain data (JSON-serializable): ``config``; ``arms``, mapping ``"plain"`` and ``"batchnorm"`` to their
        ``label``, ``curve`` (``[step, test accuracy]`` pairs from step 0), ``final_accuracy``, ``final_loss``
        (last training batch), ``steps_to_target`` (first evaluated step at or above ``target``, or ``None``) and
        ``seconds`` of training; ``ratio``, the steps to target without batch norm divided by those with it
        (``None`` unless both arms reach it); ``ratio_lower_bound``, ``steps / steps_to_target`` of the batch norm
        arm when only that arm reaches the target, else ``None``; and ``elapsed_s``, all included.

    Examples:
        >>> result = run_demo(steps=20, eval_every=10)
        >>> sorted(result["arms"]), [step for step, _ in result["arms"]["plain"]["curve"]]
        (['batchnorm', 'plain'], [0, 10, 20])
    """
    _validate(steps, lr, target, eval_every)
    start = time.perf_counter()
    split = load_digits(seed=seed)
    batches = batch_schedule(len(split.y_train), BATCH_SIZE, steps, seed)
    arms = {
        arm: _train_arm(arm, split, batches, seed=seed, lr=lr, target=target, eval_every=eval_every, progress=progress)
        for arm in ARMS
    }
    plain, bn = arms["plain"]["steps_to_target"], arms["batchnorm"]["steps_to_target"]
    both = plain is not None and bn is not None
    return {
        "config": {
            "dataset": "sklearn digits 8x8, pixels / 16",
            "train_size": len(split.y_train),
            "test_size": len(split.y_test),
            "model": "MLP " + "-".join(map(str, (split.num_features, *HIDDEN, split.num_classes))) + ", sigmoid",
            "optimizer": "SGD",
            "lr": lr,
            "batch_size": BATCH_SIZE,
            "steps": steps,
            "seed": seed,
            "target": target,
            "eval_every": eval_every,
        },
        "arms": arms,
        "ratio": plain / max(bn, 1) if both else None,
        "ratio_lower_bound": steps / max(bn, 1) if plain is None and bn is not None else None,
        "elapsed_s": time.perf_counter() - start,
    }


def conclusion(result: dict) -> str:
    """One plain-language sentence that says what the numbers of :func:`run_demo` show, whichever way they went.

    Args:
        result: the dict returned by :func:`run_demo`.

    Returns:
        The sentence, without a trailing newline.
    """
    steps, target = result["config"]["steps"], result["config"]["target"]
    plain, bn = (result["arms"][arm] for arm in ARMS)
    reached = f"{target:.0%} test accuracy"
    if plain["steps_to_target"] is not None and bn["steps_to_target"] is not None:
        ratio = result["ratio"]
        if plain["steps_to_target"] > bn["steps_to_target"]:
            verdict = f"batch norm needed {ratio:.1f}x fewer steps"
        elif plain["steps_to_target"] < bn["steps_to_target"]:
            verdict = f"batch norm was slower here ({1 / ratio:.1f}x more steps)"
        else:
            verdict = "no difference in speed"
        return (
            f"With BN the network reached {reached} in {bn['steps_to_target']} steps, without BN in "
            f"{plain['steps_to_target']}: {verdict} at the same learning rate."
        )
    if bn["steps_to_target"] is not None:
        return (
            f"With BN the network reached {reached} in {bn['steps_to_target']} steps; without BN it did not within "
            f"{steps} steps (final {plain['final_accuracy']:.1%}), so BN needed over "
            f"{result['ratio_lower_bound']:.0f}x fewer steps. Run longer (--steps) to measure the ratio."
        )
    if plain["steps_to_target"] is not None:
        return (
            f"Without BN the network reached {reached} in {plain['steps_to_target']} steps; with BN it did not "
            f"within {steps} steps (final {bn['final_accuracy']:.1%}): batch norm did not help here."
        )
    return (
        f"Neither network reached {reached} within {steps} steps (final {bn['final_accuracy']:.1%} with BN, "
        f"{plain['final_accuracy']:.1%} without); run longer (--steps) to compare."
    )
