"""The model tools on batch norms that carry an activation: normkit's BatchNormAct family and timm's BatchNormAct2d
layout (a local class with timm's attribute names and forward; timm itself is never imported), and hooks on the
layers the tools replace."""

from __future__ import annotations

import copy
import datetime
import pickle
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normkit
import normkit.nn as nkn
import normkit.tools as tools

from helpers import assert_close, snapshot

ACTS = ["relu", "silu", "gelu", None]
RANKS = [(nkn.BatchNormAct1d, nn.Conv1d, (3, 4, 9)), (nkn.BatchNormAct2d, nn.Conv2d, (3, 4, 6, 5)),
         (nkn.BatchNormAct3d, nn.Conv3d, (2, 4, 4, 3, 3))]


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's ``BatchNormAct2d`` layout: a BatchNorm2d subclass with ``drop`` and ``act`` modules and
    ``forward(x) = act(drop(batch_norm(x)))`` with its own batch-norm arithmetic."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, apply_act=True,
                 act_layer=nn.ReLU, inplace=True, drop_layer=None):
        super().__init__(num_features, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer(inplace=inplace) if apply_act and act_layer is not nn.PReLU else (
            act_layer(num_features) if apply_act else nn.Identity())

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        x = self.drop(x)
        return self.act(x)


def _trained(model: nn.Module, shape, steps: int = 3) -> nn.Module:
    """``model`` after a few training steps (non-trivial running statistics) and with non-trivial affines, in eval."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
                module.weight.copy_(torch.rand(module.weight.shape, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen))
        model.train()
        for _ in range(steps):
            model(torch.randn(shape, generator=gen) * 2 + 1)
    return model.eval()


class ResidualBlock(nn.Module):
    """A ResNet basic block with normkit's fused ``act(bn(conv(x)) + shortcut)``."""

    def __init__(self, channels: int = 4, act: str | None = "relu", positional: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nkn.BatchNormAct2d(channels, act=act)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nkn.BatchNormAct2d(channels, act=act)
        self.positional = positional

    def forward(self, x):
        y = self.bn1(self.conv1(x))
        return self.bn2(self.conv2(y), x) if self.positional else self.bn2(self.conv2(y), residual=x)


# ----------------------------------------------------------------------------------------------------------- fold


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("norm", "conv", "shape"), RANKS, ids=["1d", "2d", "3d"])
def test_fold_normkit_batch_norm_act_keeps_the_activation(norm, conv, shape, act):
    model = _trained(nn.Sequential(conv(3, 4, 3, bias=False), norm(4, act=act), conv(4, 4, 1)), (shape[0], 3,
                                                                                                  *shape[2:]))
    before = snapshot(model)
    folded, report = tools.fold(model, report=True)
    assert report.folded == [("0", "1")] and report.kept == []
    assert type(folded[1]) is nkn.ResidualAct and folded[1].act == act
    x = torch.randn(shape[0], 3, *[s + 2 for s in shape[2:]])
    assert_close(folded(x), model(x), what="folded output")
    assert snapshot(model).keys() == before.keys() and all(torch.equal(snapshot(model)[k], v)
                                                            for k, v in before.items())


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
def test_fold_a_residual_block_with_the_residual_passed_to_the_layer(positional):
    block = _trained(ResidualBlock(positional=positional), (4, 4, 6, 6))
    folded, report = tools.fold(block, report=True)
    assert report.method == "fx" and sorted(report.folded) == [("conv1", "bn1"), ("conv2", "bn2")]
    assert type(folded.bn2) is nkn.ResidualAct
    x = torch.randn(2, 4, 6, 6)
    assert_close(folded(x), block(x), what="folded residual block")


def test_fold_keeps_a_layer_whose_residual_is_the_convolution_output_itself():
    class SameTwice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 1), nkn.BatchNormAct2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y, residual=y)

    model = _trained(SameTwice(), (4, 3, 5, 5))
    folded, report = tools.fold(model, report=True)
    assert report.folded == [] and "also the residual" in report.kept[0][1]
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(folded(x), model(x))


