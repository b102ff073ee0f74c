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


@pytest.mark.parametrize("spec", ["gn32", "gn/16", "frozen", "brn", "ghost32", "bn-biased", "ln", "none"])
def test_norm_layer_specs_are_issue_5(spec):
    with pytest.raises(NotImplementedError, match=r"issue 5 \(model tools\)") as info:
        normkit.tools.convert(_model(), spec)
    assert repr(spec) in str(info.value)


def test_unknown_target_and_stray_options():
    with pytest.raises(ValueError, match="unknown target 'syncbn'"):
        normkit.tools.convert(_model(), "syncbn")
    with pytest.raises(TypeError, match="takes no options"):
        normkit.tools.convert(_model(), "torch", process_group=None)
