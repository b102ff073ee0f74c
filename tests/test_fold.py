"""normkit.tools.fold: the fx fusion rules, Sequential fallback, four model families, refusals, the report."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import normkit
from normkit.tools.fold import FoldReport, fold

from helpers import assert_unchanged, snapshot


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics in every batch norm; returns the model in eval."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                c = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                    m.bias.copy_(torch.rand(c, generator=gen) - 0.5)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=gen) * 2 - 1)
                    m.running_var.copy_(torch.rand(c, generator=gen) * 1.5 + 0.5)
    return model.eval()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, bn=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = bn(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), bn(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class SmallResNet(nn.Module):
    def __init__(self, width: int = 8, bn=nn.BatchNorm2d) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn = bn(width)
        self.layers = nn.Sequential(BasicBlock(width, width, 1, bn), BasicBlock(width, 2 * width, 2, bn))
        self.head = nn.Linear(2 * width, 10)

    def forward(self, x):
        x = self.layers(torch.relu(self.bn(self.stem(x))))
        return self.head(x.mean((2, 3)))


class UNet(nn.Module):
    """Encoder/decoder with skip concatenation; the encoder output also feeds the skip (no extra BN user)."""

    def __init__(self, bn=nn.BatchNorm2d) -> None:
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn(4), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), bn(8), nn.ReLU())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.up_bn = bn(4)
        self.dec = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1), bn(4), nn.ReLU(), nn.Conv2d(4, 1, 1))

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(nn.functional.max_pool2d(e1, 2))
        u = torch.relu(self.up_bn(self.up(e2)))
        return self.dec(torch.cat([u, e1], 1))


def dcgan_generator(bn=nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(
        nn.ConvTranspose2d(16, 32, 4, 1, 0, bias=False), bn(32), nn.ReLU(True),
        nn.ConvTranspose2d(32, 16, 4, 2, 1, bias=False), bn(16), nn.ReLU(True),
        nn.ConvTranspose2d(16, 8, 4, 2, 1, bias=False, groups=2), bn(8), nn.ReLU(True),
        nn.ConvTranspose2d(8, 3, 4, 2, 1, bias=False), nn.Tanh(),
    )


def mlp(bn=nn.BatchNorm1d) -> nn.Module:
    return nn.Sequential(nn.Linear(64, 32), bn(32), nn.ReLU(), nn.Linear(32, 32, bias=False), bn(32), nn.ReLU(),
                         nn.Linear(32, 10))


def conv_nd(bn=None) -> nn.Module:
    return nn.Sequential(nn.Conv1d(3, 4, 3), nn.BatchNorm1d(4), nn.Flatten(1), nn.Unflatten(1, (4, 1, 1, 4)),
                         nn.Conv3d(4, 5, 1), nn.BatchNorm3d(5), nn.ReLU(),
                         nn.Flatten(2), nn.ConvTranspose1d(5, 6, 2, groups=1), nn.BatchNorm1d(6))


MODELS = {
    "resnet": (SmallResNet, nn.BatchNorm2d, normkit.BatchNorm2d, (4, 3, 16, 16), 6),
    "unet": (UNet, nn.BatchNorm2d, normkit.BatchNorm2d, (2, 1, 16, 16), 4),
    "dcgan": (dcgan_generator, nn.BatchNorm2d, normkit.BatchNorm2d, (2, 16, 1, 1), 3),
    "mlp": (mlp, nn.BatchNorm1d, normkit.BatchNorm1d, (8, 64), 2),
}


def _count_bns(model):
    return sum(isinstance(m, _BatchNorm) for m in model.modules())


@pytest.mark.parametrize("library", ["torch", "normkit"])
@pytest.mark.parametrize("name", MODELS)
def test_fold_matches_the_eval_model_and_leaves_it_untouched(name, library):
    build, torch_bn, normkit_bn, shape, expected_folds = MODELS[name]
    torch.manual_seed(0)
    model = randomize(build(bn=torch_bn if library == "torch" else normkit_bn))
    before = snapshot(model)
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        folded, report = fold(model, report=True)
        actual = folded(x)
    assert report.method == "fx" and report.trace_error is None
    assert len(report.folded) == expected_folds and report.kept == []
    assert _count_bns(folded) == 0 and _count_bns(model) == expected_folds
    assert type(folded) is type(model) and folded is not model
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    assert_unchanged(model, before)


def test_conv1d_conv3d_and_transposed_conv1d():
    torch.manual_seed(0)
    model = randomize(conv_nd())
    x = torch.randn(2, 3, 6)
    folded, report = fold(model, report=True)
    assert len(report.folded) == 3 and _count_bns(folded) == 0
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_folded_conv_gains_a_bias_and_keeps_requires_grad():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4)))
    folded = fold(model)
    assert model[0].bias is None
    assert isinstance(folded[0].bias, nn.Parameter) and folded[0].bias.requires_grad
    assert isinstance(folded[1], nn.Identity)
    assert dict(folded[0].named_parameters()).keys() == {"weight", "bias"}


def test_fold_without_affine_and_in_float64():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, affine=False))).double()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    folded = fold(model)
    assert folded[0].weight.dtype == torch.float64
    torch.testing.assert_close(folded(x), model(x), atol=1e-12, rtol=1e-12)


class TwoUsers(nn.Module):
    """torch.fx fusion rule: a conv output with two users is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.other = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + self.other(y)


