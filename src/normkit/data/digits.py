"""scikit-learn's bundled 8x8 digits as torch tensors, with a fixed stratified train/test split."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Split:
    """A train/test split of a classification dataset, optionally with a validation part.

    Args:
        x_train: ``(N_train, D)`` float32 features.
        y_train: ``(N_train,)`` int64 class labels.
        x_test: ``(N_test, D)`` float32 features.
        y_test: ``(N_test,)`` int64 class labels.
        image_shape: ``(H, W)`` when each row of ``x`` is a flattened image (``(8, 8)`` for the digits), ``None``
            for other data (MNIST-1D).
        x_val, y_val: a validation part carved from the training data by :func:`normkit.data.with_validation`
            (``None`` until then): every choice (learning rate, optimizer, epochs) is made on it, the test part only
            reports.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    image_shape: tuple[int, ...] | None = None
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def has_validation(self) -> bool:
        """Whether a validation part was carved (:func:`normkit.data.with_validation`)."""
        return self.x_val is not None

    @property
    def num_features(self) -> int:
        """Number of input features ``D``."""
        return self.x_train.shape[1]

    @property
    def num_classes(self) -> int:
        """Number of classes, counted over both parts of the split."""
        return int(torch.cat([self.y_train, self.y_test]).max()) + 1


def load_digits(test_size: int = 450, seed: int = 0) -> Split:
    """The 1797 8x8 digits of scikit-learn, pixels scaled to ``[0, 1]``, split with stratification.

    Pixels are divided by 16 (their maximum) and nothing else: the features are *not* standardized, on purpose.
    The data ships with scikit-learn, so no network is used.

    Args:
        test_size: number of test examples (default 450, leaving 1347 for training).
        seed: seed of the split; the same seed always gives the same split.

    Returns:
        A :class:`Split` with 64 features per example, labels in ``0..9`` and ``image_shape=(8, 8)``.

    Examples:
        >>> split = load_digits()
        >>> tuple(split.x_train.shape), tuple(split.x_test.shape)
        ((1347, 64), (450, 64))
    """
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    total = len(bunch.target)
    num_classes = len(set(bunch.target.tolist()))
    if not isinstance(test_size, int) or not num_classes <= test_size <= total - num_classes:
        raise ValueError(
            f"Expected test_size to be an int in [{num_classes}, {total - num_classes}] so that both parts hold "
            f"every class, got {test_size!r}. Pass e.g. test_size=450."
        )
    x_train, x_test, y_train, y_test = train_test_split(
        bunch.data, bunch.target, test_size=test_size, random_state=seed, stratify=bunch.target
    )
    return Split(
        x_train=torch.as_tensor(x_train / 16.0, dtype=torch.float32),
        y_train=torch.as_tensor(y_train, dtype=torch.int64),
        x_test=torch.as_tensor(x_test / 16.0, dtype=torch.float32),
        y_test=torch.as_tensor(y_test, dtype=torch.int64),
        image_shape=(8, 8),
    )
