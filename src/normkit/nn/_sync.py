"""The synchronized batch-norm passes: one ``all_gather`` in the forward, one ``all_reduce`` in the backward.

Forward. Every rank computes its local ``(count, mean, M2)`` per channel (``M2 = n * biased var``, from normkit's
corrected two-pass moments) and all-gathers one float64 row ``[MAGIC, tag, call, C, count, mean(C), M2(C), MAGIC]``.
Every rank then runs the same Chan merge (:func:`normkit.functional._stats.merge_moments`) on the same rows, so all
ranks get bit-identical global statistics and running buffers. ``all_gather`` rather than ``all_reduce``: the
count-weighted merge needs each rank's mean to form ``sum n_r (mean_r - mean)^2``; an ``all_reduce`` of
``[n, n * mean, sum x^2]`` would be the naive sum-of-squares formula, which cancels catastrophically when
``|mean| >> std`` (in float32 a mean of 1e4 and a std of 1 leave no correct digit of the variance). The row costs
``2C + 6`` doubles per rank.

Backward. Every rank reduces its local ``sum(dy)`` and ``sum(dy * (x - mean))`` and all-reduces one float64 row
``[sum_dy(C), sum_dy_xmu(C), key, key^2, 1]``: the first two give the exact full-batch input gradient; ``key`` (the
layer's tag and channel count) is the same on every rank exactly when ``W * sum(key^2) == sum(key)^2``
(Cauchy-Schwarz), so a rank back-propagating another layer is detected. weight/bias gradients stay local, as in
torch: DDP sums them.

A rank whose local batch is empty contributes count 0 (it drops out of the merge) and zeros to the backward sums,
but joins both collectives.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.autograd.function import once_differentiable

from ..functional import _compose, _stats
from ..functional._layout import Layout, in_torch_format, layout_of

MAGIC = 4.0e9 + 17.0  # marks both ends of a forward row: a short or shifted row fails the check
HEADER = 5  # MAGIC, tag, call, channels, count


def group_and_size(process_group) -> tuple[object, int]:
    """The process group to synchronise over (``None``: the default group) and its size."""
    group = process_group if process_group is not None else dist.group.WORLD
    return group, dist.get_world_size(group)


def _describe(module_name: str, channels: int, call: int) -> str:
    where = f" {module_name!r}" if module_name else ""
    return f"SyncBatchNorm({channels}){where} (call {call})"


#: Lower-case fragments of backend errors (gloo, NCCL, the OS) that mean a peer process went away: it exited
#: (crashed, was killed) or its connection dropped. Checked before the timeout fragments: a socket error is the
#: more specific cause, and gloo's "Connection reset by peer" text also speaks of a "remote worker hanging".
PEER_LOST = ("connection reset", "connection closed", "closed by peer", "socket closed", "unexpectedly closed",
             "broken pipe", "connection aborted", "remote process exited", "econnreset", "epipe")
#: Lower-case fragments of backend errors that mean the collective waited longer than the group's timeout.
TIMED_OUT = ("timed out", "timeout", "timing out")


def failure_cause(error: BaseException) -> str:
    """Why a collective failed, from the backend's error text: ``"peer_lost"``, ``"timeout"`` or ``"unknown"``.

    Examples::

        >>> failure_cause(RuntimeError("[pair.cc:537] Read error [127.0.0.1]:4242: Connection reset by peer."))
        'peer_lost'
        >>> failure_cause(RuntimeError("[unbound_buffer.cc:78] Timed out waiting 2000ms for recv operation"))
        'timeout'
    """
    text = str(error).lower()
    if any(fragment in text for fragment in PEER_LOST):
        return "peer_lost"
    if any(fragment in text for fragment in TIMED_OUT):
        return "timeout"
    return "unknown"


def failure_message(error: BaseException, what: str, description: str, rank: int, world: int) -> str:
    """The text of the error a failed collective becomes: what failed, the backend's own words, what to check.

    Args:
        error: the backend's exception.
        what: the collective, e.g. ``"forward all_gather of the batch statistics"``; one starting with
            ``"forward"`` is the forward's, which runs before any state changes.
        description: the layer, as :func:`_describe` gives it.
        rank, world: this process's rank and the group's size.
    """
    original = " ".join(str(error).split())  # gloo's texts carry newlines and trailing blanks
    state = ("this layer's running statistics, num_batches_tracked and call count are unchanged"
             if what.startswith("forward") else
             "the forward of this call had already updated the running statistics; no gradient was computed")
    cause = failure_cause(error)
    if cause == "peer_lost":
        return (f"{description}: a peer process exited or lost its connection during the {what} (rank {rank} "
                f"of {world}; the backend said: {original}); check the other ranks' logs for the error that "
                f"stopped them. On this rank {state}.")
    if cause == "timeout":
        return (f"{description}: the {what} over the process group failed on rank {rank} of {world}: {original}\n"
                "A peer did not join this layer's collective in time (the timeout is "
                "init_process_group(timeout=...)). Every rank must call every SyncBatchNorm layer the same number "
                "of times and in the same order, and run the backward of every training forward, also with an "
                "empty local batch; check for a rank that crashed, stopped early, took another branch, or is still "
                f"busy elsewhere. On this rank {state}.")
    return (f"{description}: the {what} over the process group failed on rank {rank} of {world}: {original}\n"
            "The backend's error above says why; check the other ranks' logs too. Every rank must call every "
            "SyncBatchNorm layer the same number of times and in the same order, and run the backward of every "
            f"training forward. On this rank {state}.")


def _collective(op, what: str, description: str, group, *args) -> None:
    """Run one collective; a failure (a timeout, a peer that crashed) becomes an error that says what to check."""
    try:
        op(*args, group=group)
    except RuntimeError as err:  # torch.distributed.DistError (DistBackendError, ...) included: they derive from it
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        raise RuntimeError(failure_message(err, what, description, rank, world)) from err


def moments(xc: torch.Tensor, layout: Layout, channels: int, acc: torch.dtype):
    """Local ``(count, mean, biased var)``; zeros for an empty batch."""
    count = layout.count if channels else 0
    if count == 0:
        zeros = torch.zeros(channels, dtype=acc, device=xc.device)
        return 0, zeros, zeros.clone()
    mean, var = _compose.moments(xc, layout.kind)
    return count, mean, var


def gather_statistics(input: torch.Tensor, group, world: int, tag: int, call: int, module_name: str):
    """The forward collective: the global ``(count, mean, biased var)`` in the input's accumulation dtype."""
    channels = input.shape[1]
    layout = layout_of(input, 1)
    acc = _stats.accumulation_dtype(input.dtype)
    count, mean, var = moments(layout.view(input) if input.numel() else input, layout, channels, acc)
    row = torch.empty(2 * channels + HEADER + 1, dtype=torch.float64, device=input.device)
    row[:HEADER] = torch.tensor([MAGIC, tag, call, channels, count], dtype=torch.float64)
    row[HEADER:HEADER + channels] = mean
    row[HEADER + channels:-1] = var.double() * count
    row[-1] = MAGIC
    rows = row.new_empty(world, row.numel())
    description = _describe(module_name, channels, call)
    _collective(dist.all_gather, "forward all_gather of the batch statistics", description, group,
                list(rows.unbind(0)), row)
    headers = rows[:, :HEADER].cpu()
    ends = rows[:, -1].cpu()
    mine = headers.new_tensor([MAGIC, tag, call, channels])
    for rank in range(world):
        if not (torch.equal(headers[rank, :4], mine) and ends[rank].item() == MAGIC):
            _raise_mismatch(description, dist.get_rank(group), rank, headers[rank], ends[rank].item(), tag)
    counts = headers[:, 4].to(torch.float64).to(input.device).unsqueeze(1)
    _, global_mean, m2 = _stats.merge_moments(counts, rows[:, HEADER:HEADER + channels], rows[:, HEADER + channels:-1])
    total_count = int(headers[:, 4].sum().item())
    global_var = m2 / max(total_count, 1)
    return total_count, global_mean.to(acc), global_var.to(acc)


