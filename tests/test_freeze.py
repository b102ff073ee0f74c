"""normkit.tools.freeze / unfreeze, modeled on timm's test_freeze_unfreeze: by root, by dotted name, BN roots."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
import normkit.tools
from normkit.nn import FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d

from helpers import assert_close, snapshot


class BasicBlock(torch.nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(cout)
        self.conv2 = torch.nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = torch.nn.Sequential(torch.nn.Conv2d(cin, cout, 1, stride, bias=False),
                                                  torch.nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class SmallResNet(torch.nn.Module):
    """A resnet18-shaped toy: stem, three stages of two basic blocks, a BatchNorm1d head."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, 1, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.layer1 = torch.nn.Sequential(BasicBlock(8, 8), BasicBlock(8, 8))
        self.layer2 = torch.nn.Sequential(BasicBlock(8, 16, 2), BasicBlock(16, 16))
        self.layer3 = torch.nn.Sequential(BasicBlock(16, 16, 2), BasicBlock(16, 16))
        self.fc = torch.nn.Linear(16, 6)
        self.head = torch.nn.BatchNorm1d(6)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.head(self.fc(x.mean((2, 3))))


def _resnet():
    torch.manual_seed(0)
    model = SmallResNet()
    _randomize(model)
    return model


def _randomize(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, _BatchNorm):
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5)
                if module.bias is not None:
                    module.bias.uniform_(-0.5, 0.5)
                if module.running_mean is not None:
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2)
                    module.num_batches_tracked.fill_(5)


def _kinds(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (_BatchNorm, FrozenBatchNorm))}


def test_freeze_by_root_freezes_every_batch_norm_and_train_cannot_undo_it():
    model = _resnet()
    x = torch.randn(4, 3, 8, 8)
    expected = copy.deepcopy(model).eval()(x)
    assert normkit.tools.freeze(model) is model
    kinds = _kinds(model)
    assert kinds["layer1.0.bn1"] is FrozenBatchNorm2d and kinds["head"] is FrozenBatchNorm1d
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    model.train()
    before = snapshot(model)
    assert_close(model(x), expected, what="train-mode output of the frozen model")
    after = snapshot(model)
    assert all(torch.equal(after[k], v) for k, v in before.items() if "bn" in k or "head" in k)
    assert all("bn" not in n and "downsample.1" not in n and "head" not in n for n, _ in model.named_parameters())


def test_freeze_by_dotted_name_freezes_only_those_subtrees():
    # timm: freeze(['layer1', 'layer2.0']) leaves layer3 and layer2[1] trainable.
    model = normkit.tools.freeze(_resnet(), ["layer1", "layer2.0"])
    kinds = _kinds(model)
    assert kinds["layer1.0.bn1"] is kinds["layer1.1.bn2"] is kinds["layer2.0.downsample.1"] is FrozenBatchNorm2d
    assert kinds["layer2.1.bn1"] is kinds["layer3.0.bn1"] is kinds["bn1"] is torch.nn.BatchNorm2d
    assert kinds["head"] is torch.nn.BatchNorm1d
    model = normkit.tools.unfreeze(model, "layer2")
    kinds = _kinds(model)
    assert kinds["layer2.0.bn1"] is torch.nn.BatchNorm2d and kinds["layer1.0.bn1"] is FrozenBatchNorm2d


def test_a_batch_norm_by_name_from_the_root_or_from_its_parent():
    model = _resnet()
    normkit.tools.freeze(model, ["layer1.0.bn1"])
    assert type(model.layer1[0].bn1) is FrozenBatchNorm2d and type(model.layer1[0].bn2) is torch.nn.BatchNorm2d
    block = normkit.tools.freeze(model.layer1[1], ["bn2"])
    assert block is model.layer1[1] and type(model.layer1[1].bn2) is FrozenBatchNorm2d
    normkit.tools.unfreeze(model, ["layer1.0.bn1"])
    assert type(model.layer1[0].bn1) is torch.nn.BatchNorm2d and type(model.layer1[1].bn2) is FrozenBatchNorm2d


@pytest.mark.parametrize("bn_class", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                                      normkit.BatchNorm2d, torch.nn.SyncBatchNorm, normkit.SyncBatchNorm])
def test_a_batch_norm_root_returns_a_new_module(bn_class):
    # timm's freeze raises for a BN root; DESIGN rule 5: the new layer is returned.
    bn = bn_class(4)
    frozen = normkit.tools.freeze(bn)
    assert frozen is not bn and isinstance(frozen, FrozenBatchNorm)
    expected = {torch.nn.BatchNorm1d: FrozenBatchNorm1d, torch.nn.BatchNorm3d: FrozenBatchNorm3d,
                torch.nn.SyncBatchNorm: FrozenBatchNorm, normkit.SyncBatchNorm: FrozenBatchNorm}
    assert type(frozen) is expected.get(bn_class, FrozenBatchNorm2d)
    back = normkit.tools.unfreeze(frozen)
    assert back is not frozen and type(back) is bn_class
    assert normkit.tools.freeze(frozen) is frozen and normkit.tools.unfreeze(back) is back


def _state(bn):
    return {name: getattr(bn, name) for name in ("weight", "bias", "running_mean", "running_var",
                                                 "num_batches_tracked")}


