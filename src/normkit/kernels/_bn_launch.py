"""Host side of the batch-norm kernels: workspaces, the ticket counters and the launches, on canonical layouts.

A training forward is two launches (statistics with the running update and the batch counter inside, then the
normalize pass), a training backward two (the gradient sums with the affine gradients inside, then the input
gradient); evaluation is one launch each way (one pass for the whole backward when the affine parameters want
gradients too). No ATen op runs between them: workspaces are ``torch.empty``, the per-channel counters that let the
last program of a channel finish its reduction live in a persistent zeroed buffer per device and stream that the
kernels leave zeroed again (:func:`locks`).

Bytes moved, in element passes: training forward 3 (read x for the statistics; read x, write y), backward 5 (read
dy and x for the sums; read dy and x, write dx), evaluation forward 2, evaluation backward 2 (3 with affine
gradients). A residual adds its read to the forward; with a residual and an activation the backward's first pass
also writes ``dz`` (the residual's gradient), which the second pass reads instead of ``dy``. With ReLU the forward
also writes the sign of ``z`` as a bitmask (1/8 byte per value), which the backward reads instead of the residual:
BN+add+ReLU's training backward is 6 passes plus the bitmask (SiLU's derivative needs ``z``, so 7).
"""

from __future__ import annotations

import torch

from ..functional._layout import layout_of
from . import _bn_tiling as tiling
from ._activation import CODES
from ._options import COMPILE_OPTIONS
from ._tuning import check_grid

_LOCKS: dict[tuple, torch.Tensor] = {}