def test_fold_timm_layout_keeps_drop_and_act_modules():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), TimmBatchNormAct2d(8, act_layer=nn.SiLU,
                                                                             drop_layer=lambda: nn.Dropout(0.3)),
                          nn.Conv2d(8, 8, 1, bias=False), TimmBatchNormAct2d(8, act_layer=nn.PReLU))
    model = _trained(model, (4, 3, 7, 7))
    folded, report = tools.fold(model, report=True)
    assert report.folded == [("0", "1"), ("2", "3")]
    assert type(folded[1]) is nkn.NormAct and type(folded[1].norm) is nn.Identity
    assert type(folded[1].act) is nn.SiLU and type(folded[1].drop) is nn.Dropout and not folded[1].drop.training
    assert [k for k in folded.state_dict() if k.startswith("3.")] == ["3.act.weight"]  # PReLU keeps its key
    x = torch.randn(2, 3, 7, 7)
    assert_close(folded(x), model(x), what="folded timm-style model")


def test_fold_sequential_fallback_and_frozen_and_sync_act_layers():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nkn.BatchNormAct2d(4, act="silu"),
                                      nn.Conv2d(4, 4, 1), TimmBatchNormAct2d(4),
                                      nn.Conv2d(4, 4, 1), nkn.SyncBatchNormAct(4, act="gelu"),
                                      nn.Conv2d(4, 4, 1), nkn.BatchNormAct2d(4, act="relu"))

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent: symbolic tracing fails
                x = self.body(x)
            return x

    model = _trained(Untraceable(), (4, 3, 6, 6))
    tools.freeze(model, ["body.7"])
    assert type(model.body[7]) is nkn.FrozenBatchNormAct2d
    folded, report = tools.fold(model, report=True)
    assert report.method == "sequential" and len(report.folded) == 4 and report.kept == []
    assert [type(m).__name__ for m in folded.body] == ["Conv2d", "ResidualAct", "Conv2d", "NormAct", "Conv2d",
                                                       "ResidualAct", "Conv2d", "ResidualAct"]
    x = torch.randn(2, 3, 6, 6)
    assert_close(folded(x), model(x), what="folded untraceable model")


def test_fold_frozen_timm_layout():
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 3), TimmBatchNormAct2d(4, act_layer=nn.SiLU)), (4, 3, 6, 6))
    frozen = tools.freeze(copy.deepcopy(model))
    folded, report = tools.fold(frozen.eval(), report=True)
    assert report.folded == [("0", "1")] and type(folded[1]) is nkn.NormAct
    x = torch.randn(2, 3, 6, 6)
    assert_close(folded(x), model(x), what="folded frozen timm-style model")


# --------------------------------------------------------------------------------------------------------- freeze


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("norm", "conv", "shape"), RANKS, ids=["1d", "2d", "3d"])
def test_freeze_batch_norm_act_keeps_activation_and_residual(norm, conv, shape, act):
    layer = norm(4, act=act, momentum=0.05)
    layer.weight.requires_grad_(False)
    _trained(layer, shape)
    original = copy.deepcopy(layer)
    frozen = tools.freeze(layer)
    assert type(frozen) is {1: nkn.FrozenBatchNormAct1d, 2: nkn.FrozenBatchNormAct2d,
                            3: nkn.FrozenBatchNormAct3d}[len(shape) - 2]
    assert frozen.act == act and list(frozen.state_dict()) == list(original.state_dict())
    x, residual = torch.randn(shape), torch.randn(shape)
    frozen.train()  # a frozen layer's output does not depend on the training flag
    assert_close(frozen(x), original(x), what="frozen output")
    assert_close(frozen(x, residual=residual), original(x, residual=residual), what="frozen output with residual")
    fresh = norm(4, act=act)
    fresh.load_state_dict(frozen.state_dict())  # its state_dict is a BatchNormAct's
    back = tools.unfreeze(frozen)
    assert type(back) is norm and back.act == act and back.momentum == 0.05 and not back.weight.requires_grad
    assert_close(back.eval()(x, residual=residual), original(x, residual=residual), what="unfrozen output")


