import subprocess
import sys

import pytest
import torch

from normkit.data import Split, load_digits


@pytest.fixture(scope="module")
def split() -> Split:
    return load_digits()


def test_shapes_dtypes_and_sizes(split):
    assert split.x_train.shape == (1347, 64)
    assert split.x_test.shape == (450, 64)
    assert split.y_train.shape == (1347,)
    assert split.y_test.shape == (450,)
    assert split.x_train.dtype == split.x_test.dtype == torch.float32
    assert split.y_train.dtype == split.y_test.dtype == torch.int64
    assert split.num_features == 64
    assert split.num_classes == 10


def test_pixels_scaled_to_unit_interval_not_standardized(split):
    x = torch.cat([split.x_train, split.x_test])
    assert x.min() == 0.0
    assert x.max() == 1.0
    assert torch.equal(x * 16, (x * 16).round())
    assert x.mean() < 0.4


def test_labels_cover_every_class_in_both_parts(split):
    for y in (split.y_train, split.y_test):
        assert y.min() == 0
        assert y.max() == 9
        assert torch.bincount(y, minlength=10).min() > 0


def test_split_is_stratified(split):
    train = torch.bincount(split.y_train, minlength=10) / len(split.y_train)
    test = torch.bincount(split.y_test, minlength=10) / len(split.y_test)
    assert (train - test).abs().max() < 0.01


def test_split_is_deterministic_and_depends_on_seed(split):
    again = load_digits()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(split, name), getattr(again, name))
    other = load_digits(seed=1)
    assert not torch.equal(split.y_train, other.y_train)


def test_split_is_frozen(split):
    with pytest.raises(AttributeError):
        split.x_train = split.x_test


def test_test_size(split):
    small = load_digits(test_size=100)
    assert len(small.y_test) == 100
    assert len(small.y_train) == 1797 - 100


@pytest.mark.parametrize("test_size", [0, 5, 1790, 0.25])
def test_bad_test_size_says_what_to_pass(test_size):
    with pytest.raises(ValueError, match=r"Expected test_size .* got .*test_size=450"):
        load_digits(test_size=test_size)


def test_importing_normkit_stays_light():
    code = (
        "import sys, normkit, normkit.data, normkit.experiments, normkit.cli\n"
        "heavy = sorted(m for m in ('sklearn', 'matplotlib', 'triton', 'rich') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""
