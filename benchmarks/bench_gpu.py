"""GPU check (issue 13): normkit's Triton kernels on one GPU, correctness first, then the goal shapes, in one run.

    python benchmarks/bench_gpu.py --budget-s 420 --out $OUT/gpu-bench.md          # what gpu_check.sh runs
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --dry-run       # code paths only (CPU)
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --smoke         # 3 cases (the test suite's)

1. Correctness (17 checks, GPU-only code paths): split NCHW reductions, a split plane (N=1), channels_last
   C=256, 7x7 planes, fp16, BatchNorm+add+ReLU training and eval, GroupNorm with a split group and channels_last,
   LayerNorm with D=32768. Each quantity (output, input/residual/weight/bias gradients, running statistics) as
   max |err| / max |ref| against a float64 torch reference, next to torch's own error in the same dtype.
2. Goal shapes, most important first: ResNet-50 BatchNorm shapes (256x56x56, 512x28x28, 2048x7x7) at batch
   256 and 8, fp16/bf16/fp32, NCHW/channels_last: BatchNorm training fwd+bwd and eval fwd, BatchNorm+ReLU and
   BatchNorm+add+ReLU (training and eval) against the eager composition; GroupNorm(32)+SiLU; LayerNorm (D up to
   32768) against eager and Liger-Kernel's LayerNorm (when importable); torch.compile on at most 6 cases.
   Each case timed (a) with CUDA events in interleaved rounds (``runner.interleaved``; medians; speed-ups are
   medians of per-round ratios) and (b) by CUDA-graph replay of the same steps (device time without the host),
   with the first call of each implementation (compile / tune time) printed apart. Effective bandwidth as a
   fraction of a device-to-device copy measured in the same run, against normkit's bytes and the minimum bytes.
3. After EVERY check and case the markdown report (``--out``, default ``$OUT/gpu-bench.md``) and the JSON beside it
   are rewritten, so a run cut short still leaves what it measured. At the end: the goals as PASS/FAIL lines, and
   a suggested ``CUDA_PLAN`` (``"cuda_plan"`` in the JSON) for ``normkit.functional._dispatch``.

Exit status: 0 every check passed and no case raised; 1 a check failed or a case raised; 2 the run could not start.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import math
import os
import platform
import random
import shlex
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F

import normkit
import normkit.functional as nkF
import normkit.kernels

from runner import interleaved

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PLAN_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
PLAN_OPS = {"bn": "batch_norm", "bn_act": "batch_norm_act", "gn": "group_norm", "ln": "layer_norm"}
EPS = 1e-5
GROUPS = 32
LARGE = 2**22  # CUDA_PLAN size classes: "large" from this many elements
COMPILE_CASES = 6  # torch.compile costs ~20-40 s per case: at most this many

# ---------------------------------------------------------------------------------------------------------------
# Cases and the byte models


@dataclass(frozen=True)
class Case:
    """One check or timed case. ``op``: bn (normkit.functional.batch_norm), bn_act (normkit.nn.BatchNormAct2d),
    gn (GroupNorm(32) + SiLU), ln (LayerNorm over the last dimension); ``train``: forward in training mode plus
    the backward (else an inference forward under no_grad)."""

    op: str
    variant: str  # plain | relu | add+relu | silu
    train: bool
    shape: tuple[int, ...]
    layout: str  # nchw | channels_last | rows
    dtype: str  # fp32 | fp16 | bf16
    compile: bool = False  # also time torch.compile of the eager composition
    liger: bool = False  # also time Liger-Kernel's LayerNorm
    note: str = ""  # what a check exercises

    @property
    def residual(self) -> bool:
        return self.variant.startswith("add")

    @property
    def act(self) -> str | None:
        last = self.variant.split("+")[-1]
        return last if last in ("relu", "silu") else None

    @property
    def mode(self) -> str:
        return "train fwd+bwd" if self.train else "eval fwd"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the activation x."""
        return self.numel * DTYPES[self.dtype].itemsize

    def label(self) -> str:
        extra = "".join([" +compile" if self.compile else "", " +liger" if self.liger else ""])
        return f"{self.op} {self.variant} {self.mode} {'x'.join(map(str, self.shape))} {self.layout} {self.dtype}" \
               + extra


BYTE_MODEL = (
    "Bytes are element passes over the activation times its element size (parameters and statistics ignored). "
    "normkit's bytes (what its kernels move): BatchNorm and GroupNorm training forward 3 passes (read x for the "
    "statistics, read x again, write y), backward 5 (read dy and x for the two reductions, read them again, write "
    "dx); BatchNorm eval 2; GroupNorm forward-only 3; LayerNorm forward 2, backward 3 (a row stays on chip); a "
    "residual adds 1 to the forward (read r) and, with an activation after the add, 1 to the backward (the sums "
    "pass writes dz, the residual's gradient, which the input-gradient pass reads instead of dy) plus, for SiLU, "
    "1 more (the sums pass reads r to recompute z: 7 in all) or, for ReLU, the 1-bit-per-value sign mask the "
    "forward wrote and the sums pass reads (6 and 1/8 of a byte per value); without an activation the residual's "
    "gradient is dy itself. Minimum bytes (each tensor the op must read or write, once): training forward 2 (read "
    "x, write y), backward 3 (read dy, read x, write dx), so fwd+bwd 5; inference forward 2; a residual adds 1 to "
    "the forward (read r) and 2 to the backward with an activation after the add (read r again for the mask, "
    "write dr): BN+add+ReLU training 3 + 5 = 8, eval 3. % of copy: bytes / time against the device-to-device "
    "copy's (read + write) GB/s measured in the same run."
)
NORMKIT_PASSES = {"bn": (3, 5, 2), "bn_act": (3, 5, 2), "gn": (3, 5, 3), "ln": (2, 3, 2)}  # train fwd, bwd, eval


def bytes_normkit(case: Case) -> int:
    """Bytes normkit's kernels move for one step (the byte model above)."""
    forward, backward, inference = NORMKIT_PASSES[case.op]
    passes = forward + backward if case.train else inference
    if case.residual:
        if not case.train:
            passes += 1
        elif case.act == "relu":  # read r (forward); write, then read, dz; the sign bits written and read
            passes += 2
            return int(passes * case.nbytes + 2 * case.numel / 8)
        else:
            passes += 3 if case.act else 1
    return passes * case.nbytes


def bytes_minimum(case: Case) -> int:
    """The fewest bytes any implementation must move for one step (the byte model above)."""
    passes = 5 if case.train else 2
    if case.residual:
        passes += (1 + (2 if case.act else 1)) if case.train else 1
    return passes * case.nbytes