def _raise_mismatch(description: str, me: int, peer: int, header: torch.Tensor, end: float, tag: int):
    magic, peer_tag, peer_call, peer_channels = header[:4].tolist()
    if magic != MAGIC or end != MAGIC:
        seen = "a row of another length (a collective of another size: another layer or another op)"
    else:
        seen = f"layer tag {int(peer_tag):#x} with {int(peer_channels)} channels (call {int(peer_call)})"
    raise RuntimeError(
        f"{description} on rank {me}: rank {peer} joined this collective from {seen}, expected the same layer "
        f"(tag {tag:#x}) and call. The ranks called their SyncBatchNorm layers in different orders or numbers "
        "(a rank skipped a layer, or ran it an extra time); torch.nn.SyncBatchNorm would hang or mix layers here. "
        "Every rank must call every SyncBatchNorm layer the same number of times in the same order, also with an "
        "empty local batch; nothing was updated."
    )


def normalize(input, layout, mean, var, weight, bias, eps):
    """The output of the local slice with the global statistics (an empty tensor for an empty batch)."""
    if input.numel() == 0:
        return torch.empty_like(input)
    scale, shift = _compose.affine_coefficients(mean, var, weight, bias, eps)
    return _compose.per_channel_affine(in_torch_format(input), scale, shift)