def test_freeze_timm_layout_keeps_drop_and_act_and_unfreezes_to_its_class():
    layer = TimmBatchNormAct2d(4, act_layer=nn.PReLU, drop_layer=lambda: nn.Dropout(0.2))
    model = _trained(nn.Sequential(nn.Conv2d(3, 4, 1), layer), (4, 3, 5, 5))
    original = copy.deepcopy(model)
    act, drop = layer.act, layer.drop
    keys = list(model.state_dict())
    tools.freeze(model)
    frozen = model[1]
    assert type(frozen) is nkn.FrozenBatchNormDropAct and frozen.act is act and frozen.drop is drop
    assert list(model.state_dict()) == keys
    x = torch.randn(2, 3, 5, 5)
    model.train()
    frozen.drop.eval()  # the dropout is the layer's own module, in the mode the model puts it
    assert_close(model(x), original(x), what="frozen timm-style output")
    clone = pickle.loads(pickle.dumps(model))
    assert_close(clone(x), model(x), what="pickled frozen output")
    tools.unfreeze(model)
    back = model[1]
    assert type(back) is TimmBatchNormAct2d and back.act is act and back.drop is drop
    assert back.weight.requires_grad and back.training
    for name, value in original[1].state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    model.eval()
    assert_close(model(x), original(x), what="unfrozen timm-style output")


def test_freeze_sync_batch_norm_act_and_convert_frozen():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nkn.SyncBatchNormAct(4, act="silu"), nn.Conv2d(4, 4, 1),
                          nkn.BatchNormAct2d(4, act="gelu"), nn.Conv2d(4, 4, 1), TimmBatchNormAct2d(4))
    model = _trained(model, (4, 3, 5, 5))
    original = copy.deepcopy(model)
    frozen = tools.convert(model, "frozen")
    assert [type(m).__name__ for m in frozen[1::2]] == ["FrozenBatchNormAct", "FrozenBatchNormAct2d",
                                                        "FrozenBatchNormDropAct"]
    x = torch.randn(2, 3, 5, 5)
    assert_close(frozen(x), original(x), what="frozen model output")
    back = tools.unfreeze(frozen)
    assert [type(m) for m in back[1::2]] == [nkn.SyncBatchNormAct, nkn.BatchNormAct2d, TimmBatchNormAct2d]
    assert back[1].act == "silu" and back[3].act == "gelu"
    assert type(tools.convert(copy.deepcopy(original), "frozen", dim=2)[1]) is nkn.FrozenBatchNormAct2d


def test_frozen_act_errors():
    with pytest.raises(TypeError, match="BatchNormAct1d/2d/3d or SyncBatchNormAct"):
        nkn.FrozenBatchNormAct.from_batch_norm(nn.BatchNorm2d(4))
    with pytest.raises(TypeError, match="act and drop submodules"):
        nkn.FrozenBatchNormDropAct.from_batch_norm(nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="act must be one of"):
        nkn.FrozenBatchNormAct2d(4, act="tanh")
    model = nn.Sequential(nkn.FrozenBatchNorm2d(4), nkn.FrozenBatchNormDropAct(4, act=nn.ReLU()))
    with pytest.raises(TypeError, match="built directly"):
        tools.unfreeze(model)
    assert type(model[0]) is nkn.FrozenBatchNorm2d  # checked before anything changed
    frozen = nkn.FrozenBatchNormAct2d(4)
    with pytest.raises(ValueError, match="residual must have the input's shape"):
        frozen(torch.randn(2, 4, 3, 3), residual=torch.randn(2, 4, 3, 2))


# ----------------------------------------------------------------------------------------------------------- sync


def test_sync_batch_norm_act_shares_state_and_keeps_activation():
    layer = nkn.BatchNormAct2d(4, act="silu", running_var="biased")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    reference = copy.deepcopy(model)
    tools.sync(model)
    synced = model[1]
    assert type(synced) is nkn.SyncBatchNormAct and synced.act == "silu" and synced.running_var_mode == "biased"
    assert synced.weight is layer.weight and synced.running_mean is layer.running_mean and synced._sync_name == "1"
    gen = torch.Generator().manual_seed(1)
    for train in (True, False):  # without a process group: BatchNormAct's computation
        model.train(train)
        reference.train(train)
        x, residual = torch.randn(4, 3, 5, 5, generator=gen), torch.randn(4, 4, 5, 5, generator=gen)
        assert_close(synced(model[0](x), residual), reference[1](reference[0](x), residual), what="synced output")
        assert_close(synced.running_var, reference[1].running_var, what="running_var")


