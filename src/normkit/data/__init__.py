"""Offline datasets: nothing here touches the network.

- :func:`load_digits`: scikit-learn's bundled 8x8 digits.
- :func:`load_mnist1d`: MNIST-1D generated locally by the ``mnist1d`` package, cached under :func:`cache_dir`.
- :func:`shift` / :func:`shifted`: target domains (:data:`SHIFTS`) for adaptation experiments.
- :func:`with_validation`: a validation part held out from the training data, for every selection.
"""

from ._cache import cache_dir
from .digits import Split, load_digits
from .mnist1d import load_mnist1d
from .shifts import SHIFTS, shift, shifted
from .validation import with_validation

__all__ = ["SHIFTS", "Split", "cache_dir", "load_digits", "load_mnist1d", "shift", "shifted", "with_validation"]
