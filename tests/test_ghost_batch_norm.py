"""Ghost batch norm: closed-form checks against a loop of torch.nn.functional.batch_norm over ghost batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normkit.functional.ghost_batch_norm import ghost_batch_norm
from normkit.nn.batchnorm import BatchNorm2d
from normkit.nn.ghost import GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d

from helpers import assert_unchanged, snapshot

SHAPES = {GhostBatchNorm1d: (3, 5), GhostBatchNorm2d: (3, 4, 5), GhostBatchNorm3d: (3, 2, 3, 4)}


def reference_contiguous(x, rm, rv, w, b, momentum, eps, vbs):
    """The paper's code: input.chunk into consecutive ghost batches, one F.batch_norm (one EMA step) each."""
    outs = [F.batch_norm(c, rm, rv, w, b, True, momentum, eps) for c in x.split(vbs)]
    return torch.cat(outs)


def reference_strided(x, rm, rv, w, b, momentum, eps, vbs):
    """tf.keras: ghost batch g = samples g, g+G, ...; one update towards the mean of the ghost statistics."""
    ghosts = x.shape[0] // vbs
    out = torch.empty_like(x)
    means, variances = [], []
    for g in range(ghosts):
        piece = x[g::ghosts]
        out[g::ghosts] = F.batch_norm(piece, None, None, w, b, True, momentum, eps)
        dims = [d for d in range(x.dim()) if d != 1]
        means.append(piece.detach().mean(dims))
        variances.append(piece.detach().var(dims, unbiased=True))
    with torch.no_grad():
        rm.mul_(1 - momentum).add_(momentum * torch.stack(means).mean(0))
        rv.mul_(1 - momentum).add_(momentum * torch.stack(variances).mean(0))
    return out