def test_sync_refuses_timm_layout_and_points_to_timm():
    model = nn.Sequential(nn.BatchNorm2d(4), TimmBatchNormAct2d(4))
    with pytest.raises(TypeError, match="convert_sync_batchnorm"):
        tools.sync(model)
    assert type(model[0]) is nn.BatchNorm2d


def test_sync_act_single_process_gloo_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        layer = nkn.BatchNormAct2d(4, act="relu")
        reference = copy.deepcopy(layer)
        synced = tools.sync(layer, dist.group.WORLD)
        assert synced.process_group is dist.group.WORLD
        x, residual = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
        assert_close(synced(x, residual=residual), reference(x, residual=residual), what="world of one")
        assert_close(synced.running_mean, reference.running_mean, what="running_mean")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_rank_worker(rank: int, port: int, folder: str) -> None:
    """Each rank runs SyncBatchNormAct on its half of one batch; it records output, input gradient and statistics."""
    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=20))
        gen = torch.Generator().manual_seed(0)
        x, residual = torch.randn(6, 4, 3, 3, generator=gen) * 2 + 1, torch.randn(6, 4, 3, 3, generator=gen)
        upstream = torch.randn(6, 4, 3, 3, generator=gen)
        parts = (slice(0, 2), slice(2, 6))  # uneven
        layer = tools.sync(nkn.BatchNormAct2d(4, act="silu"))
        mine = x[parts[rank]].clone().requires_grad_()
        y = layer(mine, residual=residual[parts[rank]])
        y.backward(upstream[parts[rank]])
        result = {"y": y.detach(), "grad": mine.grad, "mean": layer.running_mean.clone(),
                  "var": layer.running_var.clone()}
        dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the test reports the traceback
        result = {"error": traceback.format_exc()}
    torch.save(result, Path(folder) / f"rank{rank}.pt")


def test_sync_act_two_gloo_ranks_equal_one_process_on_the_whole_batch(tmp_path):
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_two_rank_worker, args=(rank, port, str(tmp_path)), daemon=True) for rank in (0, 1)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + 90
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
    results = [torch.load(tmp_path / f"rank{r}.pt") if (tmp_path / f"rank{r}.pt").exists() else {"error": "no result"}
               for r in (0, 1)]
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result['error']}"
    gen = torch.Generator().manual_seed(0)
    x, residual = torch.randn(6, 4, 3, 3, generator=gen) * 2 + 1, torch.randn(6, 4, 3, 3, generator=gen)
    upstream = torch.randn(6, 4, 3, 3, generator=gen)
    whole = nkn.BatchNormAct2d(4, act="silu")
    xi = x.clone().requires_grad_()
    y = whole(xi, residual=residual)
    y.backward(upstream)
    assert_close(torch.cat([r["y"] for r in results]), y.detach(), what="output over two ranks")
    assert_close(torch.cat([r["grad"] for r in results]), xi.grad, what="input gradient over two ranks")
    for r in results:
        assert_close(r["mean"], whole.running_mean, what="running_mean")
        assert_close(r["var"], whole.running_var, what="running_var")


# -------------------------------------------------------------------------------------------------------- convert


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize(("norm", "conv", "shape"), RANKS, ids=["1d", "2d", "3d"])
def test_convert_torch_turns_batch_norm_act_into_torch_modules(norm, conv, shape, act):
    model = _trained(nn.Sequential(conv(3, 4, 1), norm(4, act=act)), (shape[0], 3, *shape[2:]))
    reference = copy.deepcopy(model)
    layer = model[1]
    converted = tools.convert(model, "torch")
    new = converted[1]
    plain = new if act is None else new[0]
    torch_bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[len(shape) - 2]
    assert type(plain) is torch_bn and plain.weight is layer.weight and plain.running_var is layer.running_var
    if act is not None:
        assert type(new) is nn.Sequential and type(new[1]) is {"relu": nn.ReLU, "silu": nn.SiLU, "gelu": nn.GELU}[act]
    assert all(type(m).__module__.startswith("torch.") for m in converted.modules())
    gen = torch.Generator().manual_seed(3)
    for train in (False, True):
        converted.train(train)
        reference.train(train)
        x = torch.randn(shape[0], 3, *shape[2:], generator=gen)
        assert_close(converted(x), reference(x), what=f"converted output (train={train})")
    assert_close(plain.running_mean, reference[1].running_mean, what="running_mean after a training step")
    back = tools.convert(converted, "normkit")[1]  # no fusion: normkit's plain batch norm, the activation after
    assert type(back if act is None else back[0]) is {1: nkn.BatchNorm1d, 2: nkn.BatchNorm2d,
                                                      3: nkn.BatchNorm3d}[len(shape) - 2]


