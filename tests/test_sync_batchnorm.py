"""normkit.nn.SyncBatchNorm across real gloo processes on CPU: exactness with uneven and empty batches, faults,
and the number of collectives.

One group of 2 processes (and one of 3) is spawned per module and runs every check; each test reads its result.
Every spawn has a hard deadline (join with a timeout, then terminate), so no test can hang.
"""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import normkit
import normkit.tools

SPAWN_DEADLINE_S = 60.0
PEER_TIMEOUT_S = 2.0  # the timeout of the process group used by the missing-peer check

# Per-rank batch sizes of the exactness checks, by world size.
UNEVEN = {2: [(2, 6), (0, 5), (1, 1), (5, 0)], 3: [(3, 0, 4), (1, 1, 1)]}


# ----------------------------------------------------------------------------------------------- the launcher


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, folder: Path) -> list[dict]:
    """Run :func:`_worker` on ``world`` spawned processes and return each rank's results (a dict per rank)."""
    port = _free_port()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_worker, args=(rank, world, port, str(folder)), daemon=True) for rank in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + SPAWN_DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    results = []
    for rank in range(world):
        path = folder / f"rank{rank}.pt"
        results.append(torch.load(path, weights_only=False) if path.exists() else {})
    if hung:
        pytest.fail(f"{len(hung)} of {world} processes did not finish within {SPAWN_DEADLINE_S}s; "
                    f"results so far: {results}")
    return results


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return _launch(2, tmp_path_factory.mktemp("sync2"))


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _launch(3, tmp_path_factory.mktemp("sync3"))


def _outcome(results: list[dict], name: str) -> list:
    """The value each rank recorded for check ``name``; a failed check fails the test with its traceback."""
    values = []
    for rank, result in enumerate(results):
        if name not in result:
            pytest.fail(f"rank {rank} recorded no result for {name!r} (it crashed or stopped early)")
        ok, value = result[name]
        if not ok:
            pytest.fail(f"rank {rank}, check {name!r}:\n{value}")
        values.append(value)
    return values


# ----------------------------------------------------------------------------------------------- the workers


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    torch.set_num_threads(1)
    results: dict = {}
    path = Path(folder) / f"rank{rank}.pt"
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=10))
        for sizes in UNEVEN[world]:
            for variant in VARIANTS if world == 2 else VARIANTS[:1]:
                _record(results, f"exact-{sizes}-{variant}", _check_exact, rank, sizes, variant)
        if world == 2:
            for name, check in CHECKS_2.items():
                _record(results, name, check, rank)
                torch.save(results, path)  # results so far survive a hang in the next check
        dist.barrier()
    except Exception:
        results["setup"] = (False, traceback.format_exc())
    finally:
        torch.save(results, path)
        if dist.is_initialized():
            dist.destroy_process_group()


def _record(results: dict, name: str, check, *args) -> None:
    try:
        results[name] = (True, check(*args))
    except Exception:
        results[name] = (False, traceback.format_exc())


# Module options and input layouts of the exactness checks: name -> (dims, constructor kwargs, memory format).
VARIANT_SPECS = {
    "2d": (2, {}, torch.contiguous_format),
    "2d-channels_last-momentum_None": (2, {"momentum": None}, torch.channels_last),
    "1d-biased-no_affine": (1, {"running_var": "biased", "affine": False}, torch.contiguous_format),
    "3d-no_bias": (3, {"bias": False, "momentum": 0.3}, torch.contiguous_format),
}
VARIANTS = list(VARIANT_SPECS)
CHANNELS = 3


def _global_batch(sizes, dims, step, memory_format):
    gen = torch.Generator().manual_seed(100 * step + sum(sizes))
    spatial = {1: (), 2: (3, 2), 3: (2, 2, 2)}[dims]
    x = torch.randn((sum(sizes), CHANNELS, *spatial), generator=gen) * 3 + 10  # a mean far from 0
    grad = torch.randn(x.shape, generator=gen)
    if memory_format != torch.contiguous_format and x.dim() == 4:
        x = x.contiguous(memory_format=memory_format)
    return x, grad


