"""Host side of the batch-norm kernels: workspaces, the ticket counters and the launches, on canonical layouts.

A training forward is two launches (statistics with the running update and the batch counter inside, then the
normalize pass), a training backward two (the gradient sums with the affine gradients inside, then the input
gradient); evaluation is one launch each way (one pass for the whole backward when the affine parameters want
gradients too). No ATen op runs between them: workspaces are ``torch.empty``, the per-channel counters that let the
last program of a channel finish its reduction live in a persistent zeroed buffer per device and stream that the
kernels leave zeroed again (:func:`locks`).

Bytes moved, in element passes: training forward 3 (read x for the statistics; read x, write y), backward 5 (read
dy and x for the sums; read dy and x, write dx), evaluation forward 2, evaluation backward 3. A residual adds its
read; with a residual and an activation the backward's first pass also writes ``dz`` (the residual's gradient),
which the second pass reads instead of recomputing the activation.
"""

from __future__ import annotations

import torch

from . import _bn_tiling as tiling
from ._activation import CODES
from ._options import COMPILE_OPTIONS

_LOCKS: dict[tuple, torch.Tensor] = {}


def locks(device: torch.device, size: int, traced: bool) -> torch.Tensor:
    """At least ``size`` int32 counters, all zero, that the reduction kernels leave zero again.

    Eagerly one buffer per device and CUDA stream, allocated (zeroed: one launch) on first use and when a call needs
    more; two calls on one stream run one after the other, so they can share it. Traced (torch.compile, export, fake
    tensors) a fresh zeroed buffer, which the compiler fuses or folds."""
    if traced:
        return torch.zeros(size, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    buffer = _LOCKS.get(key)
    if buffer is None or buffer.numel() < size:
        buffer = _LOCKS[key] = torch.zeros(max(size, 1024), dtype=torch.int32, device=device)
    return buffer


def _eager_launch(kernel, grid, args, options):
    kernel[grid](*args, **options, **COMPILE_OPTIONS)


def _traced_launch(kernel, grid, args, options):
    from torch.library import wrap_triton

    wrap_triton(kernel)[grid](*args, **options)


# What runs a kernel: the tests and benchmarks/bench_host.py replace it to count launches or skip them.
LAUNCH = _eager_launch


def launch(kernel, grid, args, options, traced: bool) -> None:
    """Run ``kernel`` on ``grid`` (through ``torch.library.wrap_triton`` when traced, so compilers see it)."""
    (_traced_launch if traced and LAUNCH is _eager_launch else LAUNCH)(kernel, grid, args, options)


def _split(xc: torch.Tensor, kind: str) -> dict:
    programs = tiling.target_programs(xc.device)
    if kind == "planes":
        return tiling.plane_split(xc.shape[0], xc.shape[1], xc.shape[2], programs)
    return tiling.row_split(xc.shape[0], xc.shape[1], programs)


def _reduce_kernel(name: str, kind: str):
    from . import _bn_reduce

    return getattr(_bn_reduce, f"{name}_{kind}")


def _pointwise(xc: torch.Tensor, kind: str) -> tuple[int, int]:
    """``(C, S)`` of the flat pointwise passes (``S = 1`` on rows)."""
    return xc.shape[1], (xc.shape[2] if kind == "planes" else 1)


def moments(xc, kind, running_mean, running_var, counter, momentum, bessel, skip_nonfinite, traced):
    """The ``(2, C)`` float32 batch mean and biased variance in one launch, which also moves the running statistics
    (if given) and adds one to ``counter`` (if given)."""
    split = _split(xc, kind)
    channels = xc.shape[1]
    part = torch.empty((3, split["tiles"], channels), dtype=torch.float32, device=xc.device)
    stats = torch.empty((2, channels), dtype=torch.float32, device=xc.device)
    has_running = running_mean is not None
    anchor = stats  # a float32 tensor for the pointer arguments that are not used
    args = (xc, part, locks(xc.device, split["locks"], traced), stats, running_mean if has_running else anchor,
            running_var if has_running else anchor, counter if counter is not None else anchor,
            *split["args"].values(), float(momentum), float(bessel))
    blocks = {"BLOCK_P": split["blocks"]["BLOCK_P"], "BLOCK_S": split["blocks"]["BLOCK_S"]} if kind == "planes" \
        else {"BLOCK_M": split["blocks"]["BLOCK_M"], "BLOCK_C": split["blocks"]["BLOCK_C"]}
    options = dict(HAS_RUNNING=has_running, SKIP_NONFINITE=bool(skip_nonfinite), HAS_COUNTER=counter is not None,
                   EVEN=split["even"], **blocks, BLOCK_T=split["blocks"]["BLOCK_T"], num_warps=tiling.REDUCE_WARPS)
    launch(_reduce_kernel("moments", kind), split["grid"], args, options, traced)
    return stats


def normalize(xc, kind, mean, var, weight, bias, eps, residual, act, yc, traced) -> None:
    """``act((x - mean) * rsqrt(var + eps) * weight + bias (+ residual))`` into ``yc``, in one launch."""
    from . import _bn_pointwise

    channels, size = _pointwise(xc, kind)
    args = (xc, residual if residual is not None else xc, yc, mean, var, weight if weight is not None else mean,
            bias if bias is not None else mean, xc.numel(), channels, size, float(eps))
    options = dict(ACT=CODES[act], HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None,
                   ROWS=kind == "rows", BLOCK=tiling.POINTWISE_BLOCK, num_warps=tiling.POINTWISE_WARPS)
    launch(_bn_pointwise.normalize, tiling.pointwise_grid(xc.numel()), args, options, traced)


def backward(dyc, xc, kind, weight, bias, mean, var, eps, residual, act, training, need, traced):
    """``(dx, dweight, dbias, dz)`` on the canonical layout, each ``None`` unless ``need`` (input, weight, bias,
    residual) asks for it; ``dz`` (the pre-activation's gradient, the residual's) is only written for an activation
    with a residual whose gradient is wanted (without an activation it is ``dy`` itself). Two launches in training,
    one in evaluation."""
    from . import _bn_pointwise

    need_x, need_w, need_b, need_r = need
    channels, size = _pointwise(xc, kind)
    has_res = residual is not None
    write_dz = act is not None and has_res and need_r
    dzc = torch.empty_like(xc) if write_dz else None
    dxc = torch.empty_like(xc) if need_x else None
    dw = torch.empty_like(weight) if need_w and weight is not None else None
    db = torch.empty_like(bias) if need_b and bias is not None else None
    anchor = mean
    constants = (mean, var, weight if weight is not None else anchor, bias if bias is not None else anchor)
    flags = dict(ACT=CODES[act], HAS_RES=has_res, HAS_W=weight is not None, HAS_B=bias is not None)
    sums = None
    if training or dw is not None or db is not None:
        split = _split(xc, kind)
        part = torch.empty((2, split["tiles"], channels), dtype=torch.float32, device=xc.device)
        sums = torch.empty((2, channels), dtype=torch.float32, device=xc.device)
        write_dx = not training and need_x
        args = (dyc, xc, residual if has_res else xc, dzc if write_dz else xc, dxc if write_dx else xc,
                *constants, part, locks(xc.device, split["locks"], traced), sums,
                dw if dw is not None else anchor, db if db is not None else anchor, *split["args"].values(),
                float(eps))
        blocks = {k: v for k, v in split["blocks"].items()}
        options = dict(**flags, WRITE_DZ=write_dz, WRITE_DX=write_dx, HAS_DW=dw is not None, HAS_DB=db is not None,
                       **blocks, num_warps=tiling.REDUCE_WARPS)
        launch(_reduce_kernel("grad_sums", kind), split["grid"], args, options, traced)
        if write_dx:
            return dxc, dw, db, dzc
    if need_x or (write_dz and sums is None):
        dxc = dxc if dxc is not None else torch.empty_like(xc)
        args = (dyc, xc, residual if has_res else xc, dzc if write_dz else xc, dxc, *constants,
                sums if sums is not None else mean, xc.numel(), channels, size, float(eps), 1.0 / (xc.numel() //
                                                                                                   channels))
        options = dict(**flags, DZ_GIVEN=write_dz and sums is not None, WRITE_DZ=write_dz and sums is None,
                       TRAINING=training, ROWS=kind == "rows", BLOCK=tiling.POINTWISE_BLOCK,
                       num_warps=tiling.POINTWISE_WARPS)
        launch(_bn_pointwise.grad_input, tiling.pointwise_grid(xc.numel()), args, options, traced)
    return (dxc if need_x else None), dw, db, dzc