@pytest.mark.parametrize(("bn_class", "kwargs"), [
    (torch.nn.BatchNorm2d, {"momentum": 0.01, "eps": 1e-3}),
    (torch.nn.BatchNorm1d, {"momentum": None}),
    (torch.nn.BatchNorm3d, {"affine": False}),
    (normkit.BatchNorm2d, {"bias": False, "running_var": "biased", "nonfinite": "raise"}),
    (torch.nn.SyncBatchNorm, {"momentum": 0.2}),
    (normkit.SyncBatchNorm, {"eps": 1e-4, "nonfinite": "propagate"}),
], ids=["torch2d", "torch1d-cumulative", "torch3d-no-affine", "normkit-biased", "torch-sync", "normkit-sync"])
def test_round_trip_restores_class_values_and_hyper_parameters(bn_class, kwargs):
    model = torch.nn.Sequential(torch.nn.Identity(), bn_class(4, **kwargs))
    _randomize(model)
    original = model[1]
    if original.weight is not None:
        original.weight.requires_grad_(False)  # a user's own choice survives the round trip too
    original.eval()
    process_group = object()
    if isinstance(original, torch.nn.SyncBatchNorm):
        original.process_group = process_group
    if isinstance(original, normkit.SyncBatchNorm):
        normkit.tools.sync(model, process_group)
    expected = copy.deepcopy(original)
    normkit.tools.freeze(model)
    assert isinstance(model[1], FrozenBatchNorm) and model[1].eps == original.eps
    normkit.tools.unfreeze(model)
    restored = model[1]
    assert type(restored) is bn_class and restored is not original
    assert not restored.training
    for attribute in ("num_features", "eps", "momentum", "affine", "track_running_stats", "running_var_mode",
                      "nonfinite", "process_group", "_sync_tag", "_sync_name"):
        assert getattr(restored, attribute, None) == getattr(original, attribute, None), attribute
    for name, value in _state(expected).items():
        ours = getattr(restored, name)
        if value is None:
            assert ours is None, name
            continue
        assert torch.equal(ours, value) and ours.dtype == value.dtype, name
        assert ours.data_ptr() != getattr(original, name).data_ptr(), f"{name} is a copy"
    assert [(n, p.requires_grad) for n, p in restored.named_parameters()] == \
        [(n, p.requires_grad) for n, p in expected.named_parameters()]
    assert all(isinstance(p, torch.nn.Parameter) for p in restored.parameters())


def test_outputs_equal_batch_norm_eval_before_freezing_and_after_unfreezing():
    model = _resnet().train()
    x = torch.randn(4, 3, 8, 8)
    expected = copy.deepcopy(model).eval()(x)
    frozen = normkit.tools.freeze(model)
    assert frozen.training
    assert_close(frozen(x), expected, what="frozen, train mode")
    unfrozen = normkit.tools.unfreeze(frozen)
    assert unfrozen.training and all(m.training for m in unfrozen.modules())
    assert_close(unfrozen.eval()(x), expected, what="unfrozen, eval mode")


def test_state_dicts_are_interchangeable():
    model = _resnet()
    frozen = normkit.tools.freeze(copy.deepcopy(model))
    assert list(frozen.state_dict()) == list(model.state_dict())
    fresh = SmallResNet()
    fresh.load_state_dict(frozen.state_dict())  # strict
    normkit.tools.freeze(fresh).load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    assert_close(fresh(x), model.eval()(x))


def test_freeze_copies_state_so_the_old_layer_cannot_change_the_frozen_one():
    bn = torch.nn.BatchNorm2d(3)
    frozen = normkit.tools.freeze(bn)
    bn(torch.randn(4, 3, 2, 2))  # moves bn's running statistics
    with torch.no_grad():
        bn.weight.add_(1)
    assert torch.equal(frozen.running_mean, torch.zeros(3)) and torch.equal(frozen.weight, torch.ones(3))


def test_a_shared_batch_norm_stays_shared_and_is_frozen_everywhere():
    shared = torch.nn.BatchNorm1d(3)
    model = torch.nn.ModuleDict({"a": torch.nn.Sequential(shared), "b": torch.nn.Sequential(shared)})
    normkit.tools.freeze(model, ["a"])
    assert model["a"][0] is model["b"][0] and type(model["a"][0]) is FrozenBatchNorm1d
    normkit.tools.unfreeze(model)
    assert model["a"][0] is model["b"][0] and type(model["a"][0]) is torch.nn.BatchNorm1d


def test_unknown_name_raises_and_changes_nothing():
    model = _resnet()
    before = _kinds(model)
    with pytest.raises(ValueError, match=r"no submodule 'layer2\.5'.*Did you mean") as info:
        normkit.tools.freeze(model, ["layer1", "layer2.5"])
    assert "Nothing was changed" in str(info.value)
    assert _kinds(model) == before
    with pytest.raises(TypeError, match="dotted names"):
        normkit.tools.freeze(model, [0])
    assert normkit.tools.freeze(model, []) is model and _kinds(model) == before


class _BatchNormAct(torch.nn.BatchNorm2d):
    def forward(self, x):
        return torch.relu(super().forward(x))


@pytest.mark.parametrize(("layer", "error", "match"), [
    (_BatchNormAct(4), TypeError, "does not know"),
    (torch.nn.BatchNorm2d(4, track_running_stats=False), ValueError, "track_running_stats=False"),
    (torch.nn.LazyBatchNorm2d(), TypeError, "forward pass first"),
], ids=["unknown-subclass", "no-running-stats", "lazy"])
def test_layers_that_cannot_be_frozen_raise_and_change_nothing(layer, error, match):
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.Sequential(layer))
    with pytest.raises(error, match=match):
        normkit.tools.freeze(model)
    assert type(model[0]) is torch.nn.BatchNorm2d and model[1][0] is layer
    normkit.tools.freeze(model, ["0"])  # the rest can be frozen by name
    assert type(model[0]) is FrozenBatchNorm2d


def test_other_layers_are_untouched():
    model = _resnet()
    conv = model.layer1[0].conv1
    normkit.tools.freeze(model)
    assert model.layer1[0].conv1 is conv and conv.weight.requires_grad