def _pair(dims, kwargs):
    """Our synchronized layer and the single-process normkit BatchNorm with the same (non-trivial) state."""
    single = {1: normkit.BatchNorm1d, 2: normkit.BatchNorm2d, 3: normkit.BatchNorm3d}[dims](CHANNELS, **kwargs)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in single.parameters():
            p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
        single.running_mean.copy_(torch.randn(CHANNELS, generator=gen))
        single.running_var.copy_(torch.rand(CHANNELS, generator=gen) + 0.5)
    synced = normkit.nn.SyncBatchNorm(CHANNELS, **kwargs)
    synced.load_state_dict(single.state_dict())
    return synced, single


def _close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{what}: {m}")


def _check_exact(rank, sizes, variant):
    """Two training steps on per-rank slices == one process on the concatenated batches."""
    dims, kwargs, memory_format = VARIANT_SPECS[variant]
    synced, single = _pair(dims, kwargs)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    for step in range(2):
        x, grad = _global_batch(sizes, dims, step, memory_format)
        full = x.clone().requires_grad_()
        expected = single(full)
        expected.backward(grad)
        local = x[start:stop].detach().clone().requires_grad_()
        for p in synced.parameters():
            p.grad = None
        y = synced(local)
        y.backward(grad[start:stop])
        if y.shape != local.shape:
            raise AssertionError(f"output shape {tuple(y.shape)}, expected {tuple(local.shape)}")
        _close(y, expected[start:stop].detach(), f"output, step {step}")
        _close(local.grad, full.grad[start:stop], f"input gradient, step {step}")
        for name, p in synced.named_parameters():
            summed = p.grad.clone()
            dist.all_reduce(summed)  # what DDP does
            _close(summed, dict(single.named_parameters())[name].grad, f"{name} gradient summed over ranks")
            single.get_parameter(name).grad = None
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _close(getattr(synced, name), getattr(single, name), f"{name}, step {step}")
    return tuple(y.shape)


class _CountingCollectives:
    """Wraps the torch.distributed collectives: records (name, bytes) of every call."""

    NAMES = ("all_gather", "all_gather_into_tensor", "all_reduce", "broadcast", "reduce_scatter",
             "reduce_scatter_tensor", "all_to_all", "all_gather_object", "gather", "scatter", "reduce", "barrier")

    def __enter__(self):
        self.calls, self.saved = [], {}
        for name in self.NAMES:
            original = getattr(dist, name)
            self.saved[name] = original

            def wrapper(*args, _name=name, _original=original, **kwargs):
                tensors = [a for a in args if isinstance(a, torch.Tensor)]
                self.calls.append((_name, sum(t.numel() * t.element_size() for t in tensors)))
                return _original(*args, **kwargs)

            setattr(dist, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self.saved.items():
            setattr(dist, name, original)


def _small_cnn(channels=(4, 6)):
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, channels[0], 3, padding=1), torch.nn.BatchNorm2d(channels[0]), torch.nn.ReLU(),
        torch.nn.Conv2d(channels[0], channels[1], 3, padding=1), torch.nn.BatchNorm2d(channels[1]), torch.nn.ReLU(),
    )


def _check_collectives_per_step(rank):
    """One all_gather per layer in the forward, one all_reduce per layer in the backward, O(C) bytes each."""
    model = normkit.tools.sync(_small_cnn())
    x = torch.randn(3 + rank, 1, 5, 5)
    with _CountingCollectives() as forward:
        y = model(x)
    with _CountingCollectives() as backward:
        y.square().sum().backward()
    with _CountingCollectives() as big:  # O(C): the same bytes for a 20x larger batch
        normkit.tools.sync(_small_cnn())(torch.randn(60 + rank, 1, 12, 12))
    return forward.calls, backward.calls, big.calls


