"""The error a failed SyncBatchNorm collective becomes: a crashed peer is not reported as a timeout.

The classifier reads the backend's own text. The texts marked "recorded" were produced by torch 2.13.0+cpu with two
gloo processes on 127.0.0.1 (the peer ``os._exit``-ed before an all_reduce or all_gather, or stayed alive without
joining it); the others are gloo's and NCCL's message formats from their sources. The live tests spawn two gloo
processes and check both paths end to end, under a hard deadline.
"""

from __future__ import annotations

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
from normkit.nn._sync import failure_cause, failure_message

DEADLINE_S = 25.0  # the whole two-process run; the test fails (and kills the processes) past it
GROUP_TIMEOUT_S = 1.5  # the timeout of the group the timeout path waits on
WORLD_TIMEOUT_S = 8.0

GLOO = "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp"
RESET = (f"{GLOO}/pair.cc:537] Read error [127.0.0.1]:17615: Connection reset by peer. This is typically caused by "
         "a remote worker hanging or bugs in the application. Check the logs of the remote worker before reporting "
         "an error. GLHF! 🏖️")
PEER_LOST_TEXTS = [
    RESET,  # recorded: all_reduce and all_gather, the peer exited before the collective
    f"{GLOO}/pair.cc:553] Connection closed by peer [127.0.0.1]:25503. This is typically caused by a remote worker "
    "crashing. Check the logs of the remote worker before reporting an error. GLHF! 🏖️",  # recorded: live test
    f"{GLOO}/pair.cc:698] Socket closed [127.0.0.1]:40123",
    f"{GLOO}/pair.cc:219] Socket unexpectedly closed [127.0.0.1]:40123",
    f"{GLOO}/pair.cc:316] writev [127.0.0.1]:40123: Broken pipe",
    "NCCL error in: /pytorch/torch/csrc/distributed/c10d/NCCLUtils.cpp:77, remote process exited or there was a "
    "network error, NCCL version 2.21.5\nncclRemoteError: A call failed possibly due to a network error or a remote "
    "process exiting prematurely.\nLast error:\nsocketProgress: Connection closed by remote peer",
]
TIMEOUT_TEXTS = [
    f"{GLOO}/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete",  # recorded
    f"{GLOO}/unbound_buffer.cc:129] Timed out waiting 3000ms for send operation to complete",  # recorded
    f"{GLOO}/pair.cc:446] Read timeout [127.0.0.1]:40123",
    "[Rank 0] Watchdog caught collective operation timeout: WorkNCCL(SeqNum=5, OpType=ALLGATHER, NumelIn=14, "
    "NumelOut=28, Timeout(ms)=2000) ran for 2003 milliseconds before timing out.",
]
DESCRIPTION = "SyncBatchNorm(4) 'features.1' (call 3)"
FORWARD = "forward all_gather of the batch statistics"
BACKWARD = "backward all_reduce of the gradient sums"


@pytest.mark.parametrize("text", PEER_LOST_TEXTS)
def test_a_peer_that_exited_is_classified_as_lost(text):
    assert failure_cause(RuntimeError(text)) == "peer_lost"


@pytest.mark.parametrize("text", TIMEOUT_TEXTS)
def test_a_peer_that_did_not_arrive_is_classified_as_a_timeout(text):
    assert failure_cause(RuntimeError(text)) == "timeout"


def test_other_failures_are_not_blamed_on_a_peer():
    assert failure_cause(RuntimeError("NCCL error: invalid usage (run with NCCL_DEBUG=WARN for details)")) == "unknown"
    message = failure_message(RuntimeError("invalid usage"), FORWARD, DESCRIPTION, 0, 2)
    assert "did not join" not in message and "exited" not in message
    assert message.startswith(f"{DESCRIPTION}: the {FORWARD} over the process group failed on rank 0 of 2: "
                              "invalid usage\n")


def test_the_peer_lost_message_names_the_cause_quotes_the_backend_and_says_nothing_changed():
    message = failure_message(RuntimeError(RESET + "\n  "), FORWARD, DESCRIPTION, 1, 4)
    assert message == (
        f"{DESCRIPTION}: a peer process exited or lost its connection during the {FORWARD} (rank 1 of 4; the "
        f"backend said: {RESET}); check the other ranks' logs for the error that stopped them. On this rank this "
        "layer's running statistics, num_batches_tracked and call count are unchanged.")
    assert "did not join" not in message and "in time" not in message


