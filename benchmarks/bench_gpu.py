"""GPU: normkit's Triton kernels against torch eager and torch.compile, side by side in one run; correctness first.

    python benchmarks/bench_gpu.py                    # correctness, then the whole suite (long: use --budget-s)
    python benchmarks/bench_gpu.py --quick            # correctness, then a few shapes that cover every target
    python benchmarks/bench_gpu.py --budget-s 300     # stop adding shapes when 300 s of run time are near
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --smoke   # code paths only, timings meaningless

1. Correctness: every kernel (BatchNorm1d/2d and the functional batch_norm, BatchNormAct2d with ReLU/SiLU and a
   residual, GroupNorm with and without SiLU, LayerNorm) against torch on the same inputs, fp32 and bf16: output,
   input/residual/weight/bias gradients and running statistics, each as max |err| / max |ref| against a float64
   torch reference, next to torch's own error. A failure is printed loudly and makes the exit status 1.
2. Suite: ResNet-50 BN shapes (batch 32 and 128, NCHW and channels_last, plain / +ReLU / +add+ReLU, training
   fwd+bwd and eval fwd), BatchNorm1d (N, C), GroupNorm(32)+SiLU on U-Net shapes, LayerNorm on transformer rows.
   Each against torch eager and ``torch.compile`` (default mode) of the same torch composition, in interleaved
   rounds with CUDA events (runner.interleaved; medians; speed-ups are medians of per-round ratios), and as
   effective GB/s against a device-to-device copy measured in the same run. Inputs rotate over enough sets to
   exceed 3x L2, so every case is timed with a cold L2.
3. Targets of issue 8 as PASS/FAIL lines; a markdown report on stdout and in ``$OUT/gpu-bench.md`` (or ``--out``),
   every number in the JSON beside it (same name, ``.json``). Both files are rewritten after every case, so a run
   cut short still leaves what it measured.

Exit status: 0 all checks passed; 1 a correctness check failed or a case raised; 2 the run could not start.
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
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import normkit
import normkit.functional as nkF
import normkit.kernels

from runner import interleaved

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
EPS = 1e-5
GROUPS = 32

# ---------------------------------------------------------------------------------------------------------------
# The byte model: element passes through device memory per element of the activation (parameters ignored).

BYTE_MODEL = (
    "Bytes counted per element of the activation, times its element size (4 fp32, 2 bf16; parameters and "
    "statistics ignored): BatchNorm training forward 3 passes (read x for the statistics, read x again, write y), "
    "backward 5 (read dy and x for the two reductions, read them again, write dx), eval forward 2; a residual adds "
    "1 to the forward (read r) and 1 to the backward (write dr); ReLU/SiLU add nothing (the mask is recomputed from "
    "x). GroupNorm as BatchNorm (3 forward, 5 backward: a group is larger than one program's registers). "
    "LayerNorm 2 forward, 3 backward (a row stays on chip). fwd+bwd counts both. The same bytes are divided by "
    "each implementation's time, so GB/s ratios equal speed-up ratios."
)
PASSES = {"bn2d": (3, 5), "bn1d": (3, 5), "gn": (3, 5), "ln": (2, 3)}


@dataclass(frozen=True)
class Case:
    op: str  # bn2d | bn1d | gn | ln
    variant: str  # plain | functional | relu | silu | add | add+relu | add+silu
    mode: str  # "train fwd+bwd" | "eval fwd" (BN); "fwd+bwd" | "fwd" (GN, LN)
    shape: tuple[int, ...]
    layout: str  # nchw | channels_last | -
    dtype: str  # fp32 | bf16

    @property
    def backward(self) -> bool:
        return self.mode.endswith("bwd")

    @property
    def training(self) -> bool:
        return self.mode != "eval fwd"

    @property
    def residual(self) -> bool:
        return self.variant.startswith("add")

    @property
    def act(self) -> str | None:
        last = self.variant.split("+")[-1]
        return last if last in ("relu", "silu") else None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the activation x."""
        return self.numel * DTYPES[self.dtype].itemsize

    def label(self) -> str:
        return f"{self.op} {self.variant} {self.mode} {'x'.join(map(str, self.shape))} {self.layout} {self.dtype}"


def bytes_moved(case: Case) -> int:
    forward, backward = (2, 0) if case.mode == "eval fwd" else PASSES[case.op]
    if case.residual:
        forward, backward = forward + 1, backward + 1
    return (forward + (backward if case.backward else 0)) * case.nbytes


# ---------------------------------------------------------------------------------------------------------------
# The suite. Cases come in priority order: the quick set (every target covered) first, then the rest of every
# family, shuffled with a fixed seed and taken round-robin across families, so a budget cut at any point leaves an
# unbiased sample of each family.

RESNET50 = [(64, 112, 112), (64, 56, 56), (256, 56, 56), (512, 28, 28), (1024, 14, 14), (2048, 7, 7)]
BATCHES = (32, 128)
LAYOUTS = ("nchw", "channels_last")
BN1D = [(256, 4096), (4096, 1024), (65536, 256), (16384, 2048)]
UNET = [(2, 320, 64, 64), (8, 320, 64, 64), (8, 640, 32, 32), (8, 1280, 16, 16), (4, 320, 128, 128)]
TRANSFORMER = [(8192, 768), (8192, 1024), (8192, 4096), (8192, 8192),
               (32768, 768), (32768, 1024), (32768, 4096), (16384, 8192)]

