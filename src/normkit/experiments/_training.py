"""What the experiments share: small models with a pluggable norm layer, one seeded training loop, mean and std.

Every experiment trains with this loop so that arms differ only in what the experiment varies: the seed fixes the
initial weights, the batch order and the dropout masks, and the same seed gives the same numbers on the same machine.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..data import Split
from ..nn import norm_layer

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


def _norm(spec: str | None, features: int, dim: int) -> list[nn.Module]:
    return [] if spec in (None, "none") else [norm_layer(spec, features, dim=dim)]


def hidden_block(in_features: int, out_features: int, *, norm: str | None, act: str = "relu",
                 order: Sequence[str] = ("linear", "norm", "act"), dropout: float = 0.0) -> list[nn.Module]:
    """The layers of one hidden block of an MLP, in ``order``.

    Args:
        in_features, out_features: the linear layer's sizes.
        norm: a :func:`normkit.nn.norm_layer` spec for ``(N, C)`` features, or ``None``/``"none"``.
        act: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        order: the names ``"linear"``, ``"norm"``, ``"act"`` and (with ``dropout``) ``"dropout"`` in the order
            the layers run, e.g. ``("linear", "act", "norm")`` puts the norm after the activation.
        dropout: the dropout probability; a ``"dropout"`` entry in ``order`` is required when it is positive.

    Returns:
        The layers, ready for :class:`torch.nn.Sequential`.
    """
    if dropout > 0 and "dropout" not in order:
        raise ValueError(f"hidden_block: dropout={dropout} needs a 'dropout' entry in order, got {tuple(order)}.")
    makers: dict[str, Callable[[], list[nn.Module]]] = {
        "linear": lambda: [nn.Linear(in_features, out_features)],
        "norm": lambda: _norm(norm, out_features, 1),
        "act": lambda: [ACTIVATIONS[act]()],
        "dropout": lambda: [nn.Dropout(dropout)] if dropout > 0 else [],
    }
    return [layer for name in order for layer in makers[name]()]


def mlp(in_features: int, num_classes: int, hidden: Sequence[int] = (100, 100, 100), *, norm: str | None = None,
        act: str = "relu", order: Sequence[str] = ("linear", "norm", "act"), dropout: float = 0.0,
        seed: int = 0) -> nn.Sequential:
    """A multilayer perceptron whose hidden blocks follow ``order``; the output layer is a plain linear layer.

    The global RNG state is left as it was; the same ``seed`` gives the same linear weights whatever ``norm`` is
    (norm layers draw no random numbers).

    Examples:
        >>> mlp(40, 10, (32,), norm="bn", seed=0)
        Sequential(
          (0): Linear(in_features=40, out_features=32, bias=True)
          (1): BatchNorm1d(32, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)
          (2): ReLU()
          (3): Linear(in_features=32, out_features=10, bias=True)
        )
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width = in_features
        for features in hidden:
            layers += hidden_block(width, features, norm=norm, act=act, order=order, dropout=dropout)
            width = features
        layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


