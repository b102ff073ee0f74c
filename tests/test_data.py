import random
import subprocess
import sys

import mnist1d.data
import numpy as np
import pytest
import torch

from normkit.data import SHIFTS, Split, cache_dir, load_digits, load_mnist1d, shift, shifted
from normkit.data.mnist1d import cache_file_name


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


# --- MNIST-1D, generated locally and cached -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist1d_cache(tmp_path_factory):
    """A private cache directory for this module, through $NORMKIT_CACHE_DIR."""
    directory = tmp_path_factory.mktemp("normkit-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NORMKIT_CACHE_DIR", str(directory))
        yield directory


@pytest.fixture(scope="module")
def mnist1d_default(mnist1d_cache) -> Split:
    return load_mnist1d()  # the only full-size generation of the session (a few seconds)


def forbid_generation(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("make_dataset called although the cache should have been used")

    monkeypatch.setattr(mnist1d.data, "make_dataset", fail)


def test_mnist1d_shapes_dtypes_and_split_sizes(mnist1d_default):
    split = mnist1d_default
    assert split.x_train.shape == (4000, 40)
    assert split.x_test.shape == (1000, 40)
    assert split.y_train.shape == (4000,)
    assert split.y_test.shape == (1000,)
    assert split.x_train.dtype == split.x_test.dtype == torch.float32
    assert split.y_train.dtype == split.y_test.dtype == torch.int64
    assert split.num_features == 40
    assert split.num_classes == 10
    assert split.image_shape is None
    assert torch.bincount(split.y_test, minlength=10).min() > 0


def test_mnist1d_is_exactly_what_make_dataset_gives(mnist1d_cache):
    args = mnist1d.data.get_dataset_args()
    args.num_samples, args.seed = 200, 7
    expected = mnist1d.data.make_dataset(args)
    split = load_mnist1d(num_samples=200, seed=7)
    assert torch.equal(split.x_train, torch.as_tensor(expected["x"], dtype=torch.float32))
    assert torch.equal(split.x_test, torch.as_tensor(expected["x_test"], dtype=torch.float32))
    assert torch.equal(split.y_train, torch.as_tensor(expected["y"]))
    assert torch.equal(split.y_test, torch.as_tensor(expected["y_test"]))
    assert (len(split.y_train), len(split.y_test)) == (160, 40)


def test_mnist1d_leaves_global_random_state_alone(mnist1d_cache):
    random.seed(123)
    np.random.seed(123)
    load_mnist1d(num_samples=100, seed=3, cache=False)
    assert random.random() == random.Random(123).random()
    assert np.random.random() == np.random.RandomState(123).random_sample()


def test_mnist1d_cache_hit_is_identical_and_does_not_generate(mnist1d_cache, mnist1d_default, monkeypatch):
    path = mnist1d_cache / cache_file_name(5000, 42)
    assert path.is_file()
    forbid_generation(monkeypatch)
    again = load_mnist1d()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(again, name), getattr(mnist1d_default, name))


def test_mnist1d_cache_file_name_keys_arguments_and_version():
    name = cache_file_name(200, 7)
    assert name.endswith(".npz")
    assert "n200" in name and "seed7" in name
    from importlib.metadata import version

    assert version("mnist1d") in name
    assert len({cache_file_name(200, 7), cache_file_name(300, 7), cache_file_name(200, 8)}) == 3


@pytest.mark.parametrize("content", [b"", b"not a zip file", b"PK\x03\x04 truncated"])
def test_mnist1d_corrupt_cache_is_regenerated(mnist1d_cache, content):
    fresh = load_mnist1d(num_samples=100, seed=5, cache=False)
    path = mnist1d_cache / cache_file_name(100, 5)
    path.write_bytes(content)
    split = load_mnist1d(num_samples=100, seed=5)
    assert torch.equal(split.x_train, fresh.x_train)
    assert torch.equal(split.y_test, fresh.y_test)
    with np.load(path, allow_pickle=False) as archive:  # rewritten, valid again
        assert archive["x_train"].shape == (80, 40)


def test_mnist1d_cache_with_missing_array_is_regenerated(mnist1d_cache):
    path = mnist1d_cache / cache_file_name(100, 6)
    np.savez(path, x_train=np.zeros((80, 40), np.float32))
    split = load_mnist1d(num_samples=100, seed=6)
    assert split.x_test.shape == (20, 40)


def test_mnist1d_writes_atomically_and_leaves_no_temporary_files(mnist1d_cache):
    load_mnist1d(num_samples=100, seed=11)
    assert (mnist1d_cache / cache_file_name(100, 11)).is_file()
    assert not list(mnist1d_cache.glob("*.tmp"))


def test_mnist1d_without_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMKIT_CACHE_DIR", str(tmp_path / "cache"))
    load_mnist1d(num_samples=100, cache=False)
    assert not (tmp_path / "cache").exists()