# ---------------------------------------------------------------------------------------------------------------
# What runs: 17 correctness checks, then the goal suite in priority order


def _check(note, op, variant, train, gpu_shape, dry_shape, layout, dtype) -> tuple[Case, tuple[int, ...]]:
    return Case(op, variant, train, gpu_shape, layout, dtype, note=note), dry_shape


CHECKS = [
    _check("split NCHW reduction (N*HW = 1M per channel)", "bn", "plain", True, (64, 8, 128, 128), (6, 3, 20, 20),
           "nchw", "fp32"),
    _check("split plane (N=1, 1024x1024)", "bn", "plain", True, (1, 4, 1024, 1024), (1, 2, 48, 48), "nchw", "fp32"),
    _check("channels_last C=256", "bn", "plain", True, (16, 256, 14, 14), (2, 256, 3, 3), "channels_last", "bf16"),
    _check("7x7 planes", "bn", "plain", True, (32, 512, 7, 7), (3, 8, 7, 7), "nchw", "fp32"),
    _check("fp16 training", "bn", "plain", True, (16, 64, 28, 28), (2, 4, 5, 5), "channels_last", "fp16"),
    _check("fp16 eval", "bn", "plain", False, (16, 64, 28, 28), (2, 4, 5, 5), "nchw", "fp16"),
    _check("BN+add+ReLU training", "bn_act", "add+relu", True, (16, 64, 28, 28), (2, 4, 5, 5), "nchw", "bf16"),
    _check("BN+add+ReLU training, channels_last fp16", "bn_act", "add+relu", True, (8, 256, 14, 14), (2, 16, 3, 3),
           "channels_last", "fp16"),
    _check("BN+add+ReLU eval", "bn_act", "add+relu", False, (16, 64, 28, 28), (2, 4, 5, 5), "nchw", "fp32"),
    _check("BN+add+ReLU eval, channels_last", "bn_act", "add+relu", False, (8, 256, 14, 14), (2, 16, 3, 3),
           "channels_last", "bf16"),
    _check("BN+ReLU training, 7x7 channels_last", "bn_act", "relu", True, (32, 512, 7, 7), (3, 8, 7, 7),
           "channels_last", "fp32"),
    _check("GroupNorm split group (131072 elements)", "gn", "silu", True, (2, 64, 256, 256), (1, 64, 4, 4),
           "nchw", "fp32"),
    _check("GroupNorm channels_last", "gn", "silu", True, (4, 320, 32, 32), (1, 64, 2, 2), "channels_last", "bf16"),
    _check("GroupNorm fp16", "gn", "silu", True, (4, 128, 16, 16), (1, 32, 2, 2), "nchw", "fp16"),
    _check("LayerNorm D=32768", "ln", "plain", True, (64, 32768), (1, 2048), "rows", "fp32"),
    _check("LayerNorm D=32768 bf16", "ln", "plain", True, (16, 32768), (2, 1024), "rows", "bf16"),
    _check("LayerNorm D=768 fp16", "ln", "plain", True, (512, 768), (4, 96), "rows", "fp16"),
]

RESNET50 = [(256, 56, 56), (512, 28, 28), (2048, 7, 7)]
BATCHES = (256, 8)
LAYOUTS = ("channels_last", "nchw")
GN_SHAPES = [(8, 320, 64, 64), (8, 640, 32, 32), (8, 1280, 16, 16), (2, 320, 128, 128)]
LN_SHAPES = [(16384, 8192), (4096, 32768), (32768, 4096), (8192, 16384), (8192, 768)]
BIG = (256, 256, 56, 56)

PRIORITY = [  # every goal covered first, the compiled cases among them
    Case("bn", "plain", True, BIG, "channels_last", "bf16", compile=True),
    Case("bn", "plain", True, BIG, "nchw", "fp32", compile=True),
    Case("bn_act", "add+relu", True, BIG, "channels_last", "bf16", compile=True),
    Case("bn_act", "relu", True, BIG, "channels_last", "bf16"),
    Case("bn", "plain", False, BIG, "channels_last", "bf16"),
    Case("bn_act", "add+relu", False, BIG, "channels_last", "bf16", compile=True),
    Case("bn_act", "relu", False, BIG, "channels_last", "bf16"),
    Case("gn", "silu", True, GN_SHAPES[0], "nchw", "bf16", compile=True),
    Case("ln", "plain", True, LN_SHAPES[0], "rows", "bf16", compile=True, liger=True),
    Case("ln", "plain", False, LN_SHAPES[0], "rows", "bf16", liger=True),
    Case("bn", "plain", True, (8, 256, 56, 56), "channels_last", "fp16"),
    Case("bn", "plain", True, (8, 2048, 7, 7), "nchw", "fp32"),
    Case("bn", "plain", True, (256, 2048, 7, 7), "channels_last", "fp16"),
    Case("bn", "plain", True, (256, 512, 28, 28), "nchw", "bf16"),
    Case("gn", "silu", False, GN_SHAPES[0], "channels_last", "fp16"),
    Case("ln", "plain", True, LN_SHAPES[1], "rows", "fp32", liger=True),
    Case("bn_act", "add+relu", True, (8, 512, 28, 28), "nchw", "fp16"),
    Case("bn_act", "add+relu", False, (8, 256, 56, 56), "nchw", "fp32"),
]


def _families() -> dict[str, list[Case]]:
    resnet = [(n, *chw) for n in BATCHES for chw in RESNET50]
    combos = list(itertools.product(resnet, LAYOUTS, DTYPES))
    return {
        "bn train": [Case("bn", "plain", True, s, lay, dt) for s, lay, dt in combos],
        "bn eval": [Case("bn", "plain", False, s, lay, dt) for s, lay, dt in combos],
        "bn_act train": [Case("bn_act", v, True, s, lay, dt) for v in ("relu", "add+relu") for s, lay, dt in combos],
        "bn_act eval": [Case("bn_act", v, False, s, lay, dt) for v in ("relu", "add+relu") for s, lay, dt in combos],
        "gn": [Case("gn", "silu", t, s, lay, dt) for t in (True, False) for s in GN_SHAPES for lay in LAYOUTS
               for dt in DTYPES],
        "ln": [Case("ln", "plain", t, s, "rows", dt, liger=True) for t in (True, False) for s in LN_SHAPES
               for dt in DTYPES],
    }