QUICK = [
    Case("bn2d", "plain", "train fwd+bwd", (32, 256, 56, 56), "nchw", "fp32"),
    Case("bn2d", "plain", "train fwd+bwd", (32, 256, 56, 56), "channels_last", "bf16"),
    Case("bn2d", "plain", "train fwd+bwd", (128, 64, 112, 112), "channels_last", "bf16"),
    Case("bn2d", "plain", "train fwd+bwd", (128, 64, 112, 112), "nchw", "fp32"),
    Case("bn2d", "plain", "train fwd+bwd", (32, 1024, 14, 14), "nchw", "bf16"),
    Case("bn2d", "plain", "train fwd+bwd", (32, 2048, 7, 7), "channels_last", "fp32"),
    Case("bn2d", "relu", "train fwd+bwd", (32, 256, 56, 56), "channels_last", "bf16"),
    Case("bn2d", "relu", "train fwd+bwd", (32, 256, 56, 56), "nchw", "fp32"),
    Case("bn2d", "add+relu", "train fwd+bwd", (32, 256, 56, 56), "channels_last", "bf16"),
    Case("bn2d", "add+relu", "train fwd+bwd", (32, 256, 56, 56), "nchw", "fp32"),
    Case("bn2d", "plain", "eval fwd", (32, 256, 56, 56), "channels_last", "bf16"),
    Case("bn2d", "add+relu", "eval fwd", (32, 256, 56, 56), "channels_last", "bf16"),
    Case("bn1d", "plain", "train fwd+bwd", (4096, 1024), "-", "fp32"),
    Case("bn1d", "plain", "train fwd+bwd", (65536, 256), "-", "bf16"),
    Case("gn", "silu", "fwd+bwd", (8, 320, 64, 64), "nchw", "fp32"),
    Case("gn", "silu", "fwd+bwd", (8, 320, 64, 64), "channels_last", "bf16"),
    Case("gn", "silu", "fwd", (4, 320, 128, 128), "nchw", "bf16"),
    Case("ln", "plain", "fwd+bwd", (32768, 4096), "-", "bf16"),
    Case("ln", "plain", "fwd", (8192, 768), "-", "fp32"),
    Case("ln", "plain", "fwd+bwd", (16384, 8192), "-", "fp32"),
]

SMOKE = [
    Case("bn2d", "plain", "train fwd+bwd", (2, 8, 5, 5), "nchw", "fp32"),
    Case("bn2d", "plain", "train fwd+bwd", (2, 8, 5, 5), "channels_last", "fp32"),
    Case("bn2d", "relu", "train fwd+bwd", (2, 8, 5, 5), "channels_last", "fp32"),
    Case("bn2d", "add+relu", "train fwd+bwd", (2, 8, 5, 5), "nchw", "fp32"),
    Case("bn2d", "plain", "eval fwd", (2, 8, 5, 5), "nchw", "fp32"),
    Case("bn2d", "add+relu", "eval fwd", (2, 8, 5, 5), "channels_last", "fp32"),
    Case("bn1d", "plain", "train fwd+bwd", (16, 8), "-", "fp32"),
    Case("gn", "silu", "fwd+bwd", (1, 32, 3, 3), "nchw", "fp32"),
    Case("gn", "silu", "fwd", (1, 32, 3, 3), "channels_last", "fp32"),
    Case("ln", "plain", "fwd+bwd", (16, 64), "-", "fp32"),
    Case("ln", "plain", "fwd", (16, 64), "-", "fp32"),
]


def full_suite() -> list[Case]:
    dtypes = ("fp32", "bf16")
    families = {
        "bn train": [Case("bn2d", "plain", "train fwd+bwd", (n, *chw), lay, dt)
                     for n in BATCHES for chw in RESNET50 for lay in LAYOUTS for dt in dtypes]
        + [Case("bn1d", "plain", "train fwd+bwd", s, "-", dt) for s in BN1D for dt in dtypes],
        "bn fused": [Case("bn2d", v, "train fwd+bwd", (n, *chw), lay, dt) for v in ("relu", "add+relu")
                     for n in BATCHES for chw in RESNET50 for lay in LAYOUTS for dt in dtypes],
        "bn eval": [Case("bn2d", v, "eval fwd", (n, *chw), lay, dt) for v in ("plain", "relu", "add+relu")
                    for n in BATCHES for chw in RESNET50 for lay in LAYOUTS for dt in dtypes]
        + [Case("bn1d", "plain", "eval fwd", s, "-", dt) for s in BN1D for dt in dtypes],
        "gn": [Case("gn", "silu", m, s, lay, dt) for m in ("fwd+bwd", "fwd") for s in UNET for lay in LAYOUTS
               for dt in dtypes],
        "ln": [Case("ln", "plain", m, s, "-", dt) for m in ("fwd+bwd", "fwd") for s in TRANSFORMER for dt in dtypes],
    }
    rng = random.Random(8)
    iterators = []
    for name, cases in families.items():
        rest = [c for c in cases if c not in QUICK]
        rng.shuffle(rest)
        iterators.extend([iter(rest)] * (2 if name == "bn train" else 1))  # BN training: two turns per round
    ordered = list(QUICK)
    seen = set(ordered)
    while iterators:
        for it in list(iterators):
            case = next(it, None)
            if case is None:
                iterators = [i for i in iterators if i is not it]
            elif case not in seen:
                seen.add(case)
                ordered.append(case)
    return ordered


# ---------------------------------------------------------------------------------------------------------------
# Implementations: the torch composition (eager, or compiled, or float64 as the reference) and normkit's.


@dataclass
class Impl:
    fn: Callable[..., torch.Tensor]  # (x, residual or None) -> y
    params: list[torch.Tensor]  # leaves whose gradients fwd+bwd takes
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)  # running statistics, compared after a step