class Untracked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.bn2 = normkit.BatchNorm2d(4)

    def forward(self, x):
        return self.bn2(self.conv2(self.bn(self.conv(x))))


def test_two_user_conv_output_is_kept():
    model = randomize(TwoUsers())
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, report=True)
    assert report.folded == []
    assert {name for name, _ in report.kept} == {"bn", "other"}
    assert all("2 users" in reason for _, reason in report.kept)
    torch.testing.assert_close(folded(x), model(x))


def test_untracked_batch_norm_is_kept():
    model = randomize(Untracked())
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, report=True)
    assert report.folded == [("conv2", "bn2")]
    assert report.kept == [("bn", "it does not track running statistics (it normalizes with batch statistics "
                                  "even in eval)")]
    assert isinstance(folded.bn, nn.BatchNorm2d) and isinstance(folded.bn2, nn.Identity)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(self.conv(x)))


class ReadsWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) * self.conv.weight.sum()


class AfterPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.pool = nn.MaxPool2d(2)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.pool(self.conv(x)))


@pytest.mark.parametrize(("model_class", "reason"), [
    (SharedConv, "conv is called more than once"),
    (ReadsWeights, "reads the parameters"),
    (AfterPool, "its input comes from MaxPool2d"),
])
def test_unsafe_pairs_are_kept(model_class, reason):
    model = randomize(model_class())
    x = torch.randn(2, 3, 4, 4)
    folded, report = fold(model, report=True)
    assert report.folded == [] and len(report.kept) == 1 and reason in report.kept[0][1]
    torch.testing.assert_close(folded(x), model(x))


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
        self.extra = nn.ModuleDict({"alias": self.net[2]})  # registered twice, called once

    def forward(self, x):
        return self.net(x)


def test_hooks_and_shared_names_are_kept():
    model = randomize(Aliased())
    model.net[1].register_forward_hook(lambda *args: None)
    _, report = fold(model, report=True)
    assert report.folded == []
    assert "hooks" in report.kept[0][1] and "several names" in report.kept[1][1]


class Untraceable(nn.Module):
    """Data-dependent control flow: symbolic tracing fails, the Sequential fallback still folds."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.features(x)
        if y.sum() > 0:
            y = y * 2
        return self.bn(self.conv(y))


def test_untraceable_model_falls_back_to_sequential_adjacency():
    model = randomize(Untraceable())
    x = torch.randn(2, 3, 6, 6)
    folded, report = fold(model, report=True)
    assert report.method == "sequential" and "TraceError" in report.trace_error
    assert report.folded == [("features.0", "features.1")]
    assert [name for name, _ in report.kept] == ["bn"]
    assert "could not be traced" in str(report)
    torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


def test_training_model_is_refused_and_untouched():
    model = randomize(mlp()).train()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"eval mode.*Call model.eval\(\) first"):
        fold(model)
    assert_unchanged(model, before)
    assert model.training
    model.eval()
    model[1].train()  # one batch norm left in training mode
    with pytest.raises(ValueError, match="1 is in training mode"):
        fold(model)


def test_not_a_module():
    with pytest.raises(TypeError, match="nn.Module"):
        fold(torch.randn(3))


def test_report_type_and_string():
    folded = fold(randomize(mlp()))
    assert isinstance(folded, nn.Sequential)
    _, report = fold(randomize(mlp()), report=True)
    assert isinstance(report, FoldReport)
    assert str(report).splitlines()[0] == "fold (fx): 2 batch norm(s) folded, 0 kept"


def test_folded_model_still_trains_and_deepcopies():
    folded = fold(randomize(SmallResNet()))
    copy.deepcopy(folded).train()(torch.randn(2, 3, 8, 8)).sum().backward()


@pytest.mark.parametrize("name", MODELS)
def test_frozen_batch_norms_fold_too(name):
    build, torch_bn, _, shape, expected_folds = MODELS[name]
    torch.manual_seed(0)
    model = normkit.tools.freeze(randomize(build(bn=torch_bn)).eval())
    frozen = sum(isinstance(m, normkit.nn.FrozenBatchNorm) for m in model.modules())
    x = torch.randn(shape)
    with torch.no_grad():
        expected = model(x)
        folded, report = fold(model, report=True)
        actual = folded(x)
    assert frozen == expected_folds and len(report.folded) == expected_folds and report.kept == []
    assert not any(isinstance(m, normkit.nn.FrozenBatchNorm) for m in folded.modules())
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
