"""A validation part carved from the training data, so that selection never looks at the test set."""

from __future__ import annotations

from dataclasses import replace

import torch

from .digits import Split


def with_validation(split: Split, size: int | float = 0.2, seed: int = 0) -> Split:
    """``split`` with a stratified validation part taken out of its training part; the test part is untouched.

    Args:
        split: a split without a validation part.
        size: examples held out, as a count (int) or as a fraction of the training part (float in ``(0, 1)``).
        seed: seed of the draw; the same seed always holds out the same examples.

    Returns:
        A :class:`Split` whose ``x_val``/``y_val`` are the held-out examples and whose training part is the rest.

    Raises:
        ValueError: the split already has a validation part, or ``size`` leaves a part without every class.

    Examples:
        >>> from normkit.data import load_digits
        >>> split = with_validation(load_digits(), 0.2)
        >>> tuple(split.x_train.shape), tuple(split.x_val.shape), tuple(split.x_test.shape)
        ((1078, 64), (269, 64), (450, 64))
    """
    from sklearn.model_selection import train_test_split

    if split.has_validation:
        raise ValueError("with_validation: the split already has a validation part; carve it once, from the "
                         "original split (e.g. with_validation(load_digits(), 0.2)).")
    total, classes = len(split.y_train), int(split.y_train.max()) + 1
    count = round(size * total) if isinstance(size, float) and not isinstance(size, bool) else size
    if isinstance(count, bool) or not isinstance(count, int) or not classes <= count <= total - classes:
        raise ValueError(f"with_validation: expected size to leave every class in both parts: an int in [{classes}, "
                         f"{total - classes}] or a fraction in (0, 1) of the {total} training examples, got "
                         f"{size!r}. Pass e.g. size=0.2.")
    train_index, val_index = train_test_split(torch.arange(total).numpy(), test_size=count, random_state=seed,
                                              stratify=split.y_train.numpy())
    train_index, val_index = torch.as_tensor(train_index), torch.as_tensor(val_index)
    return replace(split, x_train=split.x_train[train_index], y_train=split.y_train[train_index],
                   x_val=split.x_train[val_index], y_val=split.y_train[val_index])


def describe(split: Split, size: int | float, seed: int) -> dict:
    """The JSON record of a split's validation part (the ``"validation"`` key of every experiment).

    Examples:
        >>> from normkit.data import load_digits
        >>> describe(with_validation(load_digits(), 0.2), 0.2, 0)["examples"]
        269
    """
    if not split.has_validation:
        raise ValueError("describe: the split has no validation part; carve one with with_validation(split).")
    return {"source": "held out from the training data, stratified by class", "size": size, "seed": seed,
            "examples": len(split.y_val), "train_examples": len(split.y_train), "test_examples": len(split.y_test),
            "used_for": "every selection (learning rates, optimizers, steps); the test part only reports"}
