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


# --- norm_factory: the ``norm_layer=`` argument of torchvision and timm builders ---------------------------------

class _BasicBlock(torch.nn.Module):
    """torchvision.models.resnet.BasicBlock's signature and calls: ``norm_layer(planes)``."""

    def __init__(self, inplanes, planes, stride=1, downsample=None, norm_layer=None):
        super().__init__()
        norm_layer = torch.nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv1 = torch.nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(planes)
        self.relu = torch.nn.ReLU(inplace=True)
        self.conv2 = torch.nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def _resnet(norm_layer=None, width=32):
    """torchvision's ResNet builder pattern: the stem, a downsample with ``norm_layer(planes)``, two blocks."""
    norm_layer = torch.nn.BatchNorm2d if norm_layer is None else norm_layer
    downsample = torch.nn.Sequential(torch.nn.Conv2d(width, 2 * width, 1, 2, bias=False), norm_layer(2 * width))
    return torch.nn.Sequential(torch.nn.Conv2d(3, width, 3, 1, 1, bias=False), norm_layer(width),
                               torch.nn.ReLU(inplace=True), _BasicBlock(width, width, norm_layer=norm_layer),
                               _BasicBlock(width, 2 * width, 2, downsample, norm_layer=norm_layer))


def _timm_get_norm_act_layer(norm_layer, act_layer=None):
    """timm.layers.get_norm_act_layer's handling of what it is given (no timm import): only classes, strings,
    functions and partials; a partial's keywords are rebound on its function, its positional args are lost; a
    function is taken as a norm-act factory and called as it is."""
    import functools
    import types

    if not isinstance(norm_layer, (type, str, types.FunctionType, functools.partial)):
        raise AssertionError("timm asserts isinstance(norm_layer, (type, str, FunctionType, partial))")
    keywords = {}
    if isinstance(norm_layer, functools.partial):
        keywords, norm_layer = dict(norm_layer.keywords), norm_layer.func
    return functools.partial(norm_layer, **keywords) if keywords else norm_layer


class _ConvNormAct(torch.nn.Module):
    """timm.layers.ConvNormAct's calls: ``norm_act_layer(C, apply_act=..., act_kwargs=..., device=, dtype=)``."""

    def __init__(self, in_chs, out_chs, norm_layer, act_layer=torch.nn.ReLU, apply_act=True):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False)
        norm_act_layer = _timm_get_norm_act_layer(norm_layer, act_layer)
        self.bn = norm_act_layer(out_chs, apply_act=apply_act, act_kwargs={}, device=None, dtype=None)

    def forward(self, x):
        return self.bn(self.conv(x))


@pytest.mark.parametrize(("spec", "layer"), [("gn32", "GroupNorm"), ("gn/16", "GroupNorm"),
                                             ("frozen", "FrozenBatchNorm2d"), ("bn-biased", "BatchNorm2d"),
                                             ("none", "Identity")])
def test_norm_factory_builds_a_torchvision_resnet(spec, layer):
    model = _resnet(norm_layer=normkit.nn.norm_factory(spec))
    norms = [model[1], model[3].bn1, model[3].bn2, model[4].bn1, model[4].bn2, model[4].downsample[1]]
    assert all(type(m).__name__ == layer for m in norms)
    widths = [getattr(m, "num_channels", getattr(m, "num_features", None)) for m in norms]
    assert widths == ([None] * 6 if spec == "none" else [32, 32, 32, 64, 64, 64])
    out = model(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 64, 4, 4)
    if spec == "gn/16":
        assert model[4].bn1.num_groups == 4


def test_norm_factory_matches_norm_layer_and_takes_timm_keywords():
    factory = normkit.nn.norm_factory("bn-biased", dim=1, eps=1e-3)
    built = factory(8, momentum=0.01, dtype=torch.float64)  # timm passes device=/dtype= to every norm_layer call
    reference = norm_layer("bn-biased", 8, dim=1, eps=1e-3, momentum=0.01, dtype=torch.float64)
    assert repr(built) == repr(reference) and built.weight.dtype == torch.float64
    assert factory.__name__ == "norm_factory('bn-biased')"
    with pytest.raises(ValueError, match=r"got C=24"):  # the norm_layer error, with the channel count
        normkit.nn.norm_factory("gn32")(24)


def test_norm_factory_survives_timm_get_norm_act_layer_where_a_partial_does_not():
    import functools

    layer = _timm_get_norm_act_layer(normkit.nn.norm_factory("gn32"))(64, apply_act=False)
    assert type(layer) is normkit.nn.GroupNorm and layer.num_groups == 32
    partial = _timm_get_norm_act_layer(functools.partial(norm_layer, "gn32"))  # timm drops the spec
    with pytest.raises(TypeError, match="missing 1 required positional argument: 'num_features'"):
        partial(64)


def test_norm_factory_timm_norm_act_convention():
    x = torch.randn(2, 3, 5, 5)
    fused = _ConvNormAct(3, 32, normkit.nn.norm_factory("bn", act_layer=torch.nn.ReLU))
    assert type(fused.bn) is normkit.nn.BatchNormAct2d and fused.bn.act == "relu"
    assert set(fused.bn.state_dict()) == set(torch.nn.BatchNorm2d(32).state_dict())  # timm's BatchNormAct2d keys
    assert bool((fused(x) >= 0).all())

    grouped = _ConvNormAct(3, 32, normkit.nn.norm_factory("gn8", act_layer=torch.nn.SiLU))
    assert type(grouped.bn) is normkit.nn.NormAct and grouped.bn.norm.num_groups == 8
    assert isinstance(grouped.bn.act, torch.nn.SiLU)
    expected = torch.nn.functional.silu(grouped.bn.norm(grouped.conv(x)))
    assert_close(grouped(x), expected)

    plain = _ConvNormAct(3, 32, normkit.nn.norm_factory("gn8", act_layer=torch.nn.SiLU), apply_act=False)
    assert type(plain.bn) is normkit.nn.GroupNorm

    # create_norm_act_layer style: act_layer, inplace and a drop layer at the call
    layer = normkit.nn.norm_factory("in")(16, act_layer=torch.nn.ReLU, inplace=True, drop_layer=torch.nn.Identity)
    assert isinstance(layer.act, torch.nn.ReLU) and layer.act.inplace and isinstance(layer.drop, torch.nn.Identity)
    gelu = normkit.nn.norm_factory("gn/4", act_layer=torch.nn.GELU)(8, inplace=True, act_kwargs={"approximate": "tanh"})
    assert gelu.act.approximate == "tanh"


def test_norm_factory_bad_arguments():
    with pytest.raises(ValueError, match="norm_factory: unknown spec 'GN32'.*Did you mean 'gn32'"):
        normkit.nn.norm_factory("GN32")
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        normkit.nn.norm_factory("bn", dim=0)
    with pytest.raises(ValueError, match="act_layer to be None, a module class"):
        normkit.nn.norm_factory("bn", act_layer="swish")
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        normkit.nn.norm_factory("bn", act_layer="relu")(0)
