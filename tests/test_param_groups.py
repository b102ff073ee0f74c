"""normkit.tools.param_groups: the article's "10x smaller learning rate for BN" with a real optimizer step."""

from __future__ import annotations

import pytest
import torch

import normkit
import normkit.tools
from normkit.tools.param_groups import is_norm_layer


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3), normkit.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5), torch.nn.BatchNorm1d(5),
    )


def _ids(params):
    return [id(p) for p in params]


def test_sgd_moves_batch_norm_parameters_ten_times_less():
    model = _model().double()  # float64: the steps are compared to 1e-12
    groups = normkit.tools.param_groups(model, 0.1, norm_lr_scale=0.1)
    assert [g["name"] for g in groups] == ["other", "norm"]
    optimizer = torch.optim.SGD(groups, lr=0.1)
    model(torch.randn(6, 3, 8, 8, dtype=torch.float64)).square().mean().backward()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    norm_names = {f"{i}.{w}" for i in (1, 4, 8) for w in ("weight", "bias")}
    for name, p in model.named_parameters():
        lr = 0.01 if name in norm_names else 0.1
        torch.testing.assert_close(before[name] - p.detach(), lr * grads[name], rtol=1e-9, atol=1e-12,
                                   msg=lambda m, name=name: f"{name}: {m}")
    bn_step = (before["1.weight"] - model[1].weight).abs().sum() / grads["1.weight"].abs().sum()
    conv_step = (before["0.weight"] - model[0].weight).abs().sum() / grads["0.weight"].abs().sum()
    torch.testing.assert_close(conv_step / bn_step, torch.tensor(10.0, dtype=torch.float64))


def test_every_trainable_parameter_exactly_once_and_weight_decay():
    model = _model()
    model[7].bias.requires_grad_(False)
    groups = normkit.tools.param_groups(model, 0.5, norm_weight_decay=1e-5, weight_decay=1e-4)
    other, norm = groups
    assert (other["lr"], other["weight_decay"], norm["lr"], norm["weight_decay"]) == (0.5, 1e-4, 0.5, 1e-5)
    assert _ids(norm["params"]) == _ids([model[1].weight, model[1].bias, model[4].weight, model[4].bias,
                                         model[8].weight, model[8].bias])
    assert _ids(other["params"]) == _ids([model[0].weight, model[0].bias, model[3].weight, model[3].bias,
                                          model[7].weight])
    listed = _ids(other["params"] + norm["params"])
    assert sorted(listed) == sorted(_ids(p for p in model.parameters() if p.requires_grad))


def test_shared_parameters_appear_once_in_the_first_owners_group():
    norm = torch.nn.LayerNorm(4)
    linear = torch.nn.Linear(4, 4)
    linear.bias = norm.bias  # tied: registered first by the LayerNorm
    model = torch.nn.Sequential(norm, linear, norm)
    other, norm_group = normkit.tools.param_groups(model, 1.0)
    assert _ids(norm_group["params"]) == _ids([norm.weight, norm.bias])
    assert _ids(other["params"]) == _ids([linear.weight])


def test_empty_groups_are_dropped():
    assert [g["name"] for g in normkit.tools.param_groups(torch.nn.Linear(2, 2), 1.0)] == ["other"]
    assert [g["name"] for g in normkit.tools.param_groups(torch.nn.GroupNorm(2, 4), 1.0)] == ["norm"]
    frozen = normkit.tools.freeze(_model())
    assert [g["name"] for g in normkit.tools.param_groups(frozen, 1.0)] == ["other"]
    assert normkit.tools.param_groups(torch.nn.ReLU(), 1.0) == []


class EvoNorm2dB0(torch.nn.Module):  # like timm's: a norm that does not subclass torch's
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(3))


class Normalize(torch.nn.Module):  # not a norm layer by name
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(3))


class NormAct(torch.nn.BatchNorm2d):  # like timm's BatchNormAct2d: its own parameters count, not the activation's
    def __init__(self):
        super().__init__(3)
        self.act = torch.nn.PReLU()


@pytest.mark.parametrize(("module", "expected"), [
    (torch.nn.BatchNorm2d(3), True), (torch.nn.SyncBatchNorm(3), True), (torch.nn.GroupNorm(1, 3), True),
    (torch.nn.LayerNorm(3), True), (torch.nn.InstanceNorm2d(3, affine=True), True), (torch.nn.RMSNorm(3), True),
    (normkit.BatchNorm1d(3), True), (normkit.nn.FrozenBatchNorm2d(3), True), (EvoNorm2dB0(), True),
    (Normalize(), False), (torch.nn.Conv2d(3, 3, 1), False), (torch.nn.Linear(3, 3), False),
])
def test_what_counts_as_a_norm_layer(module, expected):
    assert is_norm_layer(module) is expected


def test_a_norm_act_layers_activation_parameters_are_not_norm_parameters():
    layer = NormAct()
    other, norm = normkit.tools.param_groups(layer, 1.0, norm_lr_scale=0.1)
    assert _ids(norm["params"]) == _ids([layer.weight, layer.bias])
    assert _ids(other["params"]) == _ids([layer.act.weight])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"lr": -1.0}, "lr must be a non-negative number"),
    ({"lr": 0.1, "norm_lr_scale": -0.1}, "norm_lr_scale"),
    ({"lr": 0.1, "weight_decay": float("nan")}, "weight_decay"),
    ({"lr": "0.1"}, "lr must be"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        normkit.tools.param_groups(_model(), **kwargs)


def test_parameters_instead_of_a_model():
    with pytest.raises(TypeError, match="not model.parameters"):
        normkit.tools.param_groups(_model().parameters(), 0.1)