def _check_in_place_ops_after_the_layer(rank):
    """torchvision's patterns after a synchronised layer: ReLU(inplace=True) and ``out += identity`` train."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 4, 3, padding=1)
    model = normkit.tools.sync(torch.nn.Sequential(torch.nn.BatchNorm2d(4), torch.nn.ReLU(inplace=True),
                                                   conv, torch.nn.BatchNorm2d(4)))
    x = torch.randn(2 + rank, 4, 6, 6, requires_grad=True)
    out = model(x)
    out += x
    torch.relu_(out).sum().backward()
    return bool(torch.isfinite(x.grad).all())


def _check_eval_and_single_group(rank):
    """Eval never synchronises and equals plain normkit BatchNorm; a 1-rank group equals it in training too."""
    synced, single = _pair(2, {})
    x = torch.randn(4, CHANNELS, 2, 2) + rank
    with _CountingCollectives() as counted:
        equal_eval = torch.equal(synced.eval()(x), single.eval()(x))
    groups = [dist.new_group([r]) for r in range(2)]  # every rank creates every group, in the same order
    solo = normkit.nn.SyncBatchNorm(CHANNELS, process_group=groups[rank])
    solo.load_state_dict(single.state_dict())
    equal_train = torch.equal(solo.train()(x), single.train()(x))
    equal_stats = torch.equal(solo.running_var, single.running_var)
    return equal_eval, counted.calls, equal_train, equal_stats


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _unchanged(module, before):
    return all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


def _check_skipped_layer(rank):
    """Rank 1 skips layer ``a`` (same channel count): every rank raises a clear error, nothing changes."""
    model = normkit.tools.sync(torch.nn.ModuleDict({"a": torch.nn.BatchNorm1d(4), "b": torch.nn.BatchNorm1d(4)}))
    before = {name: _state(m) for name, m in model.items()}
    x = torch.randn(5, 4)
    try:
        if rank == 0:
            model["b"](model["a"](x))
        else:
            model["b"](x)
            model["a"](x)
    except RuntimeError as err:
        message = str(err)
    else:
        raise AssertionError("no error raised")
    unchanged = all(_unchanged(model[name], before[name]) for name in model)
    return message, unchanged


def _check_repeated_call(rank):
    """Rank 0 calls a layer twice where rank 1 calls it once then calls another: detected by the call index."""
    layer = normkit.tools.sync(torch.nn.BatchNorm1d(4))
    x = torch.randn(5, 4)
    layer(x)
    try:
        if rank == 0:
            layer(x)
        else:
            other = normkit.nn.SyncBatchNorm(4)  # not tagged: tag 0 like an un-synced hand-built layer
            other._sync_tag = layer._sync_tag  # same tag, so only the call index tells them apart
            other(x)
    except RuntimeError as err:
        return str(err)
    raise AssertionError("no error raised")


def _check_too_few_values(rank):
    """One value per channel over all ranks: ValueError on every rank, nothing changes."""
    layer, _ = _pair(1, {})
    before = _state(layer)
    x = torch.randn(1 - rank, CHANNELS)
    try:
        layer(x)
    except ValueError as err:
        return str(err), _unchanged(layer, before)
    raise AssertionError("no error raised")


def _check_nonfinite_raise(rank):
    """nonfinite='raise' with a NaN on rank 0 only: FloatingPointError on every rank, nothing changes."""
    layer, _ = _pair(1, {"nonfinite": "raise"})
    before = _state(layer)
    x = torch.randn(3, CHANNELS)
    if rank == 0:
        x[0, 1] = float("nan")
    try:
        layer(x)
    except FloatingPointError as err:
        return str(err), _unchanged(layer, before)
    raise AssertionError("no error raised")


def _check_missing_peer(rank):
    """A peer that never arrives: the others raise a clear error after the group's timeout instead of hanging."""
    group = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=PEER_TIMEOUT_S))
    layer = normkit.nn.SyncBatchNorm(CHANNELS, process_group=group)
    before = _state(layer)
    if rank == 1:  # never joins on `group`; waits for rank 0 on the world group
        dist.barrier()
        return None
    start = time.monotonic()
    try:
        layer(torch.randn(4, CHANNELS))
    except RuntimeError as err:
        elapsed = time.monotonic() - start
        dist.barrier()
        return str(err), elapsed, _unchanged(layer, before)
    raise AssertionError("no error raised")