def gpu_suite() -> list[Case]:
    """PRIORITY, then every family shuffled with a fixed seed and taken round-robin (BatchNorm training twice per
    round), so a budget cut anywhere leaves an even sample of each family."""
    rng = random.Random(13)
    seen = {replace(c, compile=False) for c in PRIORITY}
    iterators = []
    for name, cases in _families().items():
        rest = [c for c in cases if replace(c, compile=False) not in seen]
        rng.shuffle(rest)
        iterators.extend([iter(rest)] * (2 if name == "bn train" else 1))
    ordered = list(PRIORITY)
    while iterators:
        for it in list(iterators):
            case = next(it, None)
            if case is None:
                iterators = [i for i in iterators if i is not it]
            elif replace(case, compile=False) not in seen:
                seen.add(replace(case, compile=False))
                ordered.append(case)
    return ordered


def tiny(case: Case) -> Case:
    """The same case on a shape the Triton interpreter runs in a fraction of a second (dry run)."""
    shape = {"bn": (2, 8, 5, 5), "bn_act": (2, 8, 5, 5), "gn": (1, 32, 2, 2), "ln": (4, 64)}[case.op]
    return replace(case, shape=shape)


INJECTED = Case("injected", "failure", True, (1,), "rows", "fp32")  # --inject-failure: a case that raises


def plan(mode: str, inject_failure: bool) -> tuple[list[Case], list[Case]]:
    """(checks, cases) for a mode: "gpu", "dry-run" (every check and the priority cases, tiny) or "smoke"."""
    if mode == "gpu":
        checks, cases = [c for c, _ in CHECKS], gpu_suite()
    elif mode == "dry-run":
        checks, cases = [replace(c, shape=s) for c, s in CHECKS], [tiny(c) for c in PRIORITY]
    else:
        checks, cases = [replace(CHECKS[6][0], shape=CHECKS[6][1])], [tiny(PRIORITY[0]), tiny(PRIORITY[9])]
    if inject_failure:
        cases.insert(1, INJECTED)
    return checks, cases


# ---------------------------------------------------------------------------------------------------------------
# Implementations: torch's eager composition (also compiled, and in float64 as the reference), normkit's, Liger's


@dataclass
class Impl:
    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]  # (x, residual or None) -> y
    params: list[torch.Tensor]  # leaves whose gradients a training step takes
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # running statistics, compared after a step


def initial_state(case: Case) -> dict[str, torch.Tensor]:
    """Affine parameters (and BatchNorm's running statistics near what a N(1, 2^2) batch gives), seeded by shape."""
    channels = case.shape[-1] if case.op == "ln" else case.shape[1]
    gen = torch.Generator().manual_seed(hash(case.shape) % 2**31)
    state = {"weight": torch.rand(channels, generator=gen) + 0.5, "bias": torch.randn(channels, generator=gen)}
    if case.op in ("bn", "bn_act"):
        state["running_mean"] = 1 + 0.1 * torch.randn(channels, generator=gen)
        state["running_var"] = 4 * (torch.rand(channels, generator=gen) + 0.5)
    return state


def param_dtype(case: Case, dtype: torch.dtype | None) -> torch.dtype:
    """BatchNorm keeps float32 parameters and statistics under fp16/bf16 activations (what autocast does);
    GroupNorm and LayerNorm take the activation's dtype (as torch's kernels require)."""
    if dtype is not None:
        return dtype
    return torch.float32 if case.op in ("bn", "bn_act") else DTYPES[case.dtype]


