"""The supported torch releases (README, "Supported versions"; `make test-matrix` runs this file on each).

torch 2.11 lacks ``bias=`` on its norm layers; normkit backports it (``normkit.nn._torch_compat``). These tests pin
what ``bias=False`` must give on every torch, torch 2.12's behaviour, without asking the installed torch.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import normkit
from normkit.nn import _scripting
from normkit.nn._torch_compat import accepts_bias, build, with_bias

ROOT = Path(__file__).resolve().parents[1]
TORCH_NORMS = [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d, torch.nn.SyncBatchNorm,
               torch.nn.InstanceNorm1d, torch.nn.InstanceNorm2d, torch.nn.InstanceNorm3d, torch.nn.GroupNorm]
# (normkit class, constructor arguments, an input): the drop-ins whose torch class gained bias= in torch 2.12
DROP_INS = [
    (normkit.BatchNorm1d, (4,), (6, 4)),
    (normkit.BatchNorm2d, (4,), (3, 4, 2, 5)),
    (normkit.BatchNorm3d, (4,), (2, 4, 3, 2, 2)),
    (normkit.nn.SyncBatchNorm, (4,), (3, 4, 5)),
    (normkit.nn.InstanceNorm1d, (4,), (2, 4, 7)),
    (normkit.nn.InstanceNorm2d, (4,), (2, 4, 3, 5)),
    (normkit.nn.InstanceNorm3d, (4,), (2, 4, 3, 2, 3)),
    (normkit.nn.GroupNorm, (2, 4), (3, 4, 5)),
]
IDS = [cls.__name__ for cls, _, _ in DROP_INS]


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"\d+(\.\d+)*", text).group().split("."))


def _affine(cls: type, args: tuple, **kwargs) -> torch.nn.Module:
    return cls(*args, **({} if cls is normkit.nn.GroupNorm else {"affine": True}), **kwargs)


def test_the_floor_is_the_same_in_pyproject_and_the_makefile_and_this_torch_meets_it():
    pyproject = (ROOT / "pyproject.toml").read_text()
    makefile = (ROOT / "Makefile").read_text()
    floor = re.search(r'^\s*"torch>=([\d.]+)",', pyproject, re.MULTILINE).group(1)
    make_floor = re.search(r"^TORCH_FLOOR \?= ([\d.]+)$", makefile, re.MULTILINE).group(1)
    assert _version(make_floor)[: len(_version(floor))] == _version(floor), (floor, make_floor)
    assert _version(torch.__version__) >= _version(floor), f"torch {torch.__version__} is below the floor {floor}"


@pytest.mark.parametrize("torch_class", TORCH_NORMS, ids=lambda c: c.__name__)
def test_with_bias_is_torchs_class_where_torch_has_bias(torch_class):
    compat = with_bias(torch_class)
    assert accepts_bias(compat) and issubclass(compat, torch_class) and with_bias(torch_class) is compat
    assert (compat is torch_class) == accepts_bias(torch_class)
    assert compat.__name__ == torch_class.__name__


@pytest.mark.parametrize("cls,args,shape", DROP_INS, ids=IDS)
def test_bias_false_is_torch_2_12s_on_every_torch(cls, args, shape):
    layer = _affine(cls, args, bias=False)
    assert layer.bias is None and isinstance(layer.weight, torch.nn.Parameter)
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    assert "bias" not in layer.state_dict()
    text = repr(layer)
    assert "affine=True, bias=False" in text, text
    x = torch.randn(shape)
    with torch.no_grad():
        layer.weight.fill_(2.0)
    expected = 2.0 * _affine(cls, args, bias=True)(x)  # with the fresh bias (zeros)
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("cls,args,shape", DROP_INS, ids=IDS)
def test_reset_parameters_without_bias(cls, args, shape):
    layer = _affine(cls, args, bias=False, device="meta").to_empty(device="cpu")
    layer.reset_parameters()
    assert layer.bias is None and torch.equal(layer.weight, torch.ones_like(layer.weight))
    if getattr(layer, "running_mean", None) is not None:
        assert torch.equal(layer.running_mean, torch.zeros_like(layer.running_mean))


@pytest.mark.parametrize("cls,args,shape", DROP_INS, ids=IDS)
def test_bias_true_repr_and_state_are_the_installed_torchs(cls, args, shape):
    ours = _affine(cls, args)
    theirs = _affine(next(c for c in cls.__mro__ if c.__module__.startswith("torch.nn.modules")), args)
    assert repr(ours) == repr(theirs)
    assert list(ours.state_dict()) == list(theirs.state_dict())


@pytest.mark.filterwarnings("ignore:`torch.jit.script.*is deprecated:DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script.*is deprecated:FutureWarning")
def test_torchscript_gets_torchs_own_class_without_bias():
    layer = normkit.BatchNorm2d(4, bias=False).eval()
    twin = _scripting.torch_twin(layer)
    assert type(twin) is torch.nn.BatchNorm2d and twin.bias is None
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(torch.jit.script(layer)(x), layer(x))


@pytest.mark.parametrize("bias", [True, False])
def test_build_gives_torchs_exact_class(bias):
    layer = build(torch.nn.BatchNorm2d, 4, bias=bias)
    assert type(layer) is torch.nn.BatchNorm2d and (layer.bias is not None) == bias
    back = normkit.tools.convert(torch.nn.Sequential(normkit.BatchNorm2d(4, bias=bias)), "torch")[0]
    assert type(back) is torch.nn.BatchNorm2d and (back.bias is not None) == bias
