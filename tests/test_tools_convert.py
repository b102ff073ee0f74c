"""normkit.tools.sync and normkit.tools.convert: types, shared state, training flag, roots, refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import normkit
import normkit.tools
from normkit.tools.convert import layer_tag

from helpers import assert_close, snapshot

nk = normkit.nn


def _model(bn=torch.nn.BatchNorm2d, **kwargs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), bn(4, **kwargs), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(4, 5, 1), bn(5, **kwargs)),
        torch.nn.Flatten(), torch.nn.Linear(5 * 4 * 4, 6),
        torch.nn.BatchNorm1d(6) if bn is torch.nn.BatchNorm2d else normkit.BatchNorm1d(6, **kwargs),
    )
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(3)
    return model


def _batch_norms(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _state_objects(module):
    return [module.weight, module.bias, module.running_mean, module.running_var, module.num_batches_tracked]


@pytest.mark.parametrize("source", [torch.nn.BatchNorm2d, normkit.BatchNorm2d], ids=["torch", "normkit"])
def test_sync_replaces_every_batch_norm_and_shares_its_state(source):
    model = _model(source)
    before = {name: _state_objects(m) for name, m in _batch_norms(model)}
    x = torch.randn(4, 3, 6, 6)
    expected = copy.deepcopy(model).eval()(x)
    synced = normkit.tools.sync(model)
    assert synced is model
    for name, module in _batch_norms(synced):
        assert type(module) is nk.SyncBatchNorm, name
        assert all(a is b for a, b in zip(_state_objects(module), before[name], strict=True)), name
        assert module._sync_name == name and module._sync_tag == layer_tag(name)
    assert len({m._sync_tag for _, m in _batch_norms(synced)}) == 3
    assert_close(synced.eval()(x), expected, what="eval output")


def test_sync_keeps_training_flags_options_and_process_group():
    model = _model(normkit.BatchNorm2d, running_var="biased", nonfinite="raise")
    model.train()
    model[3][1].eval()
    group = object()
    synced = normkit.tools.sync(model, process_group=group)
    assert synced[1].training and not synced[3][1].training
    assert synced[1].running_var_mode == "biased" and synced[1].nonfinite == "raise"
    assert synced[1].process_group is group
    assert synced[6].running_var_mode == "biased"


def test_sync_of_a_batch_norm_root_returns_a_new_layer_and_matches_it():
    bn = torch.nn.BatchNorm1d(3, momentum=None, eps=1e-3, affine=False)
    synced = normkit.tools.sync(bn)
    assert synced is not bn and type(synced) is nk.SyncBatchNorm
    assert (synced.momentum, synced.eps, synced.affine, synced.weight) == (None, 1e-3, False, None)
    x = torch.randn(6, 3)
    twin = copy.deepcopy(bn)
    assert_close(synced(x), twin(x), what="train output (no process group: plain BatchNorm)")
    assert torch.equal(bn.running_var, twin.running_var)  # shared buffers moved


def test_sync_keeps_a_normkit_sync_batch_norm_and_a_shared_module_stays_shared():
    shared = torch.nn.BatchNorm1d(3)
    kept = nk.SyncBatchNorm(3)
    model = torch.nn.ModuleDict({"a": shared, "b": shared, "c": kept})
    normkit.tools.sync(model)
    assert model["a"] is model["b"] and type(model["a"]) is nk.SyncBatchNorm
    assert model["c"] is kept and kept._sync_name == "c"
    assert normkit.tools.sync(kept) is kept


def test_torch_sync_batch_norm_becomes_normkit_and_back():
    group = object()
    theirs = torch.nn.SyncBatchNorm(4, process_group=group)
    ours = normkit.tools.convert(theirs, "normkit")
    assert type(ours) is nk.SyncBatchNorm and ours.process_group is group and ours.weight is theirs.weight
    back = normkit.tools.convert(ours, "torch")
    assert type(back) is torch.nn.SyncBatchNorm and back.process_group is group
    assert back.running_var is theirs.running_var


def test_convert_sync_batchnorm_classmethod_gives_normkit_layers():
    model = _model()
    converted = nk.SyncBatchNorm.convert_sync_batchnorm(model)
    assert all(type(m) is nk.SyncBatchNorm for _, m in _batch_norms(converted))
    assert isinstance(converted[1], torch.nn.SyncBatchNorm)


def test_convert_sync_is_sync():
    model = normkit.tools.convert(_model(), "sync", process_group=None)
    assert all(type(m) is nk.SyncBatchNorm for _, m in _batch_norms(model))


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_normkit_and_torch_round_trip_without_changing_outputs(train):
    model = _model().train(train)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 3, 6, 6)
    ours = normkit.tools.convert(model, "normkit")
    assert [type(m) for _, m in _batch_norms(ours)] == [nk.BatchNorm2d, nk.BatchNorm2d, nk.BatchNorm1d]
    assert_close(ours(x), reference(x), what="normkit output")
    theirs = normkit.tools.convert(ours, "torch")
    assert [type(m) for _, m in _batch_norms(theirs)] == [torch.nn.BatchNorm2d, torch.nn.BatchNorm2d,
                                                          torch.nn.BatchNorm1d]
    assert_close(theirs(x), reference(x), what="torch output")
    for (name, a), (_, b) in zip(theirs.state_dict().items(), reference.state_dict().items(), strict=True):
        assert_close(a, b, what=name)
    assert theirs.training == train


def test_convert_to_torch_refuses_a_biased_running_var_and_changes_nothing():
    model = torch.nn.Sequential(normkit.BatchNorm1d(3), normkit.BatchNorm1d(3, running_var="biased"))
    with pytest.raises(ValueError, match="running_var='biased'"):
        normkit.tools.convert(model, "torch")
    assert type(model[0]) is normkit.BatchNorm1d


class _BatchNormAct(torch.nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a batch norm subclass that adds an activation."""

    def __init__(self, num_features):
        super().__init__(num_features)
        self.act = torch.nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class _BatchNormActWithHook(_BatchNormAct):
    def to_sync(self, process_group):
        synced = torch.nn.Sequential(normkit.tools.sync(torch.nn.BatchNorm2d(self.num_features), process_group),
                                     self.act)
        return synced


