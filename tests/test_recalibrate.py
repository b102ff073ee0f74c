"""normkit.tools.recalibrate: fvcore's precise-BN checks, update_bn's estimator, state restored, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
from normkit.tools.recalibrate import recalibrate

from helpers import assert_unchanged, snapshot

SPLIT = [2, 2, 4, 8, 16, 32, 64]  # fvcore's test_precise_bn: 128 samples in uneven batches


def _bns(model):
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def _params(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(("bn", "shape"), [
    (nn.BatchNorm1d, (128, 3)), (nn.BatchNorm1d, (128, 3, 5)), (nn.BatchNorm2d, (128, 3, 4, 4)),
    (nn.BatchNorm3d, (128, 3, 2, 2, 2)), (normkit.BatchNorm2d, (128, 3, 4, 4)),
    (nn.SyncBatchNorm, (128, 3, 4)), (normkit.SyncBatchNorm, (128, 3, 4)),
])
def test_population_statistics_do_not_depend_on_the_split(bn, shape):
    torch.manual_seed(0)
    x = torch.randn(shape) * torch.tensor([1.0, 3.0, 0.5]).view(1, 3, *([1] * (len(shape) - 2))) + 2.0
    one, split = bn(3), bn(3)
    recalibrate(one, [x])
    recalibrate(split, x.split(SPLIT))
    flat = x.transpose(0, 1).reshape(3, -1).double()
    torch.testing.assert_close(one.running_mean, split.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(one.running_var, split.running_var, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(split.running_mean, flat.mean(1).float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(split.running_var, flat.var(1, unbiased=True).float(), atol=1e-6, rtol=1e-6)
    assert int(split.num_batches_tracked) == len(SPLIT) and int(one.num_batches_tracked) == 1
    assert split.training and split.momentum == 0.1  # mode and momentum restored


def test_biased_layers_store_the_biased_variance():
    torch.manual_seed(0)
    x = torch.randn(128, 4) * 2 + 1
    bn = normkit.BatchNorm1d(4, running_var="biased")
    recalibrate(bn, x.split(SPLIT))
    torch.testing.assert_close(bn.running_var, x.double().var(0, unbiased=False).float(), atol=1e-6, rtol=1e-6)


def test_mean_of_batches_matches_torch_update_bn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), normkit.BatchNorm1d(3))
    reference = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3), nn.BatchNorm1d(3))
    reference.load_state_dict(model.state_dict())
    x = torch.randn(128, 5) * 3
    batches = x.split(SPLIT)
    recalibrate(model, batches, estimator="mean_of_batches")
    torch.optim.swa_utils.update_bn(batches, reference)
    for ours, theirs in zip(_bns(model), _bns(reference), strict=True):
        torch.testing.assert_close(ours.running_mean, theirs.running_mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.running_var, theirs.running_var, atol=1e-5, rtol=1e-5)
    population = recalibrate(nn.BatchNorm1d(5), batches)
    torch.testing.assert_close(population.running_var, x.var(0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(_bns(reference)[0].running_var, _bns(recalibrate(model, batches))[0].running_var)


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU(), nn.Dropout(0.5),
                         nn.Conv2d(4, 4, 1), normkit.BatchNorm2d(4, momentum=None), nn.Flatten(),
                         nn.Linear(64, 2))


def test_weights_bit_identical_modes_and_momentum_restored():
    model = _net().eval()
    model[3].train()  # a module with its own mode
    weights = _params(model)
    x = torch.randn(64, 3, 6, 6)
    recalibrate(model, [(x[:32], torch.zeros(32)), (x[32:], torch.zeros(32))])
    assert all(torch.equal(p, weights[name]) for name, p in model.named_parameters())
    assert [m.training for m in model.modules()] == [False, False, False, False, True, False, False, False, False]
    assert model[1].momentum == 0.3 and model[5].momentum is None
    with torch.no_grad():
        first = model[0](x).transpose(0, 1).reshape(4, -1)
    torch.testing.assert_close(model[1].running_mean, first.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model[1].running_var, first.var(1), atol=1e-5, rtol=1e-5)


def test_downstream_layers_see_batch_normalized_inputs():
    """The batch norms run in training mode (fvcore, update_bn): the second one sees batch-normalized inputs."""
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm1d(3)).eval()
    x = torch.randn(100, 3) * 5 + 3
    recalibrate(model, [x])
    torch.testing.assert_close(model[1].running_mean, torch.zeros(3), atol=1e-5, rtol=0)


def test_unused_batch_norm_keeps_its_statistics_and_warns():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.BatchNorm1d(2)
            self.unused = nn.BatchNorm1d(2)

        def forward(self, x):
            return self.used(x)

    model = Branchy()
    with torch.no_grad():
        model.unused.running_mean.fill_(0.7)
        model.unused.running_var.fill_(2.0)
    before = snapshot(model.unused)
    with pytest.warns(UserWarning, match=r"^recalibrate: no batch reached batch-norm layer 'unused' \(the forward did "
                                         r"not call it\); its running statistics were kept\.$"):
        recalibrate(model, [torch.randn(8, 2)])
    assert_unchanged(model.unused, before)


class FirstOnly(nn.Sequential):
    """A Sequential whose forward runs its first child only: the others are named '1', '2', ... and never called."""

    def forward(self, x):
        return self[0](x)


def test_messages_quote_numeric_layer_names_of_a_sequential():
    model = FirstOnly(nn.BatchNorm1d(2), nn.BatchNorm1d(2), nn.BatchNorm1d(2))
    with pytest.warns(UserWarning) as caught:
        recalibrate(model, [torch.randn(8, 2)])
    assert [str(w.message) for w in caught] == [
        "recalibrate: no batch reached batch-norm layers '1' and '2' (the forward did not call them); their running "
        "statistics were kept."]
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    before = snapshot(model)
    with pytest.raises(ValueError) as caught:
        recalibrate(model, [torch.full((8, 2), float("inf"))])
    assert str(caught.value) == (
        "recalibrate: the statistics of layer '1' (BatchNorm1d) over the data are not finite (inf/NaN inputs, or "
        "batches of one value per channel with the unbiased variance); check the data, or use larger batches. "
        "Nothing was changed.")
    assert_unchanged(model, before)


def test_a_batch_norm_model_is_named_as_the_model_itself():
    with pytest.raises(ValueError, match=r"the statistics of the model itself \(a BatchNorm2d\) over the data are "
                                         r"not finite"):
        recalibrate(nn.BatchNorm2d(3), [torch.full((4, 3, 2, 2), float("nan"))])


def test_untracked_batch_norm_is_skipped_and_reused_layer_pools_every_call():
    shared = nn.BatchNorm1d(2)
    model = nn.Sequential(nn.BatchNorm1d(2, track_running_stats=False), shared, nn.Linear(2, 2), shared)
    x = torch.randn(16, 2) * 3 + 1
    recalibrate(model, [x])
    assert model[0].running_mean is None
    with torch.no_grad():
        first = model[0](x)  # batch statistics in eval too
        seen = torch.cat([first, model[2](nn.functional.batch_norm(first, None, None, training=True))])
    torch.testing.assert_close(shared.running_mean, seen.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.running_var, seen.var(0), atol=1e-5, rtol=1e-5)
    assert int(shared.num_batches_tracked) == 2


def test_accepts_a_tensor_a_generator_and_a_dataloader():
    x = torch.randn(40, 3)
    a, b, c = nn.BatchNorm1d(3), nn.BatchNorm1d(3), nn.BatchNorm1d(3)
    recalibrate(a, x)  # one batch
    recalibrate(b, (chunk for chunk in x.split(7)))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(40)), batch_size=16)
    recalibrate(c, loader, num_batches=3)
    for bn in (b, c):
        torch.testing.assert_close(bn.running_mean, a.running_mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(bn.running_var, a.running_var, atol=1e-6, rtol=1e-6)


def test_num_batches_takes_the_first_batches():
    x = torch.randn(64, 3)
    bn = recalibrate(nn.BatchNorm1d(3), x.split(16), num_batches=2)
    torch.testing.assert_close(bn.running_mean, x[:32].mean(0), atol=1e-6, rtol=0)
    assert int(bn.num_batches_tracked) == 2


@pytest.mark.parametrize(("data", "kwargs", "error", "match"), [
    ([], {}, ValueError, "data gave no batches"),
    ([torch.randn(8, 4)] * 3, {"num_batches": 5}, ValueError, "num_batches=5 but data gave only 3"),
    ([torch.randn(8, 4)], {"estimator": "ema"}, ValueError, "unknown estimator 'ema'"),
    ([torch.randn(8, 4)], {"num_batches": 0}, ValueError, "positive int"),
    ([{"x": torch.randn(8, 4)}], {}, TypeError, "batch 0 is a dict"),
    (3, {}, TypeError, "iterable of batches"),
    ([torch.randn(8, 4), torch.randn(1, 4)], {}, ValueError, "more than 1 value per channel"),
    ([torch.randn(8, 4), torch.full((8, 4), float("nan"))], {}, ValueError, "not finite"),
])
def test_bad_input_raises_and_changes_nothing(data, kwargs, error, match):
    model = nn.Sequential(nn.Linear(4, 4), normkit.BatchNorm1d(4), nn.BatchNorm1d(4)).eval()
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
        model[2].num_batches_tracked.fill_(9)
    before = snapshot(model)
    with pytest.raises(error, match=match):
        recalibrate(model, data, **kwargs)
    assert_unchanged(model, before)
    assert not any(m.training for m in model.modules())
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_no_progress_output_when_disabled(capsys):
    recalibrate(nn.BatchNorm1d(3), [torch.randn(4, 3)] * 60, progress=False)
    recalibrate(nn.BatchNorm1d(3), [torch.randn(4, 3)] * 60)  # auto: not a terminal under pytest
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_progress_bar_runs():
    bn = recalibrate(nn.BatchNorm1d(3), [torch.randn(4, 3)] * 3, progress=True)
    assert int(bn.num_batches_tracked) == 3


class ScaledInput(nn.BatchNorm1d):
    """A batch norm subclass with its own forward: recalibrate reduces its input itself instead of reading the
    layer's momentum-1 update."""

    def forward(self, x):
        return super().forward(x)


def test_subclass_with_its_own_forward_gets_the_same_statistics():
    torch.manual_seed(0)
    x = torch.randn(128, 3, 5) * 2 + 1
    plain, custom = nn.BatchNorm1d(3), ScaledInput(3)
    for estimator in ("population", "mean_of_batches"):
        recalibrate(plain, x.split(SPLIT), estimator=estimator)
        recalibrate(custom, x.split(SPLIT), estimator=estimator)
        torch.testing.assert_close(custom.running_mean, plain.running_mean, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(custom.running_var, plain.running_var, atol=1e-6, rtol=1e-6)
    assert custom.momentum == 0.1 and not custom._forward_pre_hooks and not custom._forward_hooks