def _check_backward_order(rank):
    """The ranks back-propagate different layers in the same collective: every rank raises a clear error."""
    model = normkit.tools.sync(torch.nn.ModuleDict({"a": torch.nn.BatchNorm1d(4), "b": torch.nn.BatchNorm1d(4)}))
    x = torch.randn(5, 4, requires_grad=True)
    ya, yb = model["a"](x), model["b"](x)
    try:
        (ya if rank == 0 else yb).sum().backward()
    except RuntimeError as err:
        return str(err)
    raise AssertionError("no error raised")


def _check_ddp(rank):
    """normkit.distributed.DistributedDataParallel + tools.sync on CPU: 3 SGD steps on uneven shares equal one
    process on the whole batches (float64)."""
    from normkit.distributed import DistributedDataParallel

    single = _small_cnn().double()
    model = DistributedDataParallel(normkit.tools.sync(copy.deepcopy(single)))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, single)]
    gen = torch.Generator().manual_seed(5)
    for shares in ((3, 5), (0, 6), (4, 1)):
        x = torch.randn(sum(shares), 1, 4, 4, generator=gen, dtype=torch.float64)
        start, stop = sum(shares[:rank]), sum(shares[: rank + 1])
        for m, batch, scale in ((model, x[start:stop], 2), (single, x, 1)):  # DDP averages over the 2 ranks
            loss = m(batch).square().sum() * scale / x.numel()
            loss.backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    diffs = [((a - b).abs() / (1 + b.abs())).max().item() for a, b in zip(model.module.state_dict().values(),
                                                                          single.state_dict().values(), strict=True)]
    return max(diffs)


def _check_low_precision_and_memory_format(rank):
    """bfloat16/float16 inputs with float32 statistics, and float64, contiguous and channels_last, on shares 2/4."""
    out = {}
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        for fmt in (torch.contiguous_format, torch.channels_last):
            synced, single = _pair(2, {})
            if dtype == torch.float64:
                synced.double()
                single.double()
            gen = torch.Generator().manual_seed(0)
            x = (torch.randn(6, CHANNELS, 4, 5, generator=gen) * 3 + 10).to(dtype).contiguous(memory_format=fmt)
            grad = torch.randn(x.shape, generator=gen).to(dtype)
            full = x.clone().requires_grad_()
            single(full).backward(grad)
            expected = single.eval()(x)  # the running statistics after the step normalize the same in eval
            part = slice(0, 2) if rank == 0 else slice(2, 6)
            local = x[part].clone().requires_grad_()
            y = synced(local)
            y.backward(grad[part])
            out[f"{dtype}-{fmt}"] = (
                y.dtype == dtype and y.is_contiguous(memory_format=fmt),
                (local.grad.double() - full.grad[part].double()).abs().max().item(),
                (synced.running_var.double() - single.running_var.double()).abs().max().item(),
                synced.running_var.dtype,
                (synced.eval()(x).double() - expected.double()).abs().max().item(),
            )
    return out


CHECKS_2 = {
    "low-precision": _check_low_precision_and_memory_format,
    "backward-order": _check_backward_order,
    "ddp": _check_ddp,
    "collectives": _check_collectives_per_step,
    "in-place": _check_in_place_ops_after_the_layer,
    "eval": _check_eval_and_single_group,
    "skipped-layer": _check_skipped_layer,
    "repeated-call": _check_repeated_call,
    "too-few-values": _check_too_few_values,
    "nonfinite-raise": _check_nonfinite_raise,
    "missing-peer": _check_missing_peer,  # last: the group it times out on is left broken
}


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("sizes", UNEVEN[2], ids=str)
def test_two_ranks_equal_one_process_on_the_concatenated_batch(two_ranks, sizes, variant):
    shapes = _outcome(two_ranks, f"exact-{sizes}-{variant}")
    assert [shape[0] for shape in shapes] == list(sizes)  # an empty rank gets an empty output of the right shape


