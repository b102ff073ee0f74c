"""Contract tests for every member of the family, each against the torch module it must equal.

Members that generalize BatchNorm are configured where they reduce to it exactly (a ghost batch of the whole batch,
renorm bounds 1 and 0, a cross-iteration window of 1, no activation, a streaming momentum of 1); the drop-ins are
compared with their torch classes. Each case checks outputs, input/weight/bias gradients and buffers in training and
evaluation, memory format, a state_dict loaded from the torch twin, pickling, and a bfloat16 input.
"""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field

import pytest
import torch

import normkit.nn as nkn

from helpers import assert_close


@dataclass(frozen=True)
class Member:
    name: str
    build: object  # () -> our module
    twin: object  # () -> torch's module computing the same thing
    shape: tuple[int, ...]
    memory_format: torch.memory_format = torch.contiguous_format
    same_in_training: bool = True
    kwargs: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name


CL = torch.channels_last
FAMILY = [
    Member("GroupNorm", lambda: nkn.GroupNorm(4, 8), lambda: torch.nn.GroupNorm(4, 8), (3, 8, 5, 4)),
    Member("GroupNorm-cl", lambda: nkn.GroupNorm(2, 8), lambda: torch.nn.GroupNorm(2, 8), (3, 8, 5, 4), CL),
    Member("LayerNorm", lambda: nkn.LayerNorm((6, 5)), lambda: torch.nn.LayerNorm((6, 5)), (4, 3, 6, 5)),
    Member("InstanceNorm2d", lambda: nkn.InstanceNorm2d(8, affine=True, track_running_stats=True),
           lambda: torch.nn.InstanceNorm2d(8, affine=True, track_running_stats=True), (3, 8, 5, 4)),
    Member("InstanceNorm1d", lambda: nkn.InstanceNorm1d(8, affine=True),
           lambda: torch.nn.InstanceNorm1d(8, affine=True), (3, 8, 7)),
    Member("BatchNormAct2d-none", lambda: nkn.BatchNormAct2d(8, act=None), lambda: torch.nn.BatchNorm2d(8),
           (4, 8, 5, 4), CL),
    Member("BatchRenorm2d-bn", lambda: nkn.BatchRenorm2d(8, rmax=1.0, dmax=0.0, warmup_steps=0),
           lambda: torch.nn.BatchNorm2d(8), (4, 8, 5, 4)),
    Member("GhostBatchNorm2d-whole", lambda: nkn.GhostBatchNorm2d(8, 4), lambda: torch.nn.BatchNorm2d(8),
           (4, 8, 5, 4), CL),
    Member("GhostBatchNorm1d-whole", lambda: nkn.GhostBatchNorm1d(8, 6, grouping="strided"),
           lambda: torch.nn.BatchNorm1d(8), (6, 8)),
    Member("CrossIterationBatchNorm2d-window1", lambda: nkn.CrossIterationBatchNorm2d(8, window=1),
           lambda: torch.nn.BatchNorm2d(8), (4, 8, 5, 4)),
    Member("StreamingBatchNorm2d", lambda: nkn.StreamingBatchNorm2d(8), lambda: torch.nn.BatchNorm2d(8),
           (4, 8, 5, 4), same_in_training=False),
]


def _pair(member: Member, seed: int = 0):
    ours, theirs = member.build(), member.twin()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        if getattr(theirs, "running_mean", None) is not None:
            theirs.running_mean.copy_(torch.randn(theirs.running_mean.shape, generator=gen))
            theirs.running_var.copy_(torch.rand(theirs.running_var.shape, generator=gen) + 0.5)
    ours.load_state_dict(theirs.state_dict())  # the twin's checkpoint loads as is
    return ours, theirs


def _run(module, x, upstream):
    xi = x.detach().clone().requires_grad_()
    y = module(xi)
    y.backward(upstream)
    grads = [xi.grad] + [p.grad for p in module.parameters()]
    buffers = [b.clone() for b in module.buffers()]
    return y.detach(), grads, buffers


@pytest.mark.parametrize("member", FAMILY, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_member_equals_its_torch_twin(member, train):
    if train and not member.same_in_training:
        pytest.skip("its training output differs from BatchNorm's by design (tested in its own file)")
    ours, theirs = _pair(member)
    ours.train(train)
    theirs.train(train)
    for step in range(2):
        gen = torch.Generator().manual_seed(10 + step)
        x = (torch.randn(member.shape, generator=gen) * 2 + 1).contiguous(memory_format=member.memory_format)
        upstream = torch.randn(member.shape, generator=gen)
        y, grads, buffers = _run(ours, x, upstream)
        y_ref, grads_ref, buffers_ref = _run(theirs, x, upstream)
        assert_close(y, y_ref, what=f"{member} output")
        for g, g_ref in zip(grads, grads_ref, strict=True):
            assert_close(g, g_ref, what=f"{member} gradient")
        for b, b_ref in zip(buffers, buffers_ref, strict=True):
            assert_close(b.to(b_ref.dtype), b_ref, what=f"{member} buffer")
        assert y.is_contiguous(memory_format=member.memory_format)


@pytest.mark.parametrize("member", FAMILY, ids=str)
def test_member_pickles_and_takes_bfloat16(member):
    ours, _ = _pair(member)
    clone = pickle.loads(pickle.dumps(ours))
    assert type(clone) is type(ours) and isinstance(ours, type(member.twin()))
    x = torch.randn(member.shape)
    ours.eval()
    clone.eval()
    assert_close(clone(x), ours(x), what="pickled output")
    low = copy.deepcopy(ours)(x.bfloat16())
    assert low.dtype == torch.bfloat16
    assert_close(low.float(), ours(x), atol=5e-2, rtol=5e-2, what="bfloat16 output")