def test_sync_refuses_an_unknown_batch_norm_subclass_and_changes_nothing():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), _BatchNormAct(4))
    before = snapshot(model)
    with pytest.raises(TypeError, match="to_sync"):
        normkit.tools.sync(model)
    assert type(model[0]) is torch.nn.BatchNorm2d
    assert snapshot(model).keys() == before.keys()


def test_sync_uses_the_to_sync_hook():
    model = normkit.tools.sync(torch.nn.Sequential(_BatchNormActWithHook(4)))
    assert isinstance(model[0], torch.nn.Sequential) and type(model[0][0]) is nk.SyncBatchNorm


def test_normkit_and_torch_leave_unknown_subclasses_alone():
    layer = _BatchNormAct(4)
    assert normkit.tools.convert(layer, "normkit") is layer
    assert normkit.tools.convert(layer, "torch") is layer


def test_sync_refuses_an_uninitialized_lazy_batch_norm():
    with pytest.raises(TypeError, match="Run one forward pass first"):
        normkit.tools.sync(torch.nn.Sequential(torch.nn.LazyBatchNorm2d()))


@pytest.mark.parametrize(("spec", "name"), [("brn", "BatchRenorm2d"), ("ghost2", "GhostBatchNorm2d"),
                                             ("cbn", "CrossIterationBatchNorm2d")])
def test_family_specs_carry_parameters_and_statistics(spec, name):
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.uniform_()
    new = normkit.tools.convert(model, spec)[1]
    assert type(new).__name__ == name
    assert new.weight is bn.weight and new.bias is bn.bias
    assert new.running_mean is bn.running_mean and new.running_var is bn.running_var
    assert new.training == bn.training


def test_unknown_target_and_stray_options():
    with pytest.raises(ValueError, match="unknown target 'syncbn'"):
        normkit.tools.convert(_model(), "syncbn")
    with pytest.raises(TypeError, match="takes no options"):
        normkit.tools.convert(_model(), "torch", process_group=None)


# --- norm_layer specs (issue 5) -------------------------------------------------------------------------------