def locks(device: torch.device, size: int, cuda: bool) -> torch.Tensor:
    """At least ``size`` int32 counters, all zero, that the reduction kernels leave zero again.

    One buffer per device and CUDA stream, allocated (zeroed: one launch) on first use and when a call needs more;
    two calls on one stream run one after the other, so they can share it, and a CUDA graph that captured a call
    replays it with the same, again zeroed, buffer. While a CUDA graph is being captured the counters are a fresh
    zeroed buffer of the graph's own memory (its zeroing is recorded too), never one that outlives the graph."""
    if cuda and torch.cuda.is_current_stream_capturing():
        return torch.zeros(size, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if cuda else 0
    key = (device, stream)
    buffer = _LOCKS.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = _LOCKS[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buffer


def _eager_launch(kernel, grid, args, options):
    kernel[grid](*args, **options, **COMPILE_OPTIONS)


# What runs a kernel: the tests and benchmarks/bench_host.py replace it to count launches or skip them.
LAUNCH = _eager_launch


def launch(kernel, grid, args, options) -> None:
    """Run ``kernel`` on ``grid``."""
    LAUNCH(kernel, grid, args, options)


class Plan:
    """What every call on one input geometry shares, computed once: the canonical layout, how to view a tensor of
    that geometry in it, the reduction split and the pointwise grid (cached by shape, strides, channel, device)."""

    __slots__ = ("layout", "kind", "channel", "canonical", "dense", "strides", "channels", "size",
                 "numel", "count", "split", "split_args", "grid", "options", "memory_format", "kernels", "device",
                 "cuda")

    def __init__(self, x: torch.Tensor, channel: int):
        self.layout = layout_of(x, channel)
        self.kind, self.channel, self.strides = self.layout.kind, channel, x.stride()
        moved = self.kind == "rows" and not self.layout.channels_last
        self.dense = (x.movedim(channel, -1) if moved else x).is_contiguous()  # memory already in canonical order
        xc = self.layout.view(x)
        self.canonical = tuple(xc.shape)
        self.channels = xc.shape[1]
        self.size = xc.shape[2] if self.kind == "planes" else 1
        self.numel = xc.numel()
        self.count = self.numel // max(self.channels, 1)
        programs = tiling.target_programs(x.device)
        self.split = tiling.plane_split(*self.canonical, programs) if self.kind == "planes" \
            else tiling.row_split(*self.canonical, programs)
        self.split_args = tuple(self.split["args"].values())
        self.device, self.cuda = x.device, x.device.type == "cuda"
        self.grid = check_grid(tiling.pointwise_grid(self.numel))
        check_grid(self.split["grid"])
        self.options: dict[tuple, dict] = {}
        self.memory_format = output_format(x)
        from . import _bn_pointwise, _bn_reduce

        self.kernels = {"moments": getattr(_bn_reduce, f"moments_{self.kind}"),
                        "grad_sums": getattr(_bn_reduce, f"grad_sums_{self.kind}"),
                        "normalize": _bn_pointwise.normalize, "grad_input": _bn_pointwise.grad_input}

    def view(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (shaped like the input) with its memory in the canonical layout: ``t`` itself when its strides are
        the input's and the input is dense (a kernel reads only the data pointer: no view is needed), else a
        canonical copy."""
        if self.dense and t.stride() == self.strides:
            return t
        return self.layout.view(t)

    def new_like(self, x: torch.Tensor) -> torch.Tensor:
        """A new tensor for a kernel to write: shaped like ``x`` in its memory format when the plan is dense (its
        memory is then in canonical order), else a canonical tensor that :meth:`result` turns back."""
        return torch.empty_like(x, memory_format=self.memory_format) if self.dense else torch.empty(
            self.canonical, dtype=x.dtype, device=x.device)

    def result(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor made by :meth:`new_like` in the input's shape."""
        return t if self.dense else self.layout.restore(t)


def output_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format of a kernel's output for input ``x``: channels_last (3d) stays so, else contiguous."""
    cl = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if cl is not None and not x.is_contiguous() and x.is_contiguous(memory_format=cl):
        return cl
    return torch.contiguous_format


_PLANS: dict[tuple, Plan] = {}


def plan_for(x: torch.Tensor, channel: int) -> Plan:
    """The cached :class:`Plan` of ``x``'s geometry."""
    key = (x.shape, x.stride(), channel, x.device)
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:
            _PLANS.clear()
        plan = _PLANS[key] = Plan(x, channel)
    return plan


def moments(plan: Plan, xc, running_mean, running_var, counter, momentum, bessel, skip_nonfinite):
    """The ``(2, C)`` float32 batch mean and biased variance in one launch, which also moves the running statistics
    (if given) and adds one to ``counter`` (if given)."""
    split, channels = plan.split, plan.channels
    part = torch.empty((3 * split["tiles"] * channels,), dtype=torch.float32, device=xc.device)
    stats = torch.empty((2, channels), dtype=torch.float32, device=xc.device)
    has_running = running_mean is not None
    key = ("moments", has_running, bool(skip_nonfinite), counter is not None)
    options = plan.options.get(key)
    if options is None:
        layout = {"EVEN_P": split["even_p"]} if plan.kind == "planes" else {}
        options = plan.options[key] = dict(HAS_RUNNING=has_running, SKIP_NONFINITE=bool(skip_nonfinite),
                                           HAS_COUNTER=counter is not None, EVEN=split["even"], **layout,
                                           **split["blocks"], num_warps=tiling.REDUCE_WARPS)
    args = (xc, part, locks(plan.device, split["locks"], plan.cuda), stats, running_mean if has_running else stats,
            running_var if has_running else stats, counter if counter is not None else stats,
            *plan.split_args, momentum, bessel)
    launch(plan.kernels["moments"], split["grid"], args, options)
    return stats


def normalize(plan: Plan, xc, mean, var, weight, bias, eps, residual, act, yc, bits=None) -> None:
    """``act((x - mean) * rsqrt(var + eps) * weight + bias (+ residual))`` into ``yc``, in one launch; with ``bits``
    (a uint8 tensor of ``ceil(numel / 8)`` bytes) also the ReLU's ``z > 0`` as a bitmask for the backward."""
    key = ("normalize", act, residual is not None, weight is not None, bias is not None, bits is not None)
    options = plan.options.get(key)
    if options is None:
        options = plan.options[key] = dict(ACT=CODES[act], HAS_RES=residual is not None, HAS_W=weight is not None,
                                           HAS_B=bias is not None, WRITE_BITS=bits is not None,
                                           ROWS=plan.kind == "rows", BLOCK=tiling.POINTWISE_BLOCK,
                                           num_warps=tiling.POINTWISE_WARPS)
    args = (xc, residual if residual is not None else xc, yc, mean, var, weight if weight is not None else mean,
            bias if bias is not None else mean, bits if bits is not None else xc, plan.numel, plan.channels,
            plan.size, eps)
    launch(plan.kernels["normalize"], plan.grid, args, options)


def backward(plan: Plan, dyc, xc, weight, bias, mean, var, eps, residual, act, training, need, dxc, dzc,
             bits=None):
    """Fill ``dxc`` (the input gradient) and ``dzc`` (the pre-activation's gradient, the residual's, only for an
    activation with a residual whose gradient is wanted; without an activation it is ``dy`` itself), canonical
    tensors or ``None``; return ``(dweight, dbias)`` (``None`` unless ``need`` asks). Two launches in training, one
    in evaluation (one pass for the whole backward). ``bits``: the forward's ReLU bitmask, read instead of the
    residual (BN+add+ReLU's backward then moves 6 element passes, not 7)."""
    _, need_w, need_b, _ = need
    write_dz = dzc is not None
    has_res, relu_bits = residual is not None and bits is None, bits is not None
    r_arg = bits if relu_bits else residual if has_res else xc
    dw = torch.empty_like(weight) if need_w and weight is not None else None
    db = torch.empty_like(bias) if need_b and bias is not None else None
    constants = (mean, var, weight if weight is not None else mean, bias if bias is not None else mean)
    flags = dict(ACT=CODES[act], HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None)
    sums = None
    if training or dw is not None or db is not None:
        split = plan.split
        part = torch.empty((2 * split["tiles"] * plan.channels,), dtype=torch.float32, device=xc.device)
        sums = torch.empty((2, plan.channels), dtype=torch.float32, device=xc.device)
        write_dx = not training and dxc is not None
        key = ("grad_sums", act, has_res, relu_bits, weight is not None, bias is not None, write_dz, write_dx,
               dw is not None, db is not None)
        options = plan.options.get(key)
        if options is None:
            options = plan.options[key] = dict(
                **flags, RELU_BITS=relu_bits, WRITE_DZ=write_dz, WRITE_DX=write_dx, HAS_DW=dw is not None,
                HAS_DB=db is not None, **split["blocks"], num_warps=tiling.REDUCE_WARPS)
        args = (dyc, xc, r_arg, dzc if write_dz else xc, dxc if write_dx else xc,
                *constants, part, locks(plan.device, split["locks"], plan.cuda), sums,
                dw if dw is not None else mean, db if db is not None else mean, *plan.split_args, eps)
        launch(plan.kernels["grad_sums"], split["grid"], args, options)
        if write_dx:
            return dw, db
    if dxc is None and write_dz and sums is None:  # evaluation, only the residual's gradient wanted
        dxc = torch.empty_like(xc)
    if dxc is not None:
        dz_given = write_dz and sums is not None
        key = ("grad_input", act, has_res, relu_bits, weight is not None, bias is not None, dz_given,
               write_dz and sums is None, training)
        options = plan.options.get(key)
        if options is None:
            options = plan.options[key] = dict(
                **flags, DZ_GIVEN=dz_given, WRITE_DZ=write_dz and sums is None, TRAINING=training,
                RELU_BITS=relu_bits, ROWS=plan.kind == "rows", BLOCK=tiling.POINTWISE_BLOCK,
                num_warps=tiling.POINTWISE_WARPS)
        args = (dyc, xc, r_arg, dzc if write_dz else xc, dxc, *constants,
                sums if sums is not None else mean, plan.numel, plan.channels, plan.size, eps, 1.0 / plan.count)
        launch(plan.kernels["grad_input"], plan.grid, args, options)
    return dw, db