def test_convert_torch_sync_act_and_refusals():
    synced = nkn.SyncBatchNormAct(4, act="gelu")
    torch_version = tools.convert(nn.Sequential(synced), "torch")[0]
    assert type(torch_version[0]) is nn.SyncBatchNorm and torch_version[0].weight is synced.weight
    with pytest.raises(ValueError, match="biased"):
        tools.convert(nkn.BatchNormAct2d(4, running_var="biased"), "torch")
    layer = nkn.BatchNormAct2d(4)
    assert tools.convert(layer, "normkit") is layer
    timm_like = TimmBatchNormAct2d(4)
    assert tools.convert(timm_like, "torch") is timm_like and tools.convert(timm_like, "normkit") is timm_like
    for spec, module in (("gn2", nkn.BatchNormAct2d(4)), ("bn", TimmBatchNormAct2d(4)),
                         ("in", nkn.FrozenBatchNormAct2d(4))):
        model = nn.Sequential(nn.BatchNorm2d(4), module)
        with pytest.raises(TypeError, match="would drop it"):
            tools.convert(model, spec)
        assert type(model[0]) is nn.BatchNorm2d and model[1] is module


# ---------------------------------------------------------------------------------------------------------- hooks


@pytest.mark.parametrize("to", ["torch", "normkit", "sync", "frozen", "gn2", "none"])
def test_convert_carries_forward_pre_and_backward_hooks(to):
    layer = nn.BatchNorm2d(4) if to != "torch" else nkn.BatchNormAct2d(4, act="silu")
    model = nn.Sequential(nn.Conv2d(3, 4, 1), layer)
    seen = []
    handles = [layer.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__))),
               layer.register_forward_hook(lambda m, args, out: seen.append(("post", out.shape))),
               layer.register_full_backward_hook(lambda m, gin, gout: seen.append(("backward", gout[0].shape)))]
    converted = tools.convert(model, to)
    new = converted[1]
    assert new is not layer
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    converted(x).sum().backward()
    assert seen == [("pre", type(new).__name__), ("post", (2, 4, 5, 5)), ("backward", (2, 4, 5, 5))]
    for handle in handles:
        handle.remove()  # the old handles remove the hooks from the new layer
    seen.clear()
    converted(x).sum().backward()
    assert seen == []


def test_freeze_and_sync_carry_hooks_and_state_dict_hooks_warn():
    model = nn.Sequential(nn.BatchNorm2d(4), nkn.BatchNormAct2d(4))
    calls = []
    model[1].register_forward_hook(lambda m, args, out: calls.append(type(m).__name__))
    tools.freeze(model)
    tools.sync(tools.unfreeze(model))
    model(torch.randn(2, 4, 3, 3))
    assert calls == ["SyncBatchNormAct"]
    model[0]._register_state_dict_hook(lambda module, state, prefix, local: state)
    with pytest.warns(UserWarning, match=r"^0: the replaced layer had state_dict hooks"):
        tools.convert(model, "torch")


def test_public_names():
    for name in ("FrozenBatchNormAct", "FrozenBatchNormAct1d", "FrozenBatchNormAct2d", "FrozenBatchNormAct3d",
                 "SyncBatchNormAct"):
        assert getattr(normkit, name) is getattr(nkn, name) and name in normkit.__all__
    assert "ResidualAct" in nkn.__all__ and "FrozenBatchNormDropAct" in nkn.__all__