class Unflatten(nn.Module):
    """``(N, prod(shape))`` features to ``(N, *shape)`` maps: lets a CNN take the flat tensors of a ``Split``."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


def cnn(input_shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32), *, norm: str | None = None,
        act: str = "relu", seed: int = 0) -> nn.Sequential:
    """A small CNN over flat inputs: conv 3 -> norm -> act per stage (stride 2 after the first), global average pool.

    Args:
        input_shape: the spatial shape of one example, ``(L,)`` for signals (Conv1d) or ``(H, W)`` for images
            (Conv2d); the flat input has ``prod(input_shape)`` features and one channel.
        num_classes: output logits.
        channels: output channels per stage.
        norm: a :func:`normkit.nn.norm_layer` spec, or ``None``/``"none"``.
        act: ``"relu"``, ``"sigmoid"`` or ``"tanh"``.
        seed: seed of the initial weights (the global RNG state is left as it was).

    Examples:
        >>> model = cnn((8, 8), 10, (4, 8), norm="bn")
        >>> model(torch.zeros(2, 64)).shape
        torch.Size([2, 10])
    """
    dim = len(input_shape)
    conv = {1: nn.Conv1d, 2: nn.Conv2d}.get(dim)
    if conv is None:
        raise ValueError(f"cnn: expected input_shape of length 1 (signals) or 2 (images), got {tuple(input_shape)}.")
    pool = {1: nn.AdaptiveAvgPool1d, 2: nn.AdaptiveAvgPool2d}[dim]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        layers: list[nn.Module] = [Unflatten((1, *input_shape))]
        width = 1
        for stage, features in enumerate(channels):
            layers += [conv(width, features, 3, stride=1 if stage == 0 else 2, padding=1),
                       *_norm(norm, features, dim), ACTIVATIONS[act]()]
            width = features
        layers += [pool(1), nn.Flatten(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op torch thread, then restore the count.

    These models are too small to gain from more threads (oversubscribed cores lose a lot), and a fixed count keeps
    the reductions, hence the numbers, the same on every machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def batch_schedule(num_examples: int, batch_size: int, steps: int, seed: int) -> list[torch.Tensor]:
    """Indices of ``steps`` training batches: a fresh permutation every epoch, the incomplete last batch dropped."""
    if not 1 <= batch_size <= num_examples:
        raise ValueError(f"Expected a batch size in [1, {num_examples}] (the training set's size), got {batch_size}.")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_examples // batch_size
    batches: list[torch.Tensor] = []
    while len(batches) < steps:
        permutation = torch.randperm(num_examples, generator=generator)
        batches.extend(permutation[: per_epoch * batch_size].split(batch_size))
    return batches[:steps]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, training: bool = False,
             batch_size: int | None = None) -> float:
    """Fraction of ``x`` classified as ``y``; in eval mode unless ``training`` (then BN uses each chunk's statistics
    and running statistics still move, as in any training-mode forward). ``batch_size`` evaluates in chunks."""
    was_training = model.training
    model.train(training)
    chunks = [slice(None)] if batch_size is None else [slice(i, i + batch_size) for i in range(0, len(y), batch_size)]
    with torch.no_grad():
        correct = sum((model(x[part]).argmax(dim=1) == y[part]).sum().item() for part in chunks)
    model.train(was_training)
    return correct / len(y)


@dataclass
class History:
    """What one training run measured: test (and validation) accuracy at the evaluated steps, and whether the loss
    blew up. ``val_curve`` is empty when the split has no validation part."""

    curve: list[list[float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    diverged_at: int | None = None
    val_curve: list[list[float]] = field(default_factory=list)

    @property
    def final_accuracy(self) -> float:
        """The last evaluated test accuracy."""
        return self.curve[-1][1]

    @property
    def best_accuracy(self) -> float:
        """The highest evaluated test accuracy (it peeks at the test set: report it, never select with it)."""
        return max(acc for _, acc in self.curve)

    @property
    def final_val_accuracy(self) -> float | None:
        """The last evaluated validation accuracy, ``None`` without a validation part."""
        return self.val_curve[-1][1] if self.val_curve else None

    def steps_to(self, target: float, part: str = "test") -> int | None:
        """The first evaluated step whose ``part`` (``"test"`` or ``"validation"``) accuracy is at least ``target``,
        else ``None``."""
        return steps_to(self.as_dict(), target, part)

    def as_dict(self) -> dict:
        """Plain data for JSON."""
        return {"curve": self.curve, "final_accuracy": self.final_accuracy, "best_accuracy": self.best_accuracy,
                "val_curve": self.val_curve, "final_val_accuracy": self.final_val_accuracy,
                "diverged_at": self.diverged_at, "final_loss": self.losses[-1] if self.losses else None}


def steps_to(run: dict, target: float, part: str = "test") -> int | None:
    """The first evaluated step of a run (a :meth:`History.as_dict`) whose ``part`` accuracy reaches ``target``.

    Examples:
        >>> run = {"curve": [[0, 0.1], [50, 0.95]], "val_curve": [[0, 0.1], [50, 0.85], [100, 0.92]]}
        >>> steps_to(run, 0.9), steps_to(run, 0.9, "validation"), steps_to(run, 0.99) is None
        (50, 100, True)
    """
    if part not in ("test", "validation"):
        raise ValueError(f"steps_to: expected part 'test' or 'validation', got {part!r}.")
    curve = run["curve"] if part == "test" else run["val_curve"]
    return next((int(step) for step, acc in curve if acc >= target), None)


SCHEDULES = ("constant", "cosine")


def train(model: nn.Module, split: Split, *, steps: int, batch_size: int, lr: float, seed: int,
          optimizer: str = "sgd", momentum: float = 0.0, weight_decay: float = 0.0, eval_every: int = 25,
          param_groups: list[dict] | None = None, on_step: Callable[[int], None] | None = None,
          schedule: str = "constant") -> History:
    """Train ``model`` on ``split`` with cross-entropy and record the test accuracy every ``eval_every`` steps (and
    the validation accuracy, when the split has a validation part).

    The batches, the dropout masks and any other random draw during training follow ``seed`` (the global RNG state
    is restored afterwards). A non-finite loss stops the run: ``diverged_at`` is that step and the curve ends
    with the accuracy of the broken model.

    Args:
        model: the model, trained in place (put in training mode).
        split: the data; ``x_train`` goes through the model as is.
        steps: optimizer steps.
        batch_size: examples per step.
        lr: learning rate (ignored for groups in ``param_groups`` that carry their own).
        seed: seed of the batch order and of the random draws during training.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: weight decay of every parameter (ignored for groups that carry their own).
        eval_every: evaluate the test accuracy every this many steps (and at steps 0 and ``steps``).
        param_groups: optimizer parameter groups instead of ``model.parameters()`` (e.g.
            :func:`normkit.tools.param_groups`).
        on_step: called with the step number after every step (progress bars).
        schedule: ``"constant"`` learning rate, or ``"cosine"`` decay from ``lr`` to 0 over ``steps``.

    Returns:
        The :class:`History`.
    """
    groups = param_groups if param_groups is not None else [{"params": list(model.parameters())}]
    groups = [group for group in groups if any(p.requires_grad for p in group["params"])]
    if optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)
    elif optimizer == "adam":
        opt = torch.optim.Adam(groups, lr=lr, weight_decay=weight_decay)
    else:
        raise ValueError(f"train: expected optimizer 'sgd' or 'adam', got {optimizer!r}.")
    if schedule not in SCHEDULES:
        raise ValueError(f"train: expected schedule 'constant' or 'cosine', got {schedule!r}.")
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps) if schedule == "cosine" else None
    history = History()
    _evaluate(history, model, split, 0)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step, indices in enumerate(batch_schedule(len(split.y_train), batch_size, steps, seed), start=1):
            loss = nn.functional.cross_entropy(model(split.x_train[indices]), split.y_train[indices])
            history.losses.append(loss.item())
            if not math.isfinite(history.losses[-1]):
                history.diverged_at = step
                _evaluate(history, model, split, step)
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if scheduler is not None:
                scheduler.step()
            if step % eval_every == 0 or step == steps:
                _evaluate(history, model, split, step)
            if on_step is not None:
                on_step(step)
    return history


def _evaluate(history: History, model: nn.Module, split: Split, step: int) -> None:
    history.curve.append([step, accuracy(model, split.x_test, split.y_test)])
    if split.has_validation:
        history.val_curve.append([step, accuracy(model, split.x_val, split.y_val)])


def mean_std(values: Sequence[float | None]) -> dict:
    """``{"mean", "std", "n", "values"}`` over the values that are not ``None`` (sample std; 0 for one value).

    Examples:
        >>> mean_std([1.0, 2.0, None])
        {'mean': 1.5, 'std': 0.7071067811865476, 'n': 2, 'values': [1.0, 2.0, None]}
    """
    present = [float(v) for v in values if v is not None]
    mean = statistics.fmean(present) if present else None
    std = statistics.stdev(present) if len(present) > 1 else (0.0 if present else None)
    return {"mean": mean, "std": std, "n": len(present), "values": list(values)}


def fmt(stat: dict, spec: str = ".3f", missing: str = "never") -> str:
    """``mean ± std`` of a :func:`mean_std` result for tables, with how many seeds counted when some are missing.

    Examples:
        >>> fmt(mean_std([0.91, 0.93, 0.95]))
        '0.930 ± 0.020'
        >>> fmt(mean_std([120, None, None]), ".0f")
        '120 ± 0 (1/3)'
    """
    if stat["mean"] is None:
        return missing
    text = f"{stat['mean']:{spec}} ± {stat['std']:{spec}}"
    return text if stat["n"] == len(stat["values"]) else f"{text} ({stat['n']}/{len(stat['values'])})"