class _Functional(torch.nn.Module):
    """normkit.functional.batch_norm with explicit buffers (the functional contract, backend="triton")."""

    def __init__(self, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(state["weight"].clone())
        self.bias = torch.nn.Parameter(state["bias"].clone())
        self.register_buffer("running_mean", state["running_mean"].clone())
        self.register_buffer("running_var", state["running_var"].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nkF.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training, 0.1, EPS,
                              backend="triton")


class Builder:
    """Fresh, identically initialised modules for one case: the torch composition and normkit's layer."""

    def __init__(self, case: Case, device: torch.device) -> None:
        self.case, self.device = case, device
        channels = case.shape[-1] if case.op == "ln" else case.shape[1]
        gen = torch.Generator().manual_seed(hash(case.shape) % 2**31)
        self.state = {"weight": torch.rand(channels, generator=gen) + 0.5,
                      "bias": torch.randn(channels, generator=gen)}
        if case.op in ("bn1d", "bn2d"):  # inputs are randn * 2 + 1: running statistics near what a batch gives
            self.state["running_mean"] = 1 + 0.1 * torch.randn(channels, generator=gen)
            self.state["running_var"] = 4 * (torch.rand(channels, generator=gen) + 0.5)
            self.state["num_batches_tracked"] = torch.tensor(0)
        self.channels = channels

    def _param_dtype(self, dtype: torch.dtype | None) -> torch.dtype:
        # BatchNorm keeps float32 parameters and statistics with bf16 activations (what autocast does); GroupNorm
        # and LayerNorm run in the activation's dtype (bf16 models), as torch's kernels require.
        if dtype is not None:
            return dtype
        return torch.float32 if self.case.op in ("bn1d", "bn2d") else DTYPES[self.case.dtype]

    def torch_impl(self, dtype: torch.dtype | None = None) -> Impl:
        case, c = self.case, self.channels
        if case.op in ("bn1d", "bn2d"):
            module = (torch.nn.BatchNorm2d if case.op == "bn2d" else torch.nn.BatchNorm1d)(c)
        elif case.op == "gn":
            module = torch.nn.GroupNorm(GROUPS, c, eps=EPS)
        else:
            module = torch.nn.LayerNorm(c, eps=EPS)
        module.load_state_dict(self.state)
        module.to(device=self.device, dtype=self._param_dtype(dtype)).train(case.training)
        act = {"relu": F.relu, "silu": F.silu, None: None}[case.act]

        def composition(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
            y = module(x)
            if residual is not None:
                y = y + residual
            return act(y) if act is not None else y

        return Impl(composition, [module.weight, module.bias], _buffers(module))

    def normkit_impl(self) -> Impl:
        case, c = self.case, self.channels
        if case.op in ("bn1d", "bn2d"):
            if case.variant == "functional":
                module = _Functional(self.state)
            elif case.variant == "plain":
                module = (normkit.nn.BatchNorm2d if case.op == "bn2d" else normkit.nn.BatchNorm1d)(c)
            else:
                module = (normkit.nn.BatchNormAct2d if case.op == "bn2d" else normkit.nn.BatchNormAct1d)(
                    c, act=case.act)
            if case.variant != "functional":
                module.load_state_dict(self.state)
        elif case.op == "gn":
            module = normkit.nn.GroupNorm(GROUPS, c, eps=EPS)
            module.load_state_dict(self.state)
        else:  # variant "functional": the module only holds the parameters of the functional call below
            module = normkit.nn.LayerNorm(c, eps=EPS)
            module.load_state_dict(self.state)
        module.to(device=self.device, dtype=self._param_dtype(None)).train(case.training)
        fused = case.op in ("bn1d", "bn2d") and case.variant not in ("plain", "functional")

        def call(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
            if fused:
                return module(x, residual)
            if case.op == "gn" and case.act is not None:
                return nkF.group_norm(x, GROUPS, module.weight, module.bias, EPS, activation=case.act)
            if case.op == "ln" and case.variant == "functional":
                return nkF.layer_norm(x, (c,), module.weight, module.bias, EPS, backend="triton")
            return module(x)

        return Impl(call, [module.weight, module.bias], _buffers(module))


def _buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: getattr(module, name) for name in ("running_mean", "running_var")
            if getattr(module, name, None) is not None}


@dataclass
class Inputs:
    x: torch.Tensor
    residual: torch.Tensor | None
    dy: torch.Tensor | None

    @property
    def leaves(self) -> list[torch.Tensor]:
        return [self.x] + ([self.residual] if self.residual is not None else [])


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype | None = None) -> Inputs:
    """x ~ N(1, 2^2) (a mean offset tests the statistics), a residual and an upstream gradient, in the layout."""
    dtype = dtype or DTYPES[case.dtype]

    def draw(scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        t = (torch.randn(case.shape, device=device) * scale + shift).to(dtype)
        if case.layout == "channels_last":
            t = t.contiguous(memory_format=torch.channels_last)
        return t.requires_grad_(case.backward)

    x = draw(2.0, 1.0)
    residual = draw() if case.residual else None
    dy = draw().detach() if case.backward else None
    return Inputs(x, residual, dy)


def as_dtype(inputs: Inputs, dtype: torch.dtype) -> Inputs:
    """The same values in another dtype (memory format kept), as fresh leaves."""

    def conv(t):
        return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)

    return Inputs(conv(inputs.x), conv(inputs.residual), None if inputs.dy is None else inputs.dy.to(dtype))


def make_call(impl: Impl, sets: list[Inputs], backward: bool) -> Callable[[], object]:
    """One training (fwd+bwd: gradients of input, residual, weight and bias) or inference step, cycling the sets."""
    cycle = itertools.cycle(sets)
    if backward:
        def step():
            s = next(cycle)
            y = impl.fn(s.x, s.residual)
            return torch.autograd.grad(y, s.leaves + impl.params, s.dy)
    else:
        def step():
            s = next(cycle)
            with torch.no_grad():
                return impl.fn(s.x, s.residual)
    return step


# ---------------------------------------------------------------------------------------------------------------
# Correctness


TOLERANCE = {"fp32": 1e-4, "bf16": 1.6e-2}  # max |err| / max |ref|, or 4x torch's own error when that is larger

CHECKS_GPU = (
    [Case("bn2d", v, m, s, lay, dt) for v in ("plain", "add+relu") for m in ("train fwd+bwd", "eval fwd")
     for s in ((8, 64, 28, 28), (5, 27, 13, 11)) for lay in LAYOUTS for dt in DTYPES]
    + [Case("bn2d", v, "train fwd+bwd", (8, 64, 28, 28), lay, dt) for v in ("relu", "silu", "add", "add+silu")
       for lay in LAYOUTS for dt in DTYPES]
    + [Case("bn2d", "functional", m, (8, 64, 28, 28), "nchw", dt) for m in ("train fwd+bwd", "eval fwd")
       for dt in DTYPES]
    + [Case("bn1d", v, m, s, "-", dt) for v, s in (("plain", (256, 300)), ("plain", (37, 64, 50)),
                                                   ("add+relu", (256, 300)))
       for m in ("train fwd+bwd", "eval fwd") for dt in DTYPES]
    + [Case("gn", v, m, s, lay, dt) for v in ("plain", "silu") for m in ("fwd+bwd",)
       for s in ((4, 64, 16, 16), (2, 96, 9, 7)) for lay in LAYOUTS for dt in DTYPES]
    + [Case("ln", v, "fwd+bwd", s, "-", dt) for v, s in (("plain", (512, 768)), ("plain", (64, 1000)),
                                                        ("plain", (4, 8, 4096)), ("functional", (512, 768)))
       for dt in DTYPES]
)
CHECKS_SMOKE = (
    [Case("bn2d", v, m, (3, 6, 5, 4), lay, "fp32") for v in ("plain", "add+relu") for m in ("train fwd+bwd", "eval fwd")
     for lay in LAYOUTS]
    + [Case("bn2d", v, "train fwd+bwd", (3, 6, 5, 4), "nchw", "fp32") for v in ("relu", "silu", "functional")]
    + [Case("bn1d", "plain", m, (7, 5), "-", "fp32") for m in ("train fwd+bwd", "eval fwd")]
    + [Case("gn", v, "fwd+bwd", (1, 64, 2, 3), lay, "fp32") for v in ("plain", "silu") for lay in LAYOUTS]
    + [Case("ln", v, "fwd+bwd", (6, 40), "-", "fp32") for v in ("plain", "functional")]
)


def rel_err(value: torch.Tensor, ref: torch.Tensor) -> float:
    if value.shape != ref.shape:
        return math.inf
    value = value.detach().double()
    if not bool(torch.isfinite(value).all()):
        return math.inf
    scale = ref.detach().abs().max().clamp_min(1e-30)
    return float((value - ref.detach()).abs().max() / scale)


def run_impl(impl: Impl, inputs: Inputs, backward: bool) -> dict[str, torch.Tensor]:
    if backward:
        y = impl.fn(inputs.x, inputs.residual)
        names = ["dx"] + (["dresidual"] if inputs.residual is not None else []) + ["dweight", "dbias"]
        grads = torch.autograd.grad(y, inputs.leaves + impl.params, inputs.dy)
        out = {"y": y.detach(), **dict(zip(names, grads, strict=True))}
    else:
        with torch.no_grad():
            out = {"y": impl.fn(inputs.x, inputs.residual)}
    out.update({name: t.detach().clone() for name, t in impl.buffers.items()})
    return out


def check(case: Case, device: torch.device) -> dict:
    builder = Builder(case, device)
    inputs = make_inputs(case, device)
    nk = run_impl(builder.normkit_impl(), inputs, case.backward)
    th = run_impl(builder.torch_impl(), as_dtype(inputs, DTYPES[case.dtype]), case.backward)
    ref = run_impl(builder.torch_impl(torch.float64), as_dtype(inputs, torch.float64), case.backward)
    tol = TOLERANCE[case.dtype]
    quantities, problems = {}, []
    for name, want in ref.items():
        if name not in nk:
            problems.append(f"{name} missing")
            continue
        ours, theirs = rel_err(nk[name], want), rel_err(th[name], want)
        bound = max(tol, 4 * theirs) if math.isfinite(theirs) else tol
        ok = math.isfinite(ours) and ours <= bound  # NaN or inf never passes
        quantities[name] = {"normkit": ours, "torch": theirs, "bound": bound, "ok": ok}
        if not ok:
            problems.append(f"{name} err {ours:.2e} > {bound:.2e}")
        if nk[name].dtype != th[name].dtype:
            problems.append(f"{name} dtype {nk[name].dtype} (torch {th[name].dtype})")
    channels_last = [t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) for t in (nk["y"], th["y"])]
    if channels_last[0] != channels_last[1]:
        problems.append("output memory format differs from torch's")
    worst = max(quantities, key=lambda q: quantities[q]["normkit"] / quantities[q]["bound"]) if quantities else None
    return {"case": case.label(), "op": case.op, "variant": case.variant, "mode": case.mode,
            "shape": list(case.shape), "layout": case.layout, "dtype": case.dtype, "quantities": quantities,
            "worst": worst, "ok": not problems, "problems": problems}