def backward_key(tag: int, channels: int) -> float:
    """A per-layer number below 2**24, equal on every rank for the same layer."""
    return float(((tag * 1_000_003) ^ channels) % (1 << 24) + 1)


class SyncBatchNormFunction(torch.autograd.Function):
    """The output of the local slice with the global statistics; its backward is the second collective."""

    @staticmethod
    def forward(ctx, input, weight, bias, mean, var, total, eps, group, tag, call, module_name):
        layout = layout_of(input, 1)
        output = normalize(input, layout, mean, var, weight, bias, eps)
        ctx.save_for_backward(input, weight, mean, var)
        ctx.eps, ctx.group, ctx.total, ctx.layout = eps, group, total, layout
        ctx.key, ctx.description = backward_key(tag, input.shape[1]), _describe(module_name, input.shape[1], call)
        return output

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        input, weight, mean, var = ctx.saved_tensors
        layout, channels = ctx.layout, input.shape[1]
        acc = mean.dtype
        local = torch.zeros(2 * channels + 3, dtype=torch.float64, device=input.device)
        if input.numel():
            dyc, xc = layout.view(grad_output).to(acc), layout.view(input).to(acc)
            sum_dy = _compose._sum(dyc, layout.kind)
            sum_dy_xmu = _compose._dot(dyc, xc - _compose._per_channel(mean, layout.kind), layout.kind)
            local[:channels] = sum_dy
            local[channels:2 * channels] = sum_dy_xmu
        else:
            sum_dy = sum_dy_xmu = torch.zeros(channels, dtype=acc, device=input.device)
        local[-3:] = torch.tensor([ctx.key, ctx.key * ctx.key, 1.0], dtype=torch.float64)
        _collective(dist.all_reduce, "backward all_reduce of the gradient sums", ctx.description, ctx.group, local)
        key_sum, square_sum, world = local[-3:].tolist()
        if world * square_sum != key_sum * key_sum:
            raise RuntimeError(
                f"{ctx.description}: the ranks ran the backward of different SyncBatchNorm layers in the same "
                "collective (their layer keys differ). Every rank must run the backward of every training forward "
                "(also with an empty local batch, and with a loss that uses every output), in the same order."
            )
        global_dy, global_dy_xmu = local[:channels].to(acc), local[channels:2 * channels].to(acc)
        invstd = torch.rsqrt(var + ctx.eps)
        gain = invstd * weight.to(acc) if weight is not None else invstd
        grad_input = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            if input.numel():
                along = -gain * invstd * invstd * global_dy_xmu / ctx.total
                constant = -gain * global_dy / ctx.total - along * mean
                dxc = _compose.scale_shift(xc, layout.kind, along, constant)
                dxc.addcmul_(dyc, _compose._per_channel(gain, layout.kind))
                grad_input = layout.restore(dxc.to(input.dtype))
            else:
                grad_input = torch.zeros_like(input)
        if weight is not None and ctx.needs_input_grad[1]:
            grad_weight = (sum_dy_xmu * invstd).to(weight.dtype)
        if weight is not None and ctx.needs_input_grad[2]:
            grad_bias = sum_dy.to(weight.dtype)
        return grad_input, grad_weight, grad_bias, None, None, None, None, None, None, None, None


def check_total(total: int, input: torch.Tensor, world: int) -> None:
    """Training needs more than one value per channel over all ranks (the same decision on every rank)."""
    if total <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {input.size()} on this rank "
            f"and {total} value(s) per channel over all {world} ranks; batch statistics of a single value are "
            "undefined. Use larger batches, call .eval(), or use a batch-independent norm such as GroupNorm."
        )