def _tensors(case: Case, device: torch.device, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Fresh copies of the initial state on the device: parameters as leaves that take gradients."""
    pdtype = param_dtype(case, dtype)
    out = {k: v.to(device=device, dtype=pdtype) for k, v in initial_state(case).items()}
    for name in ("weight", "bias"):
        out[name].requires_grad_(case.train)
    return out


def torch_impl(case: Case, device: torch.device, dtype: torch.dtype | None = None) -> Impl:
    """The eager composition a model writes: F.batch_norm (+ torchvision's in-place add and ReLU), F.group_norm +
    F.silu, F.layer_norm."""
    t = _tensors(case, device, dtype)
    w, b = t["weight"], t["bias"]
    if case.op in ("bn", "bn_act"):
        rm, rv = t["running_mean"], t["running_var"]

        def fn(x, residual):
            y = F.batch_norm(x, rm, rv, w, b, case.train, 0.1, EPS)
            if residual is not None:
                y = y.add_(residual)
            return F.relu(y, inplace=True) if case.act == "relu" else y

        return Impl(fn, [w, b], {"running_mean": rm, "running_var": rv})
    if case.op == "gn":
        return Impl(lambda x, r: F.silu(F.group_norm(x, GROUPS, w, b, EPS)), [w, b])
    if case.op == "ln":
        return Impl(lambda x, r: F.layer_norm(x, (case.shape[-1],), w, b, EPS), [w, b])
    raise ValueError(f"unknown op {case.op!r}")


def normkit_impl(case: Case, device: torch.device) -> Impl:
    """normkit's public API on its Triton backend: functional batch_norm / group_norm / layer_norm with
    backend="triton", nn.BatchNormAct2d (NORMKIT_BACKEND=triton, set by main)."""
    t = _tensors(case, device, None)
    w, b = t["weight"], t["bias"]
    if case.op == "bn":
        rm, rv = t["running_mean"], t["running_var"]

        def fn(x, residual):
            return nkF.batch_norm(x, rm, rv, w, b, case.train, 0.1, EPS, backend="triton")

        return Impl(fn, [w, b], {"running_mean": rm, "running_var": rv})
    if case.op == "bn_act":
        module = normkit.nn.BatchNormAct2d(case.shape[1], eps=EPS, act=case.act)
        module.load_state_dict({**initial_state(case), "num_batches_tracked": torch.tensor(0)})
        module.to(device).train(case.train)
        return Impl(module.forward, [module.weight, module.bias],
                    {"running_mean": module.running_mean, "running_var": module.running_var})
    if case.op == "gn":
        return Impl(lambda x, r: nkF.group_norm(x, GROUPS, w, b, EPS, activation="silu", backend="triton"), [w, b])
    if case.op == "ln":
        return Impl(lambda x, r: nkF.layer_norm(x, (case.shape[-1],), w, b, EPS, backend="triton"), [w, b])
    raise ValueError(f"unknown op {case.op!r}")


def liger_impl(case: Case, device: torch.device) -> Impl:
    """Liger-Kernel's LayerNorm (its autograd function, the op behind liger_kernel.transformers.LigerLayerNorm)."""
    from liger_kernel.ops.layer_norm import LigerLayerNormFunction

    t = _tensors(case, device, None)
    w, b = t["weight"], t["bias"]
    return Impl(lambda x, r: LigerLayerNormFunction.apply(x, w, b, EPS), [w, b])


def liger_status() -> str | None:
    """None when Liger-Kernel's LayerNorm imports, else why not (one line)."""
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction  # noqa: F401
    except Exception as exc:  # ImportError, or a triton/torch mismatch inside the package
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def fallback_reason(case: Case, x: torch.Tensor) -> str | None:
    """Why normkit's kernels would refuse this call (the dispatcher then runs ATen), or None."""
    if case.op in ("bn", "bn_act"):
        return normkit.kernels.supports(x, case.act)
    if case.op == "gn":
        return normkit.kernels.supports_group_norm(x, GROUPS, case.act)
    return normkit.kernels.supports_layer_norm(x, case.shape[-1])


@dataclass
class Inputs:
    x: torch.Tensor
    residual: torch.Tensor | None
    dy: torch.Tensor | None

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.x] + ([self.residual] if self.residual is not None else [])


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """x ~ N(1, 2^2) (a mean offset tests the statistics), a residual and an upstream gradient, in the layout."""
    gen = torch.Generator(device=device).manual_seed(seed)  # drawn on the device: 2e8 values take seconds on a CPU
    dtype = DTYPES[case.dtype]

    def draw(scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = (torch.randn(case.shape, generator=gen, device=device) * scale + shift).to(dtype)
        if case.layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(case.train)

    x = draw(2.0, 1.0)
    residual = draw() if case.residual else None
    dy = draw().detach() if case.train else None
    return Inputs(x, residual, dy)


def as_dtype(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The same values in another dtype (memory format kept), as fresh leaves."""

    def conv(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)

    return Inputs(conv(inputs.x), conv(inputs.residual), None if inputs.dy is None else inputs.dy.to(dtype))


def run_step(impl: Impl, s: Inputs, train: bool):
    """One training step (forward, then the gradients of input, residual, weight and bias) or inference forward."""
    if train:
        y = impl.fn(s.x, s.residual)
        return y, torch.autograd.grad(y, s.leaves + impl.params, s.dy)
    with torch.no_grad():
        return impl.fn(s.x, s.residual), ()


def make_call(impl: Impl, sets: list[Inputs], train: bool) -> Callable[[], object]:
    """A step cycling over the input sets (a cold L2 when their total is over 3x L2)."""
    cycle = itertools.cycle(sets)
    return lambda: run_step(impl, next(cycle), train)


# ---------------------------------------------------------------------------------------------------------------
# Correctness

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1.6e-2}  # max |err| / max |ref|, or 4x torch's own error


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    """max |value - ref| / max |ref| (inf for a wrong shape or a non-finite value)."""
    if value.shape != ref.shape:
        return math.inf
    value = value.detach().double()
    if not bool(torch.isfinite(value).all()):
        return math.inf
    scale = ref.detach().abs().max().clamp_min(1e-30)
    return float((value - ref.detach()).abs().max() / scale)


def outputs(impl: Impl, inputs: Inputs, train: bool) -> dict[str, torch.Tensor]:
    """Every quantity one step produces: y, the gradients, the running statistics after it."""
    y, grads = run_step(impl, inputs, train)
    names = (["dx"] + (["dresidual"] if inputs.residual is not None else []) + ["dweight", "dbias"]) if train else []
    out = {"y": y.detach(), **dict(zip(names, grads, strict=True))}
    out.update({name: t.detach().clone() for name, t in impl.buffers.items()})
    return out


def check(case: Case, device: torch.device) -> dict:
    """normkit against torch in the same dtype and a float64 torch reference, quantity by quantity."""
    inputs = make_inputs(case, device)
    x = inputs.x.detach()
    nk = outputs(normkit_impl(case, device), inputs, case.train)
    th = outputs(torch_impl(case, device), as_dtype(inputs, DTYPES[case.dtype]), case.train)
    ref = outputs(torch_impl(case, device, torch.float64), as_dtype(inputs, torch.float64), case.train)
    tol = TOLERANCE[case.dtype]
    quantities, problems = {}, []
    for name, want in ref.items():
        ours, theirs = rel_err(nk[name], want), rel_err(th[name], want)
        bound = max(tol, 4 * theirs) if math.isfinite(theirs) else tol
        ok = math.isfinite(ours) and ours <= bound  # NaN or inf never passes
        quantities[name] = {"normkit": ours, "torch": theirs, "bound": bound, "ok": ok}
        if not ok:
            problems.append(f"{name} err {ours:.2e} > {bound:.2e}")
    if nk["y"].dtype != th["y"].dtype:
        problems.append(f"y dtype {nk['y'].dtype} (torch {th['y'].dtype})")
    if nk["y"].is_contiguous(memory_format=torch.channels_last) != th["y"].is_contiguous(
            memory_format=torch.channels_last) and nk["y"].dim() == 4:
        problems.append("output memory format differs from torch's")
    reason = fallback_reason(case, x)
    if reason:
        problems.append(f"normkit's kernels refused it (ATen ran): {reason}")
    worst = max(quantities, key=lambda q: quantities[q]["normkit"] / quantities[q]["bound"])
    return {"case": case.label(), "note": case.note, "quantities": quantities, "worst": worst,
            "ok": not problems, "problems": problems}


def failed_check(case: Case, exc: Exception) -> dict:
    """The row of a check that raised."""
    return {"case": case.label(), "note": case.note, "quantities": {}, "worst": None, "ok": False,
            "problems": [f"raised {short(exc)}"], "traceback": traceback.format_exc()}


def short(exc: BaseException) -> str:
    """``Type: first line`` of an exception, at most 300 characters."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300]


# ---------------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Settings:
    device: torch.device
    compile_backend: str | None  # None: --skip-compile
    rounds: int
    warmup: int
    sample_ms: float
    l2_bytes: int
    graphs: bool  # CUDA-graph replay timing (CUDA only)
    liger: str | None  # None: Liger-Kernel importable, else why not

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


def copy_bandwidth(settings: Settings, nbytes: int) -> dict:
    """GB/s of a device-to-device copy (bytes read + bytes written), median over interleaved rounds."""
    src = torch.randn(nbytes // 4, device=settings.device)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src)}, settings.device, rounds=settings.rounds,
                    warmup=settings.warmup, sample_ms=settings.sample_ms)
    ms = t.median("copy")
    return {"bytes": nbytes, "ms": ms, "gbps": 2 * nbytes / ms / 1e6}


def input_sets(case: Case, settings: Settings) -> int:
    """Enough input sets that one cycle through them is over 3x L2 (cold-cache timing), at most 16."""
    per_set = case.nbytes * (1 + case.residual + case.train)
    return max(1, min(16, math.ceil(3 * settings.l2_bytes / per_set)))


def build_impls(case: Case, settings: Settings, notes: list[str]) -> dict[str, Impl]:
    """eager and normkit, plus torch.compile and Liger-Kernel where the case asks and they are available."""
    device = settings.device
    impls = {"eager": torch_impl(case, device), "normkit": normkit_impl(case, device)}
    if case.compile and settings.compile_backend is not None:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no dynamic-shape fallback
        source = torch_impl(case, device)
        impls["compile"] = Impl(torch.compile(source.fn, backend=settings.compile_backend, dynamic=False),
                                source.params)
    if case.liger and settings.liger is None:
        impls["liger"] = liger_impl(case, device)
    elif case.liger:
        notes.append(f"Liger-Kernel not importable: {settings.liger}")
    return impls


def first_calls(calls: dict[str, Callable[[], object]], settings: Settings, notes: list[str]) -> dict[str, float]:
    """Call each implementation once (compilation, autotuning) and return the seconds it took; a baseline that
    fails (compile, liger) is dropped with a note, eager or normkit failing raises."""
    seconds = {}
    for name in list(calls):
        begin = time.perf_counter()
        try:
            calls[name]()
            settings.sync()
        except Exception as exc:
            if name in ("eager", "normkit"):
                raise
            notes.append(f"{name} failed: {short(exc)}")
            del calls[name]
            continue
        seconds[name] = time.perf_counter() - begin
    return seconds


def capture(call: Callable[[], object], steps: int) -> torch.cuda.CUDAGraph:
    """A CUDA graph of ``steps`` consecutive calls (warmed up on a side stream first, as torch's docs ask)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(steps):
            call()
    torch.cuda.synchronize()
    return graph


def graph_timing(calls: dict[str, Callable[[], object]], steps: int, settings: Settings,
                 notes: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Milliseconds per step by CUDA-graph replay, interleaved across implementations, and normkit's speed-up
    over each baseline (median of per-round ratios). Empty off CUDA or with --no-graphs."""
    if not (settings.cuda and settings.graphs):
        return {}, {}
    graphs = {}
    for name, call in calls.items():
        try:
            graphs[name] = capture(call, steps)
        except Exception as exc:  # e.g. a host synchronisation inside the step: noted, the rest still replay
            notes.append(f"CUDA graph of {name} failed: {short(exc)}")
            if not cuda_alive(settings.device):  # the caller notices and stops the run
                break
    if not graphs:
        return {}, {}
    t = interleaved({name: g.replay for name, g in graphs.items()}, settings.device, rounds=settings.rounds,
                    warmup=1, sample_ms=settings.sample_ms)
    ms = {name: t.median(name) / steps for name in graphs}
    vs = {name: t.ratio(name, "normkit") for name in graphs if name != "normkit" and "normkit" in graphs}
    del graphs
    return ms, vs


def size_class(case: Case) -> str:
    return "large" if case.numel >= LARGE else "small"


def plan_key(case: Case) -> list[str]:
    """The CUDA_PLAN key of a case: (op, layout, dtype, size_class)."""
    op = PLAN_OPS[case.op]
    if case.op in ("bn", "bn_act"):
        op += "_train" if case.train else "_eval"
    return [op, case.layout, PLAN_DTYPES[case.dtype], size_class(case)]


def describe(case: Case, settings: Settings) -> dict:
    """The fields of a report row that do not depend on a measurement."""
    return {"case": case.label(), "op": case.op, "variant": case.variant, "mode": case.mode, "shape": list(case.shape),
            "layout": case.layout, "dtype": case.dtype, "numel": case.numel, "x_bytes": case.nbytes,
            "beyond_l2": case.nbytes > settings.l2_bytes, "size_class": size_class(case),
            "plan_key": plan_key(case) if case.op in NORMKIT_PASSES else None,
            "bytes_normkit": bytes_normkit(case) if case.op in NORMKIT_PASSES else None,
            "bytes_min": bytes_minimum(case) if case.op in NORMKIT_PASSES else None}


def measure(case: Case, settings: Settings, copy_gbps: float) -> dict:
    """Time one case: first calls, interleaved rounds (CUDA events), CUDA-graph replay; bandwidth and ratios."""
    started = time.perf_counter()
    row, notes = describe(case, settings), []
    sets = [make_inputs(case, settings.device, seed=i) for i in range(input_sets(case, settings))]
    impls = build_impls(case, settings, notes)
    row["fallback"] = fallback_reason(case, sets[0].x.detach())
    calls = {name: make_call(impl, sets, case.train) for name, impl in impls.items()}
    row["first_call_s"] = first_calls(calls, settings, notes)
    t = interleaved(calls, settings.device, rounds=settings.rounds, warmup=settings.warmup,
                    sample_ms=settings.sample_ms)
    row["ms"] = {name: t.median(name) for name in calls}
    row["vs"] = {name: t.ratio(name, "normkit") for name in calls if name != "normkit"}
    row["graph_ms"], row["graph_vs"] = graph_timing(calls, len(sets), settings, notes)
    row["input_sets"], row["repeats"] = len(sets), t.repeats
    row["pct_copy"] = {name: {"normkit_bytes": row["bytes_normkit"] / ms / 1e6 / copy_gbps,
                              "min_bytes": row["bytes_min"] / ms / 1e6 / copy_gbps} for name, ms in row["ms"].items()}
    row["notes"] = notes
    del calls, impls, sets
    if settings.cuda:
        torch.cuda.empty_cache()  # graph pools and the case's tensors back to the device before the next case
    row["case_s"] = time.perf_counter() - started
    return row


# ---------------------------------------------------------------------------------------------------------------
# Goals and the suggested CUDA_PLAN


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _goal(name: str, rows: list[dict], value_of: Callable[[dict], float], reduce: str, threshold: float,
          unit: str, missing: str = "no case measured") -> dict:
    if not rows:
        return {"goal": name, "n": 0, "value": None, "threshold": threshold, "unit": unit, "passed": None,
                "missing": missing}
    values = [value_of(r) for r in rows]
    worst = min(rows, key=value_of)
    value = geomean(values) if reduce == "geomean" else min(values)
    return {"goal": name, "n": len(rows), "value": value, "threshold": threshold, "unit": unit,
            "reduce": reduce, "passed": value >= threshold, "min": min(values), "min_case": worst["case"]}


def liger_missing(results: list[dict], liger: str | None) -> str:
    """Why no LayerNorm case has a Liger-Kernel time."""
    if liger:
        return f"Liger-Kernel not importable ({liger})"
    failures = [n for r in results if r.get("op") == "ln" for n in r.get("notes", []) if n.startswith("liger")]
    return failures[0] if failures else "no LayerNorm case measured"


def goals(results: list[dict], liger: str | None) -> list[dict]:
    """The goals of issue 13, each over the rows measured so far (events timing)."""
    ok = [r for r in results if "error" not in r and r.get("ms")]
    bn_big = [r for r in ok if r["op"] == "bn" and r["mode"] == "train fwd+bwd" and r["beyond_l2"]]
    fused_train = [r for r in ok if r["op"] == "bn_act" and r["mode"] == "train fwd+bwd"]
    fused_eval = [r for r in ok if r["op"] == "bn_act" and r["mode"] == "eval fwd"]
    gn = [r for r in ok if r["op"] == "gn"]
    ln = [r for r in ok if r["op"] == "ln" and "liger" in r["vs"]]
    compiled = [r for r in ok if "compile" in r["vs"]]
    return [
        _goal("BN training fwd+bwd beyond L2: % of copy bandwidth against normkit's bytes, every case", bn_big,
              lambda r: r["pct_copy"]["normkit"]["normkit_bytes"], "min", 0.90, "of copy"),
        _goal("fused BN+ReLU / BN+add+ReLU training vs eager composition", fused_train,
              lambda r: r["vs"]["eager"], "geomean", 1.6, "x"),
        _goal("fused BN+ReLU / BN+add+ReLU eval vs eager composition", fused_eval,
              lambda r: r["vs"]["eager"], "geomean", 2.0, "x"),
        _goal("GroupNorm(32)+SiLU vs eager composition", gn, lambda r: r["vs"]["eager"], "geomean", 2.0, "x"),
        _goal("LayerNorm vs Liger-Kernel", ln, lambda r: r["vs"]["liger"], "geomean", 1.0, "x",
              missing=liger_missing(results, liger)),
        _goal("never slower than eager, every measured case", ok, lambda r: r["vs"]["eager"], "min", 1.0, "x"),
        _goal("never slower than torch.compile, every compiled case", compiled, lambda r: r["vs"]["compile"], "min",
              1.0, "x"),
    ]


def goal_lines(rows: list[dict], meaningless: bool) -> list[str]:
    """One PASS / FAIL / NOT MEASURED line per goal."""
    out = []
    for g in rows:
        if g["passed"] is None:
            out.append(f"NOT MEASURED: {g['goal']} (goal >= {_fmt(g['threshold'], g['unit'])}): {g['missing']}")
            continue
        verdict = ("PASS" if g["passed"] else "FAIL") + (" (dry run: meaningless)" if meaningless else "")
        out.append(f"{verdict}: {g['goal']}: {g['reduce']} {_fmt(g['value'], g['unit'])} (goal >= "
                   f"{_fmt(g['threshold'], g['unit'])}; n={g['n']}; lowest {_fmt(g['min'], g['unit'])} on "
                   f"{g['min_case']})")
    return out


def _fmt(value: float, unit: str) -> str:
    return f"{value:.0%}" if unit == "of copy" else f"{value:.2f}x"


def cuda_plan(results: list[dict]) -> list[dict]:
    """A suggested CUDA_PLAN entry per (op, layout, dtype, size_class) measured: "triton" only where every case
    under the key ran normkit's kernels and was faster than eager and than torch.compile where compiled."""
    keys: dict[tuple[str, ...], list[dict]] = {}
    for r in results:
        if r.get("plan_key"):
            keys.setdefault(tuple(r["plan_key"]), []).append(r)
    entries = []
    for key, rows in sorted(keys.items()):
        measured = [r for r in rows if "error" not in r]
        vs_eager = [r["vs"]["eager"] for r in measured]
        vs_compile = [r["vs"]["compile"] for r in measured if "compile" in r["vs"]]
        faster = bool(measured) and len(measured) == len(rows) and not any(r["fallback"] for r in measured) \
            and min(vs_eager) > 1.0 and (not vs_compile or min(vs_compile) > 1.0)
        entries.append({"key": list(key), "backend": "triton" if faster else "aten", "cases": len(rows),
                        "min_vs_eager": min(vs_eager) if vs_eager else None,
                        "min_vs_compile": min(vs_compile) if vs_compile else None})
    return entries


def plan_literal(entries: list[dict]) -> str:
    """The plan as a Python dict literal for normkit/functional/_dispatch.py."""
    lines = ["CUDA_PLAN: dict[tuple[str, str, str, str], str] = {"]
    lines += [f"    {tuple(e['key'])!r}: {e['backend']!r},  # {e['cases']} case(s), min vs eager "
              f"{_num(e['min_vs_eager'])}, vs compile {_num(e['min_vs_compile'])}" for e in entries]
    return "\n".join(lines + ["}"])


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


# ---------------------------------------------------------------------------------------------------------------
# The report


def render(report: dict) -> str:
    """The whole markdown report from the report dict (rewritten after every check and case)."""
    meta = report["meta"]
    lines = ["# normkit GPU check (issue 13): correctness, goal shapes, goals", ""]
    if meta["meaningless"]:
        lines += [f"**{meta['mode'].upper()} on CPU under Triton's interpreter: tiny shapes, code paths only. Every "
                  "timing, ratio, bandwidth, PASS/FAIL and plan entry below is meaningless.**", ""]
    copy = report["copy"]
    lines += [
        f"- device: {meta['card']}",
        f"- date: {meta['date']} (started {meta['started']}); status: {report['status']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, normkit {meta['normkit']}, "
        f"Python {meta['python']}, NORMKIT_TUNE={meta['normkit_tune']}, Liger-Kernel: {meta['liger']}",
        f"- command: `{meta['command']}`",
        f"- timing: {meta['timing']}",
        "- copy bandwidth (device-to-device, read + write counted): "
        + (f"{copy['start']['gbps']:.0f} GB/s at the start" if copy.get("start") else "not measured")
        + (f", {copy['end']['gbps']:.0f} GB/s at the end" if copy.get("end") else ""),
        "", "## Goals", "", *[f"- {line}" for line in goal_lines(report["goals"], meta["meaningless"])],
    ]
    lines += render_checks(report["correctness"], report["planned_checks"])
    lines += render_results(report)
    lines += ["", "## Suggested CUDA_PLAN (\"cuda_plan\" in the JSON)", "", "```python",
              plan_literal(report["cuda_plan"]), "```", "",
              "\"triton\" only where every measured case under the key ran normkit's kernels and was faster than "
              "eager, and than torch.compile where compiled; \"aten\" otherwise. large: >= 2**22 elements.",
              "", "## Byte model", "", BYTE_MODEL]
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


def render_checks(checks: list[dict], planned: int) -> list[str]:
    """The correctness section: one row per check."""
    failed = [c for c in checks if not c["ok"]]
    lines = ["", "## Correctness: max |err| / max |ref| against a float64 torch reference", "",
             f"{len(checks) - len(failed)} of {len(checks)} checks passed ({planned} planned)"
             + (" -- **CORRECTNESS FAILED**" if failed else "") + ".", "",
             "| check | case | worst quantity | normkit err | torch err | bound | result |",
             "|---|---|---|---|---|---|---|"]
    for c in checks:
        w = c["quantities"].get(c["worst"], {}) if c["worst"] else {}
        errs = [f"{w[k]:.1e}" if w else "-" for k in ("normkit", "torch", "bound")]
        result = "ok" if c["ok"] else "**FAIL**: " + "; ".join(c["problems"])[:300]
        lines.append(f"| {c['note']} | {c['case']} | {c['worst'] or '-'} | {' | '.join(errs)} | {result} |")
    return lines


def render_results(report: dict) -> list[str]:
    """The results section: one row per case, measured or failed."""
    lines = ["", "## Results", "",
             "ms: CUDA events over interleaved rounds (host launch gaps included); graph ms: CUDA-graph replay "
             "(device only). vs X: X's time / normkit's (> 1: normkit faster), medians of per-round ratios. % copy: "
             "normkit's bytes, then the minimum bytes, over its time, against the copy. first call s: compile / "
             "tune time of each implementation's first call.", "",
             "| case | MB | eager ms | compile ms | liger ms | normkit ms | graph ms eager / normkit | vs eager | "
             "vs compile | vs liger | graph vs eager | % copy nk / min | first call s | notes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        head = f"| {r['case']} | {r['x_bytes'] / 1e6:.1f}{' *' if r['beyond_l2'] else ''} |"
        if "error" in r:
            lines.append(head + f" **error**: {r['error'][:200]} |" + " |" * 12)
            continue
        ms, gms, vs = r["ms"], r["graph_ms"], r["vs"]
        pct = r["pct_copy"]["normkit"]
        first = ", ".join(f"{k} {v:.1f}" for k, v in r["first_call_s"].items())
        notes = "; ".join(([f"ATen fallback: {r['fallback']}"] if r["fallback"] else []) + r["notes"])[:300]
        lines.append(head + " " + " | ".join([
            _ms(ms.get("eager")), _ms(ms.get("compile")), _ms(ms.get("liger")), _ms(ms.get("normkit")),
            f"{_ms(gms.get('eager'))} / {_ms(gms.get('normkit'))}", _num(vs.get("eager")), _num(vs.get("compile")),
            _num(vs.get("liger")), _num(r["graph_vs"].get("eager")),
            f"{pct['normkit_bytes']:.0%} / {pct['min_bytes']:.0%}", first, notes or "-"]) + " |")
    lines += ["", f"Measured {len(report['results'])} of {report['planned']} planned cases"
              + (f"; stopped by the budget ({report['meta']['budget_s']:.0f} s)" if report.get("budget_stop") else "")
              + ". * in MB: x is larger than the L2 cache (input sets rotate so L2 is cold in every case)."]
    return lines


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def write(report: dict, out: str | None) -> None:
    """Rewrite the markdown report and the JSON beside it."""
    if not out:
        return
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    report["goals"] = goals(report["results"], report["meta"]["liger_error"])
    report["cuda_plan"] = cuda_plan(report["results"])
    for path, text in ((out, render(report)),
                       (os.path.splitext(out)[0] + ".json", json.dumps(report, indent=1, default=str))):
        with open(path + ".tmp", "w") as fh:
            fh.write(text)
        os.replace(path + ".tmp", path)  # a reader (or a kill) never sees half a report


# ---------------------------------------------------------------------------------------------------------------
# Main


def environment(device: torch.device, args, mode: str, liger: str | None) -> dict:
    """What ran where: device, versions, settings."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        card = (f"{torch.cuda.get_device_name(device)} ({props.multi_processor_count} SMs, "
                f"{props.total_memory / 2**30:.0f} GiB, L2 {l2 / 2**20:.0f} MiB)")
    else:
        l2 = 0  # every input counts as beyond L2, one input set per case
        card = (f"CPU {platform.machine()} ({os.cpu_count()} cores), Triton interpreter "
                f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})")
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "card": card, "date": now.date().isoformat(), "started": now.strftime("%H:%M:%S UTC"),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "normkit": normkit.__version__, "python": platform.python_version(), "l2_bytes": l2,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "mode": mode, "meaningless": device.type != "cuda", "budget_s": args.budget_s,
        "normkit_tune": os.environ.get("NORMKIT_TUNE"), "liger": "available" if liger is None else f"skipped: {liger}",
        "liger_error": liger,
    }


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), or cpu with --dry-run/--smoke "
                        "(TRITON_INTERPRET=1)")
    parser.add_argument("--dry-run", action="store_true", help="every check and the priority cases on tiny shapes")
    parser.add_argument("--smoke", action="store_true", help="1 check and 2 cases on tiny shapes (the test suite's)")
    parser.add_argument("--inject-failure", action="store_true", help="add a case that raises (tests the harness)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="start no check or case that would end past this many seconds of run time (0: none)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile baseline")
    parser.add_argument("--no-graphs", action="store_true", help="no CUDA-graph replay timing")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 9; CPU 2)")
    parser.add_argument("--out", default=None, help="markdown report (default $OUT/gpu-bench.md, else "
                        "./gpu-check-out/gpu-bench.md); the JSON goes beside it")
    return parser.parse_args(argv)


def startup_error(args, device: torch.device) -> str | None:
    """Why the run cannot start, or None."""
    if device.type == "cpu":
        if not (args.dry_run or args.smoke):
            return "--device cpu runs only with --dry-run or --smoke (timings under the interpreter mean nothing)"
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("--device cpu needs TRITON_INTERPRET=1 set before Python starts: TRITON_INTERPRET=1 python "
                    "benchmarks/bench_gpu.py --device cpu --dry-run")
    elif not torch.cuda.is_available():
        return "no CUDA device: run on a GPU, or TRITON_INTERPRET=1 ... --device cpu --dry-run"
    return None


def cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except Exception:  # a sticky CUDA error: nothing more can run in this process
        return False


class Run:
    """One run: the report, its file, the clock and the budget."""

    def __init__(self, report: dict, out: str, budget_s: float) -> None:
        self.report, self.out, self.budget_s = report, out, budget_s
        self.start = time.perf_counter()
        self.durations: list[float] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self, case: Case, cuda: bool) -> bool:
        """True when the next check or case would likely end past the budget (compiled cases take longer)."""
        estimate = statistics.median(self.durations[-8:]) if self.durations else 5.0
        estimate += 30.0 if case.compile and cuda else 0.0
        if self.budget_s and self.elapsed() + estimate > self.budget_s:
            self.report["budget_stop"] = True
            say(f"budget: stopping at {case.label()} ({self.elapsed():.0f} s elapsed, next ~{estimate:.0f} s)")
            return True
        return False

    def save(self, what: str) -> None:
        write(self.report, self.out)
        say(f"  row written: {what}")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_checks(run: Run, checks: list[Case], device: torch.device) -> None:
    """Every correctness check, a row written after each; a check that raises is a failed row."""
    for case in checks:
        if run.over_budget(case, device.type == "cuda"):
            break
        began = time.perf_counter()
        try:
            row = check(case, device)
        except Exception as exc:  # every failure is reported, then the run goes on
            row = failed_check(case, exc)
        row["seconds"] = time.perf_counter() - began
        run.durations.append(row["seconds"])
        run.report["correctness"].append(row)
        say(f"  check {'ok  ' if row['ok'] else 'FAIL'} {row['case']} ({row['note']}; {row['seconds']:.1f} s)"
            + ("" if row["ok"] else f": {'; '.join(row['problems'])}"))
        run.save(f"check {row['case']}")
        if not cuda_alive(device):
            run.report["errors"].append(f"CUDA context lost after check {case.label()}; run stopped")
            break


def run_cases(run: Run, cases: list[Case], settings: Settings, copy_gbps: float) -> None:
    """Every case in order, a row written after each; a case that raises is an error row and the run goes on."""
    run.durations = []
    for i, case in enumerate(cases):
        if run.over_budget(case, settings.cuda):
            break
        try:
            row = measure(case, settings, copy_gbps)
            run.durations.append(row["case_s"])
            say(f"  [{i + 1}/{len(cases)}] {case.label()}: vs eager {row['vs']['eager']:.2f}x"
                + "".join(f", vs {k} {v:.2f}x" for k, v in row["vs"].items() if k != "eager")
                + f"; first call s: {', '.join(f'{k} {v:.1f}' for k, v in row['first_call_s'].items())}"
                + f" ({row['case_s']:.1f} s)" + "".join(f"\n      note: {n}" for n in row["notes"]))
        except Exception as exc:  # a failing case is reported, the rest still run
            row = {**describe(case, settings), "error": short(exc), "traceback": traceback.format_exc()}
            run.report["errors"].append(f"{case.label()}: {row['error']}")
            say(f"  [{i + 1}/{len(cases)}] {case.label()}: ERROR {row['error']}")
        run.report["results"].append(row)
        run.save(f"case {case.label()}")
        if not cuda_alive(settings.device):
            run.report["errors"].append(f"CUDA context lost after {case.label()}; run stopped")
            break


def main(argv=None) -> int:
    args = parse(argv)
    device = torch.device(args.device)
    problem = startup_error(args, device)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    os.environ["NORMKIT_BACKEND"] = "triton"  # nn.BatchNormAct2d dispatches on it; functional calls pass it
    os.environ.setdefault("NORMKIT_TUNE", "check")  # autotune with at most 2 candidates: compile time stays small
    mode = "gpu" if device.type == "cuda" and not (args.dry_run or args.smoke) else "smoke" if args.smoke \
        else "dry-run"
    liger = liger_status()
    out = args.out or os.path.join(os.environ.get("OUT") or "gpu-check-out", "gpu-bench.md")
    cuda = device.type == "cuda"
    settings = Settings(device, None if args.skip_compile else ("inductor" if cuda else "eager"),
                        rounds=args.rounds or (9 if cuda else 2), warmup=3 if cuda else 0,
                        sample_ms=2.0 if cuda else 0.0, l2_bytes=0, graphs=cuda and not args.no_graphs, liger=liger)
    meta = environment(device, args, mode, liger)
    settings.l2_bytes = meta["l2_bytes"]
    meta["compile_backend"] = settings.compile_backend or "skipped"
    meta["timing"] = (f"{'CUDA events' if cuda else 'time.perf_counter'}, {settings.warmup} warm-up calls, "
                      f"{settings.rounds} interleaved rounds of >= {settings.sample_ms} ms samples, medians; "
                      + ("CUDA-graph replay of the same steps; " if settings.graphs else "no CUDA graphs; ")
                      + f"torch.compile backend {meta['compile_backend']}")
    checks, cases = plan(mode, args.inject_failure)
    report = {"meta": meta, "status": "running", "copy": {}, "correctness": [], "results": [], "errors": [],
              "goals": [], "cuda_plan": [], "planned": len(cases), "planned_checks": len(checks)}
    run = Run(report, out, args.budget_s)
    say(f"# {meta['card']}; torch {meta['torch']}, triton {meta['triton']}; {mode}; Liger-Kernel: {meta['liger']}")
    torch.manual_seed(0)
    copy_bytes = 2**20 * (8 if not cuda else max(1024, 8 * settings.l2_bytes // 2**20))
    report["copy"]["start"] = copy_bandwidth(settings, copy_bytes)
    say(f"copy: {report['copy']['start']['gbps']:.0f} GB/s")
    run.save("start")
    run_checks(run, checks, device)
    if cuda_alive(device):
        run_cases(run, cases, settings, report["copy"]["start"]["gbps"])
    if cuda_alive(device):
        report["copy"]["end"] = copy_bandwidth(settings, copy_bytes)
    failed = [c for c in report["correctness"] if not c["ok"]]
    report["status"] = "CORRECTNESS FAILED" if failed else "errors" if report["errors"] else "ok"
    meta["wall_s"] = run.elapsed()
    run.save("end")
    print("\n".join(["", "GOALS" + (" (meaningless: not a GPU run)" if meta["meaningless"] else ""),
                     *goal_lines(report["goals"], meta["meaningless"]),
                     f"correctness: {len(report['correctness']) - len(failed)} of {len(report['correctness'])} checks "
                     f"passed; cases: {len(report['results'])} of {report['planned']} measured, "
                     f"{len(report['errors'])} error(s); {meta['wall_s']:.0f} s", f"report: {out} (+ .json)"]))
    return 1 if failed or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