def run_both(cls, batch, vbs, grouping, dtype=torch.float32, momentum=0.1, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = SHAPES[cls]
    x = (torch.randn(batch, *shape, generator=gen, dtype=dtype) * 3 + 1).requires_grad_()
    up = torch.randn(batch, *shape, generator=gen, dtype=dtype)
    m = cls(shape[0], vbs, momentum=momentum, grouping=grouping, dtype=dtype)
    with torch.no_grad():
        m.weight.uniform_(0.5, 2.0, generator=gen)
        m.bias.uniform_(-1.0, 1.0, generator=gen)
    w = m.weight.detach().clone().requires_grad_()
    b = m.bias.detach().clone().requires_grad_()
    rm, rv = m.running_mean.clone(), m.running_var.clone()
    x2 = x.detach().clone().requires_grad_()
    y = m(x)
    y.backward(up)
    ref = reference_contiguous if grouping == "contiguous" else reference_strided
    y2 = ref(x2, rm, rv, w, b, momentum, m.eps, vbs)
    y2.backward(up)
    return m, (y, x.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var), (y2, x2.grad, w.grad, b.grad,
                                                                                           rm, rv)


@pytest.mark.parametrize("cls", [GhostBatchNorm1d, GhostBatchNorm2d, GhostBatchNorm3d])
@pytest.mark.parametrize("grouping,batch,vbs", [("contiguous", 12, 4), ("contiguous", 12, 5), ("strided", 12, 4),
                                                ("strided", 12, 3)])
def test_matches_loop_of_torch_batch_norm(cls, grouping, batch, vbs):
    m, ours, theirs = run_both(cls, batch, vbs, grouping)
    for what, a, e in zip(("output", "grad x", "grad weight", "grad bias", "running_mean", "running_var"), ours,
                          theirs, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-5, msg=lambda s, what=what: f"{what}: {s}")
    expected_updates = -(-batch // vbs) if grouping == "contiguous" else 1
    assert int(m.num_batches_tracked) == expected_updates


def test_uneven_contiguous_last_ghost_batch_is_smaller():
    # 5 samples, virtual size 2: ghost batches {0, 1}, {2, 3}, {4} (two values per channel in the last one)
    x = torch.tensor([[0.0, 2.0], [4.0, 6.0], [1.0, 3.0], [5.0, 9.0], [10.0, 20.0]]).view(5, 1, 2)
    y = ghost_batch_norm(x, None, None, training=True, virtual_batch_size=2, eps=1e-5)
    last = x[4:]
    expected = (last - last.mean()) / (last.var(unbiased=False) + 1e-5).sqrt()
    torch.testing.assert_close(y[4:], expected)
    first = x[:2]
    torch.testing.assert_close(y[:2], (first - first.mean()) / (first.var(unbiased=False) + 1e-5).sqrt())


def test_keras_virtual_batch_size_numbers():
    # semantics.md item 27: tf.keras virtual_batch_size=2, x=[0,10,2,12], no affine, momentum 0 (torch 1.0)
    m = GhostBatchNorm1d(1, 2, eps=1e-3, momentum=1.0, affine=False, grouping="strided", running_var="biased")
    y = m(torch.tensor([[0.0], [10.0], [2.0], [12.0]]))
    torch.testing.assert_close(y.flatten(), torch.tensor([-0.9995, -0.9995, 0.9995, 0.9995]), atol=1e-4, rtol=0)
    torch.testing.assert_close(m.running_mean, torch.tensor([6.0]))
    torch.testing.assert_close(m.running_var, torch.tensor([1.0]))
    # the contiguous grouping puts {0,10} and {2,12} together: different outputs and statistics
    c = GhostBatchNorm1d(1, 2, eps=1e-3, momentum=1.0, affine=False, running_var="biased")
    yc = c(torch.tensor([[0.0], [10.0], [2.0], [12.0]]))
    torch.testing.assert_close(yc.flatten(), torch.tensor([-1.0, 1.0, -1.0, 1.0]), atol=1e-4, rtol=0)
    torch.testing.assert_close(c.running_mean, torch.tensor([7.0]))  # last ghost batch's mean (momentum 1)
    torch.testing.assert_close(c.running_var, torch.tensor([25.0]))


@pytest.mark.parametrize("grouping,vbs", [("contiguous", 8), ("contiguous", 100), ("strided", 8)])
def test_virtual_batch_equal_to_batch_is_exactly_bn(grouping, vbs):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4)
    g, bn = GhostBatchNorm2d(3, vbs, grouping=grouping), BatchNorm2d(3)
    outs = []
    for m in (g, bn):
        xi = x.clone().requires_grad_()
        y = m(xi)
        y.backward(torch.ones_like(y) * torch.arange(8.0).view(8, 1, 1, 1))
        outs.append((y, xi.grad, m.weight.grad, m.bias.grad, m.running_mean, m.running_var, m.num_batches_tracked))
    for a, e in zip(*outs, strict=True):
        assert torch.equal(a, e)


def test_eval_is_plain_bn_and_state_dict_matches_bn():
    torch.manual_seed(1)
    g, bn = GhostBatchNorm2d(3, 2), BatchNorm2d(3)
    assert g.state_dict().keys() == bn.state_dict().keys()
    g(torch.randn(8, 3, 2, 2))
    bn.load_state_dict(g.state_dict())
    g.eval()
    bn.eval()
    x = torch.randn(5, 3, 2, 2)  # 5 samples: eval ignores the virtual batch size
    assert torch.equal(g(x), bn(x))
    g2 = GhostBatchNorm2d(3, 4)
    g2.load_state_dict(bn.state_dict())
    assert "virtual_batch_size=4" in repr(g2) and "grouping='contiguous'" in repr(g2)


def test_momentum_none_averages_every_ghost_batch():
    torch.manual_seed(2)
    x = torch.randn(12, 2, 3)
    m = GhostBatchNorm1d(2, 3, momentum=None)
    m(x)
    m(x * 2)
    chunks = list(x.split(3)) + list((x * 2).split(3))
    torch.testing.assert_close(m.running_mean, torch.stack([c.mean((0, 2)) for c in chunks]).mean(0))
    torch.testing.assert_close(m.running_var, torch.stack([c.var((0, 2)) for c in chunks]).mean(0))
    assert int(m.num_batches_tracked) == 8


@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
def test_gradcheck_float64(grouping):
    torch.manual_seed(3)
    x = torch.randn(6, 2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return ghost_batch_norm(x, None, None, w, b, True, virtual_batch_size=3 if grouping == "strided" else 4,
                                grouping=grouping)

    assert torch.autograd.gradcheck(f, (x, w, b))


def test_channels_last_is_kept():
    x = torch.randn(8, 3, 4, 4).to(memory_format=torch.channels_last)
    for grouping in ("contiguous", "strided"):
        y = GhostBatchNorm2d(3, 2, grouping=grouping)(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        y2 = GhostBatchNorm2d(3, 2, grouping=grouping)(x.contiguous())
        torch.testing.assert_close(y, y2)


@pytest.mark.parametrize("bad", [0, -2, 2.5, True, None])
def test_bad_virtual_batch_size(bad):
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        GhostBatchNorm2d(3, bad)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        ghost_batch_norm(torch.randn(4, 3), torch.zeros(3), torch.ones(3), training=True, virtual_batch_size=bad)


def test_bad_grouping_and_no_state_touched():
    with pytest.raises(ValueError, match="grouping must be one of 'contiguous', 'strided'"):
        GhostBatchNorm2d(3, 2, grouping="interleaved")
    m = GhostBatchNorm2d(3, 2)
    m(torch.randn(4, 3, 2, 2))
    m.grouping = "interleaved"  # set after construction: the forward refuses before touching anything
    before = snapshot(m)
    with pytest.raises(ValueError, match="grouping must be one of"):
        m(torch.randn(4, 3, 2, 2))
    assert_unchanged(m, before)


def test_strided_needs_divisible_batch_and_leaves_state():
    m = GhostBatchNorm2d(3, 4, grouping="strided")
    m(torch.randn(8, 3, 2, 2))
    before = snapshot(m)
    with pytest.raises(ValueError, match="batch size divisible by virtual_batch_size.*got batch size 6"):
        m(torch.randn(6, 3, 2, 2))
    assert_unchanged(m, before)


def test_single_value_ghost_batch_is_refused_and_leaves_state():
    m = GhostBatchNorm1d(3, 2)
    m(torch.randn(4, 3))
    before = snapshot(m)
    with pytest.raises(ValueError, match="ghost batch of 1 sample"):
        m(torch.randn(5, 3))  # ghost batches of 2, 2, 1: the last has one value per channel
    assert_unchanged(m, before)


@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
def test_nonfinite_raise_in_last_ghost_batch_changes_nothing(grouping):
    m = GhostBatchNorm2d(3, 2, grouping=grouping, nonfinite="raise")
    m(torch.randn(4, 3, 2, 2))
    before = snapshot(m)
    x = torch.randn(6, 3, 2, 2)
    x[5, 1, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError):
        m(x)
    assert_unchanged(m, before)


def test_groupings_differ():
    torch.manual_seed(4)
    x = torch.randn(8, 2, 3)
    a, b = GhostBatchNorm1d(2, 4), GhostBatchNorm1d(2, 4, grouping="strided")
    assert not torch.allclose(a(x), b(x))


@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
def test_pickle_and_deepcopy_keep_the_options(grouping):
    import copy
    import pickle

    m = GhostBatchNorm2d(3, 2, grouping=grouping, running_var="biased")
    x = torch.randn(4, 3, 2, 2)
    for clone in (pickle.loads(pickle.dumps(m)), copy.deepcopy(m)):  # noqa: S301 - our own object
        assert (clone.virtual_batch_size, clone.grouping, clone.running_var_mode) == (2, grouping, "biased")
        assert torch.equal(clone(x), m(x.clone()))