def test_mnist1d_unwritable_cache_directory_still_returns_data(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("NORMKIT_CACHE_DIR", str(blocker / "cache"))  # a directory below a file cannot be created
    assert load_mnist1d(num_samples=100).x_train.shape == (80, 40)


def test_cache_dir_environment_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMKIT_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("NORMKIT_CACHE_DIR")
    assert cache_dir() == tmp_path / "xdg" / "normkit"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "normkit"


def test_mnist1d_env_var_is_where_the_cache_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("NORMKIT_CACHE_DIR", str(tmp_path))
    load_mnist1d(num_samples=100, seed=9)
    assert (tmp_path / cache_file_name(100, 9)).is_file()


@pytest.mark.parametrize("num_samples", [0, 10, 19, 100.0, True])
def test_mnist1d_bad_num_samples(num_samples):
    with pytest.raises(ValueError, match=r"Expected num_samples .* got .*num_samples=5000"):
        load_mnist1d(num_samples=num_samples, cache=False)


# --- shifted domains ------------------------------------------------------------------------------------------------


@pytest.fixture
def x() -> torch.Tensor:
    return torch.rand(6, 64, generator=torch.Generator().manual_seed(0))


def test_shift_kinds():
    assert SHIFTS == ("contrast", "offset", "noise", "rotation")


def test_contrast_scales_around_each_examples_mean(x):
    out = shift(x, "contrast", 0.3)
    mean = x.mean(dim=1, keepdim=True)
    torch.testing.assert_close(out, mean + 0.3 * (x - mean))
    torch.testing.assert_close(out.mean(dim=1), x.mean(dim=1))
    torch.testing.assert_close(out.std(dim=1), 0.3 * x.std(dim=1))
    torch.testing.assert_close(shift(x, "contrast", 1.0), x)


def test_offset_adds_a_constant(x):
    assert torch.equal(shift(x, "offset", 0.25), x + 0.25)
    assert torch.equal(shift(x, "offset", 0), x)


def test_noise_is_seeded_with_the_requested_std():
    x = torch.zeros(400, 64)
    first = shift(x, "noise", 0.2, seed=1)
    assert torch.equal(first, shift(x, "noise", 0.2, seed=1))
    assert not torch.equal(first, shift(x, "noise", 0.2, seed=2))
    assert abs(first.mean().item()) < 0.01
    assert abs(first.std().item() - 0.2) < 0.005
    assert torch.equal(shift(x, "noise", 0.0), x)


def test_shift_does_not_modify_its_input(x):
    before = x.clone()
    for kind, strength in (("contrast", 2.0), ("offset", 1.0), ("noise", 1.0), ("rotation", 30.0)):
        shift(x, kind, strength, image_shape=(8, 8))
    assert torch.equal(x, before)


def test_rotation_by_zero_is_the_identity(x):
    torch.testing.assert_close(shift(x, "rotation", 0.0, image_shape=(8, 8)), x)


@pytest.mark.parametrize(("degrees", "k"), [(90.0, 1), (-90.0, -1), (180.0, 2), (270.0, 3)])
def test_rotation_by_right_angles_matches_rot90(x, degrees, k):
    out = shift(x, "rotation", degrees, image_shape=(8, 8)).reshape(-1, 8, 8)
    torch.testing.assert_close(out, torch.rot90(x.reshape(-1, 8, 8), k, dims=(1, 2)), atol=1e-5, rtol=0)


def test_small_rotation_moves_pixels_but_keeps_ink(split):
    digits = split.x_test[:50]
    out = shift(digits, "rotation", 10.0, image_shape=(8, 8))
    assert out.shape == digits.shape
    assert (out - digits).abs().max() > 0.1
    assert abs(out.sum() / digits.sum() - 1) < 0.1


@pytest.mark.parametrize("kind", ["blur", "Contrast", None])
def test_bad_kind(x, kind):
    with pytest.raises(ValueError, match=r"Expected kind to be one of .* got .*kind='contrast'"):
        shift(x, kind, 1.0)


@pytest.mark.parametrize(
    ("kind", "strength"),
    [("contrast", 0.0), ("contrast", -1.0), ("noise", -0.1), ("offset", float("nan")), ("rotation", float("inf")),
     ("offset", "1"), ("noise", True)],
)
def test_bad_strength(x, kind, strength):
    with pytest.raises(ValueError, match=r"Expected .* got .*Pass e\.g\. strength="):
        shift(x, kind, strength, image_shape=(8, 8))


def test_rotation_needs_an_image_shape(x):
    with pytest.raises(ValueError, match=r"Expected image_shape .* got None\. Pass e\.g\. image_shape=\(8, 8\)"):
        shift(x, "rotation", 10.0)
    with pytest.raises(ValueError, match=r"H \* W == 64 .* got \(4, 4\)"):
        shift(x, "rotation", 10.0, image_shape=(4, 4))


@pytest.mark.parametrize("bad", [torch.zeros(3, 4, dtype=torch.int64), torch.zeros(4), [[0.0]]])
def test_bad_input(bad):
    with pytest.raises(TypeError, match=r"Expected x to be a floating-point \(N, D\) tensor, got"):
        shift(bad, "offset", 1.0)


def test_digits_know_their_image_shape(split):
    assert split.image_shape == (8, 8)


@pytest.mark.parametrize(("kind", "strength"), [("contrast", 0.5), ("offset", 0.3), ("noise", 0.1), ("rotation", 15)])
def test_shifted_split_shifts_both_parts_and_keeps_labels(split, kind, strength):
    target = shifted(split, kind, strength, seed=4)
    assert torch.equal(target.y_train, split.y_train)
    assert torch.equal(target.y_test, split.y_test)
    assert target.image_shape == (8, 8)
    assert torch.equal(target.x_train, shift(split.x_train, kind, strength, seed=4, image_shape=(8, 8)))
    assert torch.equal(target.x_test, shift(split.x_test, kind, strength, seed=5, image_shape=(8, 8)))
    assert not torch.equal(target.x_test, split.x_test)


def test_shifted_mnist1d_has_no_rotation(mnist1d_cache):
    split = load_mnist1d(num_samples=100, seed=5)
    assert shifted(split, "noise", 0.1).x_train.shape == (80, 40)
    with pytest.raises(ValueError, match="1-D data such as MNIST-1D has no rotation"):
        shifted(split, "rotation", 10.0)