@pytest.mark.parametrize("sizes", UNEVEN[3], ids=str)
def test_three_ranks_equal_one_process(three_ranks, sizes):
    shapes = _outcome(three_ranks, f"exact-{sizes}-2d")
    assert [shape[0] for shape in shapes] == list(sizes)


def test_one_collective_per_layer_in_forward_and_in_backward(two_ranks):
    for forward, backward, big in _outcome(two_ranks, "collectives"):
        assert big == forward
        assert [name for name, _ in forward] == ["all_gather", "all_gather"]
        assert [name for name, _ in backward] == ["all_reduce", "all_reduce"]
        # float64 rows: forward 2C + 6 values, backward 2C + 3 values, for C = 4 and 6
        assert [size for _, size in forward] == [8 * (2 * 4 + 6), 8 * (2 * 6 + 6)]
        assert [size for _, size in backward] == [8 * (2 * 6 + 3), 8 * (2 * 4 + 3)]


def test_in_place_ops_after_a_synchronised_layer(two_ranks):
    assert _outcome(two_ranks, "in-place") == [True, True]


def test_eval_and_a_one_rank_group_do_not_synchronise(two_ranks):
    for equal_eval, calls, equal_train, equal_stats in _outcome(two_ranks, "eval"):
        assert equal_eval and calls == []
        assert equal_train and equal_stats


def test_a_rank_that_skips_a_layer_gets_a_clear_error_not_a_hang(two_ranks):
    for message, unchanged in _outcome(two_ranks, "skipped-layer"):
        assert "same number of times in the same order" in message
        assert "'a'" in message or "'b'" in message
        assert unchanged


def test_ranks_back_propagating_different_layers_get_a_clear_error(two_ranks):
    for message in _outcome(two_ranks, "backward-order"):
        assert "ran the backward of different SyncBatchNorm layers" in message


def test_ddp_on_cpu_equals_one_process(two_ranks):
    for difference in _outcome(two_ranks, "ddp"):
        assert difference < 1e-12


def test_low_precision_inputs_and_memory_formats(two_ranks):
    for outcome in _outcome(two_ranks, "low-precision"):
        for name, (dtype_and_format_kept, grad_error, stats_error, stats_dtype, eval_error) in outcome.items():
            low = "float64" not in name
            assert dtype_and_format_kept, name
            assert grad_error <= (1e-2 if low else 1e-12), name
            assert stats_error <= (1e-6 if low else 1e-12), name
            assert stats_dtype == (torch.float32 if low else torch.float64), name
            assert eval_error <= (1e-2 if low else 1e-12), name


def test_calls_are_paired_by_index(two_ranks):
    for message in _outcome(two_ranks, "repeated-call"):
        assert "call 1" in message and "call 0" in message


def test_one_value_per_channel_over_all_ranks_raises_everywhere(two_ranks):
    for message, unchanged in _outcome(two_ranks, "too-few-values"):
        assert message.startswith("Expected more than 1 value per channel when training")
        assert "over all 2 ranks" in message
        assert unchanged


def test_nonfinite_raise_raises_on_every_rank(two_ranks):
    for message, unchanged in _outcome(two_ranks, "nonfinite-raise"):
        assert "not finite (channels 1)" in message
        assert unchanged


def test_a_missing_peer_raises_within_the_timeout(two_ranks):
    outcome = _outcome(two_ranks, "missing-peer")
    message, elapsed, unchanged = outcome[0]
    assert outcome[1] is None
    assert "did not join this layer's collective in time" in message and "init_process_group(timeout=" in message
    assert PEER_TIMEOUT_S * 0.9 <= elapsed < PEER_TIMEOUT_S + 10
    assert unchanged


def test_spawned_processes_use_loopback_only():
    assert os.environ.get("MASTER_ADDR") in (None, "127.0.0.1", "localhost")