def test_the_timeout_message_keeps_its_text():
    message = failure_message(RuntimeError(TIMEOUT_TEXTS[0]), FORWARD, DESCRIPTION, 0, 2)
    assert message.startswith(f"{DESCRIPTION}: the {FORWARD} over the process group failed on rank 0 of 2: "
                              f"{TIMEOUT_TEXTS[0]}\nA peer did not join this layer's collective in time (the timeout "
                              "is init_process_group(timeout=...)).")
    assert "exited" not in message


def test_a_backward_failure_says_the_forward_already_updated_the_statistics():
    message = failure_message(RuntimeError(RESET), BACKWARD, DESCRIPTION, 0, 2)
    assert "during the backward all_reduce of the gradient sums" in message
    assert message.endswith("the forward of this call had already updated the running statistics; no gradient was "
                            "computed.")


# ------------------------------------------------------------------------------------------- two live processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(layer) -> list:
    return [layer.running_mean.clone(), layer.running_var.clone(), layer.num_batches_tracked.clone(),
            layer._sync_calls]


def _unchanged(layer, before) -> bool:
    return all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
               for a, b in zip(_state(layer), before, strict=True))


def _failing_call(layer, x) -> dict:
    before = _state(layer)
    start = time.monotonic()
    try:
        layer(x)
    except RuntimeError as err:
        return {"message": str(err), "backend": str(err.__cause__), "elapsed": time.monotonic() - start,
                "unchanged": _unchanged(layer, before)}
    raise AssertionError("no error raised")


def _worker(rank: int, port: int, folder: str) -> None:
    """Rank 0: a collective its peer never joins (timeout), then one after its peer exited (peer lost)."""
    torch.set_num_threads(1)
    results: dict = {}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                timeout=datetime.timedelta(seconds=WORLD_TIMEOUT_S))
        slow = dist.new_group([0, 1], timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        if rank == 1:
            dist.barrier()  # alive, but never joins `slow`: rank 0 times out there
            os._exit(1)  # then dies abruptly, before rank 0's next collective: no clean shutdown
        x = torch.randn(6, 4, 3)
        results["timeout"] = _failing_call(normkit.nn.SyncBatchNorm(4, process_group=slow), x)
        dist.barrier()
        time.sleep(0.5)  # rank 1 is gone before the collective starts
        results["peer_lost"] = _failing_call(normkit.nn.SyncBatchNorm(4), x)
    except Exception:
        results["error"] = traceback.format_exc()
    torch.save(results, Path(folder) / f"rank{rank}.pt")
    os._exit(0)  # no destroy_process_group: its peer is gone


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sync_messages")
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(rank, port, str(folder)), daemon=True) for rank in range(2)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.terminate()
        p.join(5)
    path = folder / "rank0.pt"
    results = torch.load(path, weights_only=False) if path.exists() else {}
    if hung or "error" in results or not results:
        pytest.fail(f"the two gloo processes failed: {len(hung)} still running after {DEADLINE_S}s, "
                    f"exit codes {[p.exitcode for p in procs]}, rank 0: {results}")
    return results


def test_live_a_peer_that_exited_is_reported_as_such_and_nothing_changes(live):
    outcome = live["peer_lost"]
    assert failure_cause(RuntimeError(outcome["backend"])) == "peer_lost", outcome["backend"]
    message = outcome["message"]
    assert message.startswith("SyncBatchNorm(4) (call 0): a peer process exited or lost its connection during the "
                              "forward all_gather of the batch statistics (rank 0 of 2; the backend said: ")
    assert " ".join(outcome["backend"].split()) in message
    assert "check the other ranks' logs" in message and "did not join" not in message
    assert outcome["elapsed"] < WORLD_TIMEOUT_S / 2  # detected at once, not after a timeout
    assert outcome["unchanged"]


def test_live_a_peer_that_did_not_join_is_a_timeout_and_nothing_changes(live):
    outcome = live["timeout"]
    assert failure_cause(RuntimeError(outcome["backend"])) == "timeout", outcome["backend"]
    assert "A peer did not join this layer's collective in time" in outcome["message"]
    assert "exited" not in outcome["message"]
    assert GROUP_TIMEOUT_S * 0.9 <= outcome["elapsed"] < GROUP_TIMEOUT_S + 5
    assert outcome["unchanged"]
