"""normkit.nn.norm_layer: the spec grammar of DESIGN.md section 4."""

from __future__ import annotations

import pytest
import torch

import normkit
from normkit.nn import norm_layer

from helpers import assert_close

SHAPES = {1: (4, 64, 5), 2: (4, 64, 3, 3), 3: (2, 64, 2, 2, 2)}


@pytest.mark.parametrize("dim", [1, 2, 3])
@pytest.mark.parametrize(("spec", "expected"), [
    ("bn", lambda d: getattr(normkit.nn, f"BatchNorm{d}d")),
    ("bn-biased", lambda d: getattr(normkit.nn, f"BatchNorm{d}d")),
    ("frozen", lambda d: getattr(normkit.nn, f"FrozenBatchNorm{d}d")),
    ("sync", lambda d: normkit.nn.SyncBatchNorm),
    ("gn32", lambda d: normkit.nn.GroupNorm),
    ("gn/16", lambda d: normkit.nn.GroupNorm),
    ("ln", lambda d: normkit.nn.GroupNorm),
    ("in", lambda d: getattr(normkit.nn, f"InstanceNorm{d}d")),
    ("ghost16", lambda d: getattr(normkit.nn, f"GhostBatchNorm{d}d")),
    ("none", lambda d: torch.nn.Identity),
])
def test_each_spec_builds_its_module_and_runs(spec, expected, dim):
    layer = norm_layer(spec, 64, dim=dim)
    assert type(layer) is expected(dim)
    x = torch.randn(SHAPES[dim])
    assert layer(x).shape == x.shape


def test_spec_details():
    assert norm_layer("bn", 8).running_var_mode == "unbiased"
    assert norm_layer("bn-biased", 8).running_var_mode == "biased"
    assert norm_layer("gn32", 64).num_groups == 32
    assert norm_layer("gn/16", 64).num_groups == 4
    assert norm_layer("gn/1", 5).num_groups == 5
    assert norm_layer("ln", 7).num_groups == 1
    layer = norm_layer("in", 8)
    assert layer.affine and not layer.track_running_stats
    assert norm_layer("bn", 8, dim=1, momentum=None, eps=1e-3).momentum is None
    assert norm_layer("in", 8, affine=False).affine is False
    assert norm_layer("gn32", 64, eps=1e-3, dtype=torch.float64).weight.dtype == torch.float64


def test_ln_is_a_layer_norm_over_channels():
    ln = norm_layer("ln", 6)
    reference = torch.nn.LayerNorm(6)
    x = torch.randn(5, 6)
    assert_close(ln(x), reference(x))
    image = torch.randn(2, 6, 3, 3)
    assert_close(ln(image), torch.nn.functional.layer_norm(image, (6, 3, 3)))


@pytest.mark.parametrize(("spec", "channels", "fix"), [
    ("gn32", 48, "'gn/16'"), ("gn32", 20, "'gn20'"), ("gn/16", 24, "'gn/12'"), ("gn8", 12, "'gn6'"),
])
def test_group_counts_that_do_not_divide_name_c_and_the_fix(spec, channels, fix):
    with pytest.raises(ValueError, match=f"got C={channels}") as info:
        norm_layer(spec, channels)
    assert fix in str(info.value) and spec in str(info.value)


@pytest.mark.parametrize(("spec", "module"), [("brn", "BatchRenorm2d"), ("ghost32", "GhostBatchNorm2d"),
                                              ("cbn", "CrossIterationBatchNorm2d")])
def test_family_specs_build_batch_norms(spec, module):
    layer = norm_layer(spec, 8)
    assert type(layer).__name__ == module and isinstance(layer, torch.nn.BatchNorm2d)
    if spec == "ghost32":
        assert layer.virtual_batch_size == 32
    with pytest.raises(ValueError, match="dim=2"):
        norm_layer("cbn", 8, dim=1)


@pytest.mark.parametrize("spec", ["batchnorm", "GN32", "gn", "gn/", "ghost", "bn_biased", "", None, 32])
def test_unknown_specs_list_the_grammar(spec):
    with pytest.raises(ValueError, match="unknown spec") as info:
        norm_layer(spec, 8)
    assert "'gn/K' (K channels per group" in str(info.value)


def test_close_misspellings_get_a_suggestion():
    with pytest.raises(ValueError, match="Did you mean 'gn32'"):
        norm_layer("GN32", 64)
    with pytest.raises(ValueError, match="Did you mean 'bn-biased'"):
        norm_layer("bn_biased", 64)


@pytest.mark.parametrize(("args", "kwargs", "match"), [
    (("gn0", 8), {}, "must be positive"),
    (("gn/0", 8), {}, "must be positive"),
    (("bn", 0), {}, "num_features must be a positive int"),
    (("bn", 8.0), {}, "num_features must be a positive int"),
    (("bn", 8), {"dim": 4}, "dim must be 1, 2 or 3"),
])
def test_bad_arguments(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        norm_layer(*args, **kwargs)
