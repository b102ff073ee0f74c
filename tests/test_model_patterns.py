"""Real model blocks after ``tools.convert``: in-place ReLU and ``out += identity`` after the norm, trained a few steps
next to the same model with torch's layers (the patterns of torchvision's ResNet and MobileNet)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normkit
from normkit.tools import convert

# normkit's statistics composition on the small planes these tests afford (see tests/conftest.py)
pytestmark = pytest.mark.usefixtures("composition_from_128_values")


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv-bn-relu_, conv-bn, ``out += identity``, relu_."""

    def __init__(self, channels: int, downsample: bool = False):
        super().__init__()
        out = channels * 2 if downsample else channels
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(channels, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.downsample = nn.Sequential(nn.Conv2d(channels, out, 1, stride, bias=False),
                                        nn.BatchNorm2d(out)) if downsample else None

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class Bottleneck(nn.Module):
    """torchvision's ResNet bottleneck: 1x1 - 3x3 - 1x1 with in-place ReLUs and ``out += identity``."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, channels, 1, bias=False), nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += x
        return self.relu(out)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: expand 1x1, depthwise 3x3, project 1x1 (ReLU6 in place), residual add."""

    def __init__(self, channels: int, expand: int):
        super().__init__()
        hidden = channels * expand
        self.block = nn.Sequential(
            nn.Conv2d(channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, channels, 1, bias=False), nn.BatchNorm2d(channels),
        )

    def forward(self, x):
        return x + self.block(x)


def resnet_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         BasicBlock(8), BasicBlock(8, downsample=True), Bottleneck(16, 4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))


def mobilenet_like() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU6(inplace=True),
                         InvertedResidual(8, 4), InvertedResidual(8, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


MODELS = {"resnet": resnet_like, "mobilenet": mobilenet_like}
# Maps of 16x16 and 8x8 take normkit's statistics composition (planes of >= 128 values), 4x4 ATen's kernels.
SIZES = {"resnet": 16, "mobilenet": 24}


def _train(model: nn.Module, batches, dtype, memory_format) -> list[torch.Tensor]:
    model = model.to(dtype=dtype, memory_format=memory_format).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x.to(dtype).contiguous(memory_format=memory_format)), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return losses


def _batches(size: int, steps: int = 4, batch: int = 6):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, size, size, generator=gen), torch.randint(0, 10, (batch,), generator=gen))
            for _ in range(steps)]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)], ids=["float64", "float32"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_converted_model_trains_like_torch(name, dtype, tol, memory_format):
    torch.manual_seed(0)
    theirs = MODELS[name]()
    ours = convert(copy.deepcopy(theirs), "normkit")
    assert sum(isinstance(m, normkit.BatchNorm2d) for m in ours.modules()) >= 5
    assert not any(type(m) is nn.BatchNorm2d for m in ours.modules())
    batches = _batches(SIZES[name])
    losses_theirs = _train(theirs, batches, dtype, memory_format)
    losses_ours = _train(ours, batches, dtype, memory_format)
    torch.testing.assert_close(torch.stack(losses_ours), torch.stack(losses_theirs), atol=tol, rtol=tol)
    state_ours, state_theirs = ours.state_dict(), theirs.state_dict()
    assert state_ours.keys() == state_theirs.keys()
    for key, value in state_theirs.items():
        torch.testing.assert_close(state_ours[key], value, atol=tol * 10, rtol=tol * 10, msg=key)
    ours.eval(), theirs.eval()
    x = batches[0][0].to(dtype).contiguous(memory_format=memory_format)
    torch.testing.assert_close(ours(x), theirs(x), atol=tol * 10, rtol=tol * 10)


@pytest.mark.parametrize("spec", ["gn/4", "sync", "brn", "frozen"])
def test_other_conversions_train_with_in_place_ops(spec):
    """Every conversion keeps a model with in-place ReLU and ``out += identity`` trainable (the patterns used to
    fail with 'a view ... is being modified inplace' after the norm)."""
    torch.manual_seed(0)
    model = convert(resnet_like(), spec)
    losses = _train(model, _batches(16, steps=2), torch.float32, torch.contiguous_format)
    assert all(torch.isfinite(loss) for loss in losses)


@pytest.mark.parametrize("act", ["relu", "silu", None])
def test_batchnormact_block_matches_the_composition(act):
    """``BatchNormAct2d(x, residual)`` in a ResNet block equals torch's bn + add + activation, and trains."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 8, 3, 1, 1, bias=False)
    fused, plain = normkit.BatchNormAct2d(8, act=act), nn.BatchNorm2d(8)
    activation = {"relu": torch.relu, "silu": nn.functional.silu, None: lambda t: t}[act]
    x = torch.randn(4, 8, 16, 16, dtype=torch.float64, requires_grad=True)
    conv, fused, plain = conv.double(), fused.double(), plain.double()
    outputs, grads = [], []
    for forward in (lambda t: fused(conv(t), t), lambda t: activation(plain(conv(t)) + t)):
        xi = x.detach().clone().requires_grad_()
        y = forward(xi)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=y.dtype)).view_as(y))
        outputs.append(y.detach())
        grads.append(xi.grad)
    torch.testing.assert_close(outputs[0], outputs[1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(fused.running_var, plain.running_var, atol=1e-12, rtol=1e-12)