def kernels_launched(call: Callable[[], object]) -> list[str] | None:
    """CUDA kernel names one call launches (torch.profiler), or None where the profiler is unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            torch.cuda.synchronize()
        names = [e.name for e in prof.events() if str(getattr(e, "device_type", "")).endswith("CUDA")]
        return sorted(set(names))
    except Exception:  # provenance is informative only
        return None


def torch_norm_kernels(names: list[str]) -> list[str]:
    """ATen/cuDNN normalization kernels among ``names`` (C++ names carry '::'; Triton kernels are plain names)."""
    words = ("norm", "bn_", "welford", "moments", "ComputeFused")
    return [n for n in names if ("::" in n or n.startswith("void ") or "cudnn" in n.lower())
            and any(w.lower() in n.lower() for w in words)]


def provenance(device: torch.device) -> list[dict]:
    """Which kernels normkit's default path launches on CUDA tensors, one representative call per kernel family."""
    rows = []
    for case in (Case("bn2d", "plain", "train fwd+bwd", (8, 64, 28, 28), "channels_last", "bf16"),
                 Case("bn2d", "plain", "eval fwd", (8, 64, 28, 28), "nchw", "fp32"),
                 Case("bn2d", "add+relu", "train fwd+bwd", (8, 64, 28, 28), "channels_last", "bf16"),
                 Case("gn", "silu", "fwd+bwd", (4, 64, 16, 16), "nchw", "fp32"),
                 Case("ln", "plain", "fwd+bwd", (512, 768), "-", "bf16")):
        try:
            call = make_call(Builder(case, device).normkit_impl(), [make_inputs(case, device)], case.backward)
            call()
            names = kernels_launched(call)
        except Exception as exc:  # reported, the correctness table carries the failure
            rows.append({"case": case.label(), "kernels": None, "error": f"{type(exc).__name__}: {exc}"})
            continue
        rows.append({"case": case.label(), "kernels": names,
                     "torch_norm_kernels": torch_norm_kernels(names) if names is not None else None})
    return rows


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
    per_set = case.nbytes * (1 + case.residual + case.backward)
    return max(1, min(16, math.ceil(3 * settings.l2_bytes / per_set)))