def _wide_model(**kwargs):
    """Channel counts divisible by 32, a BatchNorm1d head, an existing GroupNorm that must stay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3), torch.nn.BatchNorm2d(32, **kwargs), torch.nn.ReLU(),
        torch.nn.Sequential(torch.nn.Conv2d(32, 64, 1), normkit.BatchNorm2d(64, **kwargs)),
        torch.nn.GroupNorm(4, 64), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
        torch.nn.Linear(64, 32), torch.nn.BatchNorm1d(32, **kwargs),
    )
    with torch.no_grad():
        for _, module in _batch_norms(model):
            if module.weight is not None:
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.5, 0.5)
    return model


@pytest.mark.parametrize(("spec", "groups"), [("gn32", (32, 32, 32)), ("gn/16", (2, 4, 2)), ("ln", (1, 1, 1))])
def test_convert_to_group_norm_carries_the_affine_parameters_and_eps(spec, groups):
    model = _wide_model(eps=1e-3).eval()
    weights = [(m.weight, m.bias) for _, m in _batch_norms(model)]
    kept = model[4]
    converted = normkit.tools.convert(model, spec)
    assert converted is model and model[4] is kept and not model.training
    new = [model[1], model[3][1], model[8]]
    assert all(type(m) is normkit.nn.GroupNorm for m in new)
    assert tuple(m.num_groups for m in new) == groups
    for m, (weight, bias) in zip(new, weights, strict=True):
        assert m.weight is weight and m.bias is bias and m.eps == 1e-3 and not m.training
    x = torch.randn(2, 3, 6, 6)
    assert model(x).shape == (2, 32)


def test_convert_to_group_norm_carries_affine_false_and_bias_false():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(32, affine=False), normkit.BatchNorm2d(32, bias=False))
    weight = model[1].weight
    normkit.tools.convert(model, "gn32")
    assert model[0].weight is None and model[0].bias is None
    assert model[1].weight is weight and model[1].bias is None


def test_gn32_on_channels_it_does_not_divide_names_c_and_changes_nothing():
    model = _model()  # channels 4, 5, 6
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match=r"layer '1' \(BatchNorm2d\(4\)\).*got C=4") as info:
        normkit.tools.convert(model, "gn32")
    assert "Nothing was converted" in str(info.value)
    assert [type(m) for m in model] == before


@pytest.mark.parametrize("source", [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d])
def test_convert_to_instance_norm_picks_the_rank(source):
    bn = source(8)
    converted = normkit.tools.convert(bn, "in")
    rank = source.__name__[-2]
    assert type(converted) is getattr(normkit.nn, f"InstanceNorm{rank}d")
    assert converted.weight is bn.weight and converted.affine and not converted.track_running_stats


def test_convert_to_frozen_is_freeze_and_unfreezes():
    model = _model().train()
    x = torch.randn(4, 3, 6, 6)
    expected = copy.deepcopy(model).eval()(x)
    frozen = normkit.tools.convert(model, "frozen")
    assert [type(m) for _, m in frozen.named_modules() if isinstance(m, nk.FrozenBatchNorm)] == [
        nk.FrozenBatchNorm2d, nk.FrozenBatchNorm2d, nk.FrozenBatchNorm1d]
    assert frozen.training
    assert_close(frozen(x), expected, what="frozen output")
    back = normkit.tools.unfreeze(frozen)
    assert [type(m) for _, m in _batch_norms(back)] == [torch.nn.BatchNorm2d, torch.nn.BatchNorm2d,
                                                        torch.nn.BatchNorm1d]
    assert_close(back.eval()(x), expected, what="unfrozen output")


def test_convert_bn_and_bn_biased_share_state_and_keep_outputs():
    model = _model()
    state = {name: _state_objects(m) for name, m in _batch_norms(model)}
    x = torch.randn(4, 3, 6, 6)
    expected = copy.deepcopy(model).eval()(x)
    converted = normkit.tools.convert(model, "bn").eval()
    assert [type(m) for _, m in _batch_norms(converted)] == [nk.BatchNorm2d, nk.BatchNorm2d, nk.BatchNorm1d]
    for name, module in _batch_norms(converted):
        assert all(a is b for a, b in zip(_state_objects(module), state[name], strict=True)), name
    assert_close(converted(x), expected, what="eval output")
    kept = converted[1]
    assert normkit.tools.convert(converted, "bn")[1] is kept
    biased = normkit.tools.convert(converted, "bn-biased")
    assert all(m.running_var_mode == "biased" for _, m in _batch_norms(biased))
    assert biased[1].weight is kept.weight
    assert normkit.tools.convert(biased, "bn-biased")[1] is biased[1]


def test_convert_from_frozen_and_from_sync_layers():
    frozen = normkit.tools.freeze(torch.nn.BatchNorm2d(32, momentum=0.3))
    bn = normkit.tools.convert(frozen, "bn")
    assert type(bn) is nk.BatchNorm2d and bn.momentum == 0.3 and bn.weight.requires_grad
    gn = normkit.tools.convert(normkit.tools.freeze(torch.nn.BatchNorm1d(32)), "gn32")
    assert type(gn) is normkit.nn.GroupNorm and isinstance(gn.weight, torch.nn.Parameter)
    sync = torch.nn.SyncBatchNorm(8)
    with pytest.raises(ValueError, match="Pass dim=1, 2 or 3"):
        normkit.tools.convert(sync, "bn")
    assert type(normkit.tools.convert(sync, "bn", dim=3)) is nk.BatchNorm3d
    assert type(normkit.tools.convert(sync, "frozen")) is nk.FrozenBatchNorm
    assert type(normkit.tools.convert(sync, "frozen", dim=2)) is nk.FrozenBatchNorm2d
    assert type(normkit.tools.convert(sync, "gn/4")) is normkit.nn.GroupNorm


def test_convert_to_none_removes_batch_norms():
    model = _model()
    converted = normkit.tools.convert(model, "none")
    assert _batch_norms(converted) == [] and type(converted[1]) is torch.nn.Identity
    assert type(normkit.tools.convert(torch.nn.BatchNorm1d(3), "none")) is torch.nn.Identity


@pytest.mark.parametrize("spec", ["gn/4", "frozen", "in", "bn"])
def test_convert_refuses_unknown_subclasses_and_changes_nothing(spec):
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), _BatchNormAct(4))
    with pytest.raises(TypeError, match="does not know"):
        normkit.tools.convert(model, spec)
    assert type(model[0]) is torch.nn.BatchNorm2d


def test_convert_spec_options():
    with pytest.raises(TypeError, match="takes only the option dim"):
        normkit.tools.convert(_model(), "gn/1", process_group=None)
    with pytest.raises(ValueError, match="dim must be 1, 2 or 3"):
        normkit.tools.convert(_model(), "bn", dim=0)
    with pytest.raises(ValueError, match="unknown target 'gn32x'.*Did you mean 'gn32'"):
        normkit.tools.convert(_model(), "gn32x")