def kernel_refusal(case: Case, x: torch.Tensor) -> str | None:
    """Why normkit's batch-norm kernels would not take this call (normkit.kernels.supports), or None."""
    if case.op not in ("bn1d", "bn2d"):
        return None
    return normkit.kernels.supports(x, case.act)


def measure(case: Case, settings: Settings) -> dict:
    started = time.perf_counter()
    device = settings.device
    builder = Builder(case, device)
    sets = [make_inputs(case, device) for _ in range(input_sets(case, settings))]
    impls = {"eager": builder.torch_impl(), "normkit": builder.normkit_impl()}
    notes = []
    if settings.compile_backend is not None:
        torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no dynamic-shape fallback
        source = builder.torch_impl()
        impls["compile"] = Impl(torch.compile(source.fn, backend=settings.compile_backend, dynamic=False),
                                source.params)
    calls = {name: make_call(impl, sets, case.backward) for name, impl in impls.items()}
    first_call_s = {}
    for name in list(calls):
        begin = time.perf_counter()
        try:
            calls[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:
            if name != "compile":
                raise
            notes.append(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            del calls[name]
            continue
        first_call_s[name] = time.perf_counter() - begin
    t = interleaved(calls, device, rounds=settings.rounds, warmup=settings.warmup, sample_ms=settings.sample_ms)
    moved = bytes_moved(case)
    ms = {name: t.median(name) for name in calls}
    result = {
        "case": case.label(), "op": case.op, "variant": case.variant, "mode": case.mode, "shape": list(case.shape),
        "layout": case.layout, "dtype": case.dtype, "numel": case.numel, "x_bytes": case.nbytes,
        "over_2x_l2": case.nbytes > 2 * settings.l2_bytes, "bytes_model": moved, "input_sets": len(sets),
        "ms": ms, "p20_ms": {n: t.quantile(n, 0.2) for n in calls}, "p80_ms": {n: t.quantile(n, 0.8) for n in calls},
        "rounds_ms": t.times, "repeats": t.repeats, "gbps": {n: moved / ms[n] / 1e6 for n in calls},
        "speedup_vs_eager": t.ratio("eager", "normkit"),
        "speedup_vs_compile": t.ratio("compile", "normkit") if "compile" in calls else None,
        "first_call_s": first_call_s, "notes": notes, "kernel_refusal": kernel_refusal(case, sets[0].x),
    }
    del calls, impls, sets
    result["case_s"] = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------------------------
# Targets and report


def geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def targets(results: list[dict], copy_gbps: float) -> list[dict]:
    ok = [r for r in results if "error" not in r]
    bn_train = [r for r in ok if r["op"] in ("bn1d", "bn2d") and r["variant"] == "plain"
                and r["mode"] == "train fwd+bwd"]
    with_compile = [r for r in bn_train if r["speedup_vs_compile"] is not None]
    big = [r for r in bn_train if r["over_2x_l2"]]
    relu = [r for r in ok if r["op"] == "bn2d" and r["variant"] == "relu"]
    add_relu = [r for r in ok if r["op"] == "bn2d" and r["variant"] == "add+relu"]
    gn = [r for r in ok if r["op"] == "gn"]
    ln_big = [r for r in ok if r["op"] == "ln" and r["over_2x_l2"]]

    def frac(r):
        return r["gbps"]["normkit"] / copy_gbps

    def line(name, rows, value_of, reduce, threshold, unit):
        if not rows:
            return {"target": name, "n": 0, "value": None, "threshold": threshold, "passed": None}
        values = [value_of(r) for r in rows]
        value = reduce(values)
        worst = min(rows, key=value_of)
        return {"target": name, "n": len(rows), "value": value, "threshold": threshold, "unit": unit,
                "passed": value >= threshold, "min": min(values), "min_case": worst["case"]}

    return [
        line("BN train fwd+bwd vs torch eager, geometric mean", bn_train, lambda r: r["speedup_vs_eager"], geomean,
             1.25, "x"),
        line("BN train fwd+bwd vs torch eager, every case (minimum)", bn_train, lambda r: r["speedup_vs_eager"], min,
             1.0, "x"),
        line("BN train fwd+bwd vs torch.compile, geometric mean", with_compile, lambda r: r["speedup_vs_compile"],
             geomean, 1.0, "x"),
        line("BN train fwd+bwd on tensors > 2x L2, fraction of copy bandwidth, every case (minimum)", big, frac, min,
             0.75, "of copy"),
        line("fused BN+ReLU vs eager composition (train fwd+bwd and eval fwd), geometric mean", relu,
             lambda r: r["speedup_vs_eager"], geomean, 1.5, "x"),
        line("fused BN+add+ReLU vs eager composition (train fwd+bwd and eval fwd), geometric mean", add_relu,
             lambda r: r["speedup_vs_eager"], geomean, 1.5, "x"),
        line("GroupNorm(32)+SiLU vs eager composition (fwd and fwd+bwd), geometric mean", gn,
             lambda r: r["speedup_vs_eager"], geomean, 2.0, "x"),
        line("LayerNorm on tensors > 2x L2, fraction of copy bandwidth, every case (minimum)", ln_big, frac, min,
             0.85, "of copy"),
    ]


def target_lines(rows: list[dict], smoke: bool) -> list[str]:
    out = []
    for t in rows:
        if t["passed"] is None:
            out.append(f"- NOT MEASURED: {t['target']} >= {t['threshold']} (no case measured)")
            continue
        verdict = "PASS" if t["passed"] else "FAIL"
        if smoke:
            verdict = f"{verdict} (smoke: meaningless)"

        def fmt(v):
            return f"{v:.0%}" if t["unit"] == "of copy" else f"{v:.2f}x"

        out.append(f"- {verdict}: {t['target']}: {fmt(t['value'])} (target >= {fmt(t['threshold'])}; n={t['n']}; "
                   f"lowest {fmt(t['min'])} on {t['min_case']})")
    return out


def render(report: dict) -> str:
    meta, smoke = report["meta"], report["meta"]["smoke"]
    lines = ["# normkit GPU kernels: correctness and benchmark", ""]
    if smoke:
        lines += ["**SMOKE RUN: tiny shapes (under Triton's interpreter on CPU where --device cpu). It checks code "
                  "paths and the report; every timing, ratio and GB/s below is meaningless.**", ""]
    lines += [
        f"- card: {meta['card']}",
        f"- date: {meta['date']} (started {meta['started']}); status: {report['status']}",
        f"- torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, cuDNN {meta['cudnn']}, "
        f"normkit {meta['normkit']}, Python {meta['python']}",
        f"- command: `{meta['command']}`",
        f"- copy bandwidth (device-to-device, {report['copy']['start']['bytes'] / 2**20:.0f} MiB, read + write "
        f"counted): {report['copy']['start']['gbps']:.0f} GB/s at the start"
        + (f", {report['copy']['end']['gbps']:.0f} GB/s at the end" if report["copy"].get("end") else ""),
        f"- timing: {meta['timing']}",
        "",
        "## Correctness: normkit vs torch, max |err| / max |ref| against a float64 torch reference",
        "",
    ]
    checks = report["correctness"]
    failed = [c for c in checks if not c["ok"]]
    lines.append(f"{len(checks) - len(failed)} of {len(checks)} checks passed"
                 + (" -- **CORRECTNESS FAILED**" if failed else "") + ".")
    lines += ["", "| case | worst quantity | normkit err | torch err | bound | result |", "|---|---|---|---|---|---|"]
    for c in checks:
        w = c["quantities"].get(c["worst"], {}) if c["worst"] else {}
        err = f"{w['normkit']:.1e}" if w else "-"
        terr = f"{w['torch']:.1e}" if w else "-"
        bound = f"{w['bound']:.1e}" if w else "-"
        result = "ok" if c["ok"] else "**FAIL**: " + "; ".join(c["problems"])[:300]
        lines.append(f"| {c['case']} | {c['worst'] or '-'} | {err} | {terr} | {bound} | {result} |")
    if report.get("provenance"):
        lines += ["", "Kernels launched by normkit's default path on CUDA tensors (torch.profiler):", ""]
        for p in report["provenance"]:
            if p.get("kernels") is None:
                lines.append(f"- {p['case']}: not available ({p.get('error', 'profiler unavailable')})")
            else:
                warn = p["torch_norm_kernels"]
                lines.append(f"- {p['case']}: {', '.join(p['kernels'])[:400]}"
                             + (f" -- **WARNING: torch's own norm kernels ran: {', '.join(warn)[:200]}**"
                                if warn else ""))
    lines += ["", "## Targets (issue 8)", ""] + target_lines(report["targets"], smoke)
    lines += ["", "## Results", "",
              "| op | variant | mode | shape | layout | dtype | x MB | eager ms | compile ms | normkit ms | "
              "vs eager | vs compile | eager GB/s | normkit GB/s | normkit % copy |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    copy_gbps = report["copy"]["start"]["gbps"]
    for r in report["results"]:
        head = (f"| {r['op']} | {r['variant']} | {r['mode']} | {'x'.join(map(str, r['shape']))} | {r['layout']} | "
                f"{r['dtype']} | {r['x_bytes'] / 1e6:.1f}{' *' if r['over_2x_l2'] else ''} |")
        if "error" in r:
            lines.append(head + f" error: {r['error'][:150]} | | | | | | | |")
            continue
        ms = r["ms"]
        comp = f"{ms['compile']:.3f}" if "compile" in ms else "-"
        vs_comp = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] is not None else "-"
        mark = " †" if r.get("kernel_refusal") or r.get("notes") else ""
        lines.append(head + f" {ms['eager']:.3f} | {comp} | {ms['normkit']:.3f}{mark} | {r['speedup_vs_eager']:.2f}x | "
                     f"{vs_comp} | {r['gbps']['eager']:.0f} | {r['gbps']['normkit']:.0f} | "
                     f"{r['gbps']['normkit'] / copy_gbps:.0%} |")
    marked = [r for r in report["results"] if r.get("kernel_refusal") or r.get("notes")]
    if marked:
        lines += ["", "† on these cases:", ""] + [
            f"- {r['case']}: " + "; ".join(([f"normkit's kernels refuse it and fall back: {r['kernel_refusal']}"]
                                             if r.get("kernel_refusal") else []) + r.get("notes", []))
            for r in marked]
    lines += [
        "",
        f"Measured {len(report['results'])} of {report['planned']} planned cases"
        + (f"; stopped by the budget ({meta['budget_s']:.0f} s)" if report.get("budget_stop") else "") + ".",
        "",
        "Notes. eager: torch.nn.BatchNorm1d/2d (+ F.relu, + the residual add), torch.nn.GroupNorm + F.silu, "
        "torch.nn.LayerNorm; compile: torch.compile (default mode, dynamic=False, "
        f"backend {meta['compile_backend']}) of that same composition; normkit: normkit.nn.BatchNorm1d/2d, "
        "BatchNormAct2d(act='relu') with forward(x, residual), normkit.functional.group_norm(..., activation='silu'), "
        "normkit.nn.LayerNorm, on their default backend. BatchNorm parameters and running statistics are float32 "
        "with bf16 activations (what autocast does); GroupNorm and LayerNorm parameters take the activation's "
        "dtype. train fwd+bwd: forward in training mode (running statistics move), then torch.autograd.grad of "
        "input, residual, weight and bias for a random upstream gradient; eval fwd and fwd: inference under "
        "torch.no_grad(). vs eager / vs compile: median over interleaved rounds of the per-round time ratio "
        "(> 1: normkit faster). * in x MB: the input is over 2x the L2 cache "
        f"({meta['l2_bytes'] / 2**20:.0f} MiB). Byte model: {BYTE_MODEL}",
    ]
    if report["errors"]:
        lines += ["", "## Errors", ""] + [f"- {e}" for e in report["errors"]]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Main


def environment(device: torch.device, args) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        l2 = int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
        card = f"{torch.cuda.get_device_name(device)} ({props.multi_processor_count} SMs, " \
               f"{props.total_memory / 2**30:.0f} GiB, L2 {l2 / 2**20:.0f} MiB)"
    else:
        l2 = 0  # unknown: every input counts as over 2x L2, and one input set is used
        card = f"CPU {platform.machine()} ({os.cpu_count()} cores), Triton interpreter " \
               f"(TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}): timings meaningless, L2 taken as 0"
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "card": card, "date": now.date().isoformat(), "started": now.strftime("%H:%M:%S UTC"),
        "torch": torch.__version__, "triton": triton_version, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
        "normkit": normkit.__version__, "python": platform.python_version(), "l2_bytes": l2,
        "command": "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
        "smoke": args.smoke, "quick": args.quick, "budget_s": args.budget_s,
        "normkit_backend_env": os.environ.get("NORMKIT_BACKEND"),
    }


def write(report: dict, out: str | None) -> None:
    if not out:
        return
    folder = os.path.dirname(os.path.abspath(out))
    os.makedirs(folder, exist_ok=True)
    with open(out, "w") as fh:
        fh.write(render(report))
    with open(os.path.splitext(out)[0] + ".json", "w") as fh:
        json.dump(report, fh, indent=1, default=str)


def cuda_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        return True
    except Exception:  # a sticky CUDA error: nothing more can run in this process
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (Triton interpreter; with --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, fp32 only: code paths, not timings")
    parser.add_argument("--quick", action="store_true", help="only the quick set (every target covered)")
    parser.add_argument("--budget-s", type=float, default=0.0,
                        help="stop adding cases when the next would end past this many seconds of run time (0: none)")
    parser.add_argument("--skip-compile", action="store_true", help="no torch.compile baseline")
    parser.add_argument("--skip-correctness", action="store_true", help="no correctness section (not recommended)")
    parser.add_argument("--correctness-only", action="store_true", help="the correctness section alone")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per case (default 11; smoke 2)")
    parser.add_argument("--out", default=None, help="markdown report path (default $OUT/gpu-bench.md if $OUT is set); "
                        "the JSON goes beside it")
    args = parser.parse_args(argv)
    start = time.perf_counter()

    device = torch.device(args.device)
    if device.type == "cpu":
        if not args.smoke:
            print("--device cpu runs only with --smoke (timings under the interpreter mean nothing)", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--device cpu needs TRITON_INTERPRET=1 set before Python starts (Triton reads it when kernels are "
                  "decorated): TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --device cpu --smoke",
                  file=sys.stderr)
            return 2
        os.environ.setdefault("NORMKIT_BACKEND", "triton")  # CPU tensors default to the "cpu" backend
    elif not torch.cuda.is_available():
        print("no CUDA device: run on a GPU, or smoke-test with TRITON_INTERPRET=1 ... --device cpu --smoke",
              file=sys.stderr)
        return 2

    out = args.out or (os.path.join(os.environ["OUT"], "gpu-bench.md") if os.environ.get("OUT") else None)
    compile_backend = None if args.skip_compile else ("eager" if args.smoke and device.type == "cpu" else "inductor")
    smoke = args.smoke
    settings = Settings(device, compile_backend, rounds=args.rounds or (2 if smoke else 11), warmup=0 if smoke else 3,
                        sample_ms=0.0 if smoke else 2.0, l2_bytes=0)
    meta = environment(device, args)
    settings.l2_bytes = meta["l2_bytes"]
    meta["compile_backend"] = compile_backend or "skipped"
    meta["timing"] = (f"{'CUDA events' if device.type == 'cuda' else 'perf_counter'}, {settings.warmup} warm-up "
                      f"calls, {settings.rounds} interleaved rounds, samples of >= {settings.sample_ms} ms of "
                      "back-to-back calls, medians; inputs rotate over sets totalling > 3x L2 (cold L2)")
    torch.manual_seed(0)
    report = {"meta": meta, "status": "running", "copy": {}, "correctness": [], "provenance": [], "targets": [],
              "results": [], "errors": [], "planned": 0}
    print(f"# {meta['card']}; torch {meta['torch']}, triton {meta['triton']}; {meta['command']}", file=sys.stderr)

    copy_bytes = 2**20 * (8 if smoke else max(1024, 8 * settings.l2_bytes // 2**20))
    report["copy"]["start"] = copy_bandwidth(settings, copy_bytes)
    print(f"copy: {report['copy']['start']['gbps']:.0f} GB/s", file=sys.stderr)

    if not args.skip_correctness:
        checks = CHECKS_SMOKE if smoke else CHECKS_GPU
        for case in checks:
            try:
                row = check(case, device)
            except Exception as exc:  # every failure is reported, then the run goes on
                row = {"case": case.label(), "op": case.op, "quantities": {}, "worst": None, "ok": False,
                       "problems": [f"raised {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"],
                       "traceback": traceback.format_exc()}
            report["correctness"].append(row)
            print(f"  check {'ok  ' if row['ok'] else 'FAIL'} {row['case']}"
                  + ("" if row["ok"] else f": {'; '.join(row['problems'])}"), file=sys.stderr)
            if not cuda_alive(device):
                report["errors"].append(f"CUDA context lost after check {case.label()}; run stopped")
                break
        if device.type == "cuda" and cuda_alive(device):
            report["provenance"] = provenance(device)
        failed = [c for c in report["correctness"] if not c["ok"]]
        if failed:
            print(f"\n!!! CORRECTNESS FAILED: {len(failed)} of {len(report['correctness'])} checks "
                  "(see the table; the benchmark still runs) !!!\n", file=sys.stderr)
        write(report, out)

    cases = [] if args.correctness_only or not cuda_alive(device) else (
        SMOKE if smoke else QUICK if args.quick else full_suite())
    report["planned"] = len(cases)
    durations: list[float] = []
    for i, case in enumerate(cases):
        elapsed = time.perf_counter() - start
        estimate = statistics.median(durations[-8:]) if durations else 10.0
        if args.budget_s and elapsed + estimate > args.budget_s:
            report["budget_stop"] = True
            print(f"budget: stopping after {i} of {len(cases)} cases ({elapsed:.0f} s elapsed, next ~{estimate:.0f} s)",
                  file=sys.stderr)
            break
        try:
            r = measure(case, settings)
            durations.append(r["case_s"])
            ce = f"{r['speedup_vs_compile']:.2f}x" if r["speedup_vs_compile"] is not None else "-"
            print(f"  [{i + 1}/{len(cases)}] {case.label():60s} vs eager {r['speedup_vs_eager']:.2f}x  vs compile "
                  f"{ce}  normkit {r['gbps']['normkit']:.0f} GB/s  ({r['case_s']:.1f} s)", file=sys.stderr)
        except Exception as exc:  # a failing case is reported, the rest still run
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            r = {"case": case.label(), "op": case.op, "variant": case.variant, "mode": case.mode,
                 "shape": list(case.shape), "layout": case.layout, "dtype": case.dtype,
                 "x_bytes": case.nbytes, "over_2x_l2": case.nbytes > 2 * settings.l2_bytes, "error": message,
                 "traceback": traceback.format_exc()}
            report["errors"].append(f"{case.label()}: {message}")
            print(f"  [{i + 1}/{len(cases)}] {case.label():60s} ERROR {message}", file=sys.stderr)
        report["results"].append(r)
        if not cuda_alive(device):
            report["errors"].append(f"CUDA context lost after {case.label()}; run stopped")
            break
        report["targets"] = targets(report["results"], report["copy"]["start"]["gbps"])
        write(report, out)

    if cuda_alive(device) and not args.correctness_only:
        report["copy"]["end"] = copy_bandwidth(settings, copy_bytes)
    report["targets"] = targets(report["results"], report["copy"]["start"]["gbps"])
    failed = [c for c in report["correctness"] if not c["ok"]]
    report["status"] = ("CORRECTNESS FAILED" if failed else "errors" if report["errors"] else "ok") + (
        " (smoke)" if smoke else "")
    report["meta"]["wall_s"] = time.perf_counter() - start
    write(report, out)
    print(render(report))
    if out:
        print(f"written: {out} and {os.path.splitext(out)[0]}.json", file=sys.stderr)
    return 1 if failed or report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
