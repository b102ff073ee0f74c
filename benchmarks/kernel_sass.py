"""Instructions per element of the statistics kernels' hot loops, from sm_90 SASS compiled offline (no GPU needed).

    python benchmarks/kernel_sass.py                         # moments_* and grad_sums_*, fp32 and bf16: the table
    python benchmarks/kernel_sass.py --kernel moments_rows --dtype bf16 --show-loop    # one kernel, its loop's SASS
    python benchmarks/kernel_sass.py --json sass.json        # the rows (and the loop's opcode mix) as JSON too
    git archive HEAD src | tar -x -C /tmp/old && python benchmarks/kernel_sass.py --src /tmp/old/src   # another tree
    python benchmarks/kernel_sass.py --align 1               # the shape scalars not multiples of 16 (no vector loads)
    python benchmarks/kernel_sass.py --configs autotune      # the autotune space of the kernels before issue 13

Each kernel of ``KERNELS`` (``src/normkit/kernels/_bn_reduce.py``) is compiled by ``triton.compile`` for
``GPUTarget("cuda", 90, 32)`` (H100/H200) with triton's bundled ptxas; no CUDA driver is queried. The cubin is
disassembled by triton's bundled ``cuobjdump -sass``; the hot loop is the innermost loop (the span from a backward
branch's target to the branch) that holds weak global loads (volatile ``.STRONG`` loads, as in a merge of other
programs' partials, do not count), preferring one whose loads per iteration are a whole multiple of what the block
sizes say a thread streams, then the most loaded bytes. Instructions per
element = the loop's instructions (NOPs not counted) / the elements one thread handles per iteration, which is
``elements per iteration / (32 * num_warps)`` with the elements per iteration from the kernel's block sizes (times
an unroll factor when the loop's loads show that ptxas unrolled it). A static count of the loop body: every
instruction once, branches not weighted, the memory system not modelled; an issue-slot budget, not a timing.

The kernel signatures are read from each ``JITFunction`` (``triton.autotune`` / ``triton.heuristics`` wrappers
unwrapped) and typed from the table below: pointers (``*in`` = the measured input dtype), scalars (``i32``; ``i32:16``
= a multiple of 16 in the measured case, which triton's runtime would specialise), and per-config constexpr values.
A parameter the table does not know is an error that names it; table entries the kernel does not take are ignored.
Pointers are taken 16-byte aligned (as torch allocates). The last output line is
``sass: <kernel> <dtype> <N.N> instructions per element`` for the worst moments kernel row (issue 13's goal: <= 8).

With ``TRITON_INTERPRET`` set (the test suite sets it) ``triton.jit`` makes interpreter functions that cannot be
compiled, so the script then re-runs itself in a subprocess without it.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.util
import inspect
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

COMMAND = "python benchmarks/kernel_sass.py"
TARGET_ARCH = 90  # sm_90 (H100 / H200); triton builds sm_90a
REPO = Path(__file__).resolve().parent.parent
KERNEL_MODULE = "normkit.kernels._bn_reduce"
DTYPES = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16"}
ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# ---------------------------------------------------------------------------------------------------------------
# What to compile. Keep in step with the kernels' signatures and the host's launch choices (_bn_launch/_bn_tiling):
# a kernel parameter missing here stops the script with its name; table entries a kernel does not take are ignored.
# Two config sets: "host" (default), the launches of the host at 3a08287 (2026-12-04, after issue 13's rewrite:
# 2048 values per chunk, 4 warps, 64 tiles per merge step; BLOCK_S the largest power of two <= 1024 dividing S,
# else the next power of two above S, masked) for ResNet-like planes and C >= 64 channels-last; "autotune", the
# autotune space before the rewrite (BLOCK 1024/2048/4096 x 4/8 warps as the heuristics shaped it for long planes).
# ---------------------------------------------------------------------------------------------------------------

HOST = {"REDUCE_BLOCK": 2048, "REDUCE_WARPS": 4, "MERGE_BLOCK": 64}  # _bn_tiling's constants the host set mirrors


@dataclasses.dataclass(frozen=True)
class Config:
    """One launch configuration: constexpr values, warps, pipeline stages, the scalars that are *not* multiples of
    16 in the case it stands for (``unaligned``, overriding ``i32:16``), and a note for the table (``"7x7"``)."""

    constexprs: dict
    num_warps: int
    num_stages: int = 3
    unaligned: tuple = ()
    note: str = ""


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """How to type one kernel's parameters and how many elements one iteration of its hot loop covers.

    ``args``: parameter name -> ``"*in"`` (pointer to the measured dtype), ``"*fp32"`` etc., ``"i32"`` or
    ``"i32:16"`` (a scalar that is a multiple of 16 in the measured case), ``"fp32"``. ``configs``: config set name
    -> configs. ``fixed``: constexprs common to every config. ``elements``: elements of the tensor one loop
    iteration covers, from the constexprs. ``streams``: how many input tensors the loop streams (to check the loop's
    loads against ``elements``).
    """

    args: dict
    configs: dict
    elements: Callable[[dict], int]
    streams: int = 1
    fixed: dict = dataclasses.field(default_factory=dict)


def _host_planes(even: bool) -> tuple:
    """The host's plane launches: ``BLOCK_S`` 64 / 256 / 1024 with ``BLOCK_P = 2048 / BLOCK_S``, 4 warps; with
    ``even`` the unmasked variants (kernels without ``EVEN`` get each block shape once)."""
    block, warps = HOST["REDUCE_BLOCK"], HOST["REDUCE_WARPS"]
    cases = [(64, True, (), "56x56"), (256, True, (), "112x112"), (1024, True, (), "32x32, 64x64")]
    if even:  # the masked variants: whole plane groups with ragged planes (EVEN_P), and ragged both ways
        cases += [(64, "P", ("S", "span"), "7x7"), (256, "P", ("S", "span"), "14x14"), (1024, "P", (), "28x28"),
                  (64, False, ("S", "span"), "7x7, ragged plane groups")]
    else:
        cases = [(64, None, (), "56x56"), (256, None, (), "112x112"), (1024, None, (), "28x28, 32x32")]
    flags = {None: {}, True: {"EVEN": True, "EVEN_P": True}, "P": {"EVEN": False, "EVEN_P": True},
             False: {"EVEN": False, "EVEN_P": False}}
    return tuple(Config({"BLOCK": block, "BLOCK_P": block // s, "BLOCK_S": s, **flags[e]}, warps, unaligned=u,
                        note=n) for s, e, u, n in cases)


def _host_rows(even: bool) -> tuple:
    """The host's channels-last launches for C >= 64: ``BLOCK_C = 64``, ``BLOCK_M = 32``, 4 warps."""
    block, warps = HOST["REDUCE_BLOCK"], HOST["REDUCE_WARPS"]
    base = {"BLOCK": block, "BLOCK_C": 64, "BLOCK_M": block // 64}
    if not even:
        return (Config(base, warps, note="C % 64 == 0"),)
    return (Config({**base, "EVEN": True}, warps, note="rows % tile == 0, C % 64 == 0"),
            Config({**base, "EVEN": False}, warps, note="ragged last tile"))


def _autotune_planes() -> tuple:
    """Before the rewrite: BLOCK 1024/2048/4096 x 4/8 warps as ``BLOCK_P x BLOCK_S`` tiles of a long plane."""
    return tuple(Config({"BLOCK": b, "BLOCK_P": b // 1024, "BLOCK_S": 1024}, w)
                 for b in (1024, 2048, 4096) for w in (4, 8))


def _autotune_rows() -> tuple:
    """Before the rewrite: BLOCK 1024/2048/4096 x 4/8 warps as ``BLOCK_M x BLOCK_C`` tiles with 64 channels."""
    return tuple(Config({"BLOCK": b, "BLOCK_C": 64, "BLOCK_M": b // 64}, w)
                 for b in (1024, 2048, 4096) for w in (4, 8))


# Scalars and pointers of the kernels before and after issue 13's rewrite (last-ticket merge, running statistics
# in the kernel).
_PLANE_ARGS = {"P": "i32", "C": "i32:16", "S": "i32:16", "per_tile": "i32", "span": "i32:16", "tiles_s": "i32",
               "tiles": "i32"}
_ROW_ARGS = {"M": "i32", "C": "i32:16", "per_tile": "i32", "tiles": "i32"}
_MOMENT_ARGS = {"x_ptr": "*in", "part_ptr": "*fp32", "lock_ptr": "*i32", "stats_ptr": "*fp32", "rm_ptr": "*fp32",
                "rv_ptr": "*fp32", "counter_ptr": "*i64", "momentum": "fp32", "bessel": "fp32"}
_GRAD_ARGS = {"dy_ptr": "*in", "x_ptr": "*in", "r_ptr": "*in", "dz_ptr": "*in", "dx_ptr": "*in", "mean_ptr": "*fp32",
              "rstd_ptr": "*fp32", "var_ptr": "*fp32", "w_ptr": "*fp32", "b_ptr": "*fp32", "part_ptr": "*fp32",
              "lock_ptr": "*i32", "sums_ptr": "*fp32", "dw_ptr": "*fp32", "db_ptr": "*fp32", "eps": "fp32"}
# Training with running statistics and the batch counter.
_MOMENT_FIXED = {"HAS_RUNNING": True, "SKIP_NONFINITE": False, "HAS_COUNTER": True, "BLOCK_T": HOST["MERGE_BLOCK"]}
# No activation, no residual (dy and x streamed), affine gradients wanted.
_GRAD_FIXED = {"ACT": 0, "HAS_RES": False, "WRITE_DZ": False, "WRITE_DX": False, "HAS_W": True, "HAS_B": True,
               "HAS_DW": True, "HAS_DB": True, "BLOCK_T": HOST["MERGE_BLOCK"]}

KERNELS: dict[str, KernelSpec] = {
    "moments_planes": KernelSpec(
        args={**_MOMENT_ARGS, **_PLANE_ARGS}, fixed=_MOMENT_FIXED,
        configs={"host": _host_planes(even=True), "autotune": _autotune_planes()},
        elements=lambda k: k["BLOCK_P"] * k["BLOCK_S"]),
    "moments_rows": KernelSpec(
        args={**_MOMENT_ARGS, **_ROW_ARGS}, fixed=_MOMENT_FIXED,
        configs={"host": _host_rows(even=True), "autotune": _autotune_rows()},
        elements=lambda k: k["BLOCK_M"] * k["BLOCK_C"]),
    "grad_sums_planes": KernelSpec(
        args={**_GRAD_ARGS, **_PLANE_ARGS}, fixed=_GRAD_FIXED, streams=2,
        configs={"host": _host_planes(even=False), "autotune": _autotune_planes()},
        elements=lambda k: k["BLOCK_P"] * k["BLOCK_S"]),
    "grad_sums_rows": KernelSpec(
        args={**_GRAD_ARGS, **_ROW_ARGS}, fixed=_GRAD_FIXED, streams=2,
        configs={"host": _host_rows(even=False), "autotune": _autotune_rows()},
        elements=lambda k: k["BLOCK_M"] * k["BLOCK_C"]),
}
MOMENTS = ("moments_planes", "moments_rows")


class SassError(RuntimeError):
    """The kernel could not be typed, compiled, disassembled or its loop found."""


# ---------------------------------------------------------------------------------------------------------------
# SASS parsing and the loop finder (pure text: unit-tested on snippets).
# ---------------------------------------------------------------------------------------------------------------

_INSTR = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_FUNCTION = re.compile(r"Function\s*:\s*(\S+)")
_BRANCH_TARGET = re.compile(r"(?:0x([0-9a-fA-F]+)|`\(([^)]+)\))")
_BRANCHES = {"BRA", "JMP", "BRX", "JMX"}
_GLOBAL_LOADS = {"LDG", "LDGSTS", "UBLKCP", "UTMALDG"}


@dataclasses.dataclass(frozen=True)
class Instr:
    """One SASS instruction: byte address, guard predicate (``""`` if none), opcode with modifiers, operands."""

    addr: int
    pred: str
    opcode: str
    operands: str

    @property
    def base(self) -> str:
        """The opcode without modifiers (``LDG`` for ``LDG.E.128``)."""
        return self.opcode.split(".")[0]

    @property
    def text(self) -> str:
        """The instruction as disassembled (without the trailing ``;``)."""
        return " ".join(x for x in (self.pred, self.opcode, self.operands) if x)


@dataclasses.dataclass(frozen=True)
class Loop:
    """Instructions ``[start, end]`` (byte addresses) closed by the backward branch at ``end``."""

    start: int
    end: int
    body: tuple

    @property
    def count(self) -> int:
        """Instructions in the body, the closing branch included, NOPs (alignment padding) not."""
        return sum(1 for i in self.body if i.base != "NOP")

    def global_load_bytes(self, streaming: bool = False) -> int:
        """Bytes one thread reads from global memory per iteration (vector width of each load instruction); with
        ``streaming`` only weak loads (not ``.STRONG``: volatile/atomic reads of other programs' partials)."""
        return sum(_load_bytes(i) for i in self.body
                   if i.base in _GLOBAL_LOADS and not (streaming and "STRONG" in i.opcode.split(".")))

    def opcodes(self) -> dict:
        """How many of each opcode (modifiers dropped) the body holds, most frequent first."""
        return dict(Counter(i.base for i in self.body if i.base != "NOP").most_common())


def _load_bytes(instr: Instr) -> int:
    """Width in bytes of one load instruction from its modifiers (``.128``, ``.64``, ``.U16``, ...; else 32 bit)."""
    mods = set(instr.opcode.split(".")[1:])
    for mod, size in (("128", 16), ("64", 8), ("U16", 2), ("S16", 2), ("U8", 1), ("S8", 1)):
        if mod in mods:
            return size
    return 4


def parse_sass(text: str, function: str | None = None) -> list[Instr]:
    """The instructions of ``function`` (default: the first) in ``cuobjdump -sass`` or ``nvdisasm`` text.

    Branch targets given as labels (``nvdisasm``: ``BRA `(.L_x_3)``) are rewritten as ``0x`` addresses.
    """
    chunks: list[tuple[str | None, list[str]]] = [(None, [])]
    for line in text.splitlines():
        m = _FUNCTION.search(line)
        if m and not _INSTR.match(line):
            chunks.append((m.group(1), []))
        else:
            chunks[-1][1].append(line)
    named = [c for c in chunks if c[0] is not None]
    if function is not None:
        picked = [c for c in named if c[0] == function]
        if not picked:
            raise SassError(f"no function {function!r} in the SASS (found {[c[0] for c in named]})")
        lines = picked[0][1]
    else:
        lines = named[0][1] if named else chunks[0][1]
    instrs: list[Instr] = []
    labels: dict[str, int] = {}
    pending: list[str] = []
    for line in lines:
        label = _LABEL.match(line)
        if label:
            pending.append(label.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2).strip()
        pred = ""
        if body.startswith("@"):
            pred, _, body = body.partition(" ")
        opcode, _, operands = body.strip().partition(" ")
        instrs.append(Instr(addr, pred, opcode, operands.strip()))
        for name in pending:
            labels[name] = addr
        pending = []
    if labels:
        instrs = [dataclasses.replace(i, operands=_BRANCH_TARGET.sub(
            lambda m: f"0x{labels[m.group(2)]:x}" if m.group(2) in labels else m.group(0), i.operands))
            if i.base in _BRANCHES else i for i in instrs]
    return instrs


def branch_target(instr: Instr) -> int | None:
    """The byte address a direct branch jumps to, ``None`` for anything else (indirect branches included)."""
    if instr.base not in _BRANCHES:
        return None
    m = re.search(r"0x([0-9a-fA-F]+)", instr.operands)
    return int(m.group(1), 16) if m else None


def find_loops(instrs: Sequence[Instr]) -> list[Loop]:
    """Every loop closed by a backward branch, outermost first; a branch to itself (the trap after ``EXIT``) is
    not a loop."""
    loops = []
    for n, instr in enumerate(instrs):
        target = branch_target(instr)
        if target is None or target >= instr.addr:
            continue
        body = tuple(i for i in instrs[:n + 1] if i.addr >= target)
        loops.append(Loop(target, instr.addr, body))
    return sorted(loops, key=lambda lp: (lp.start, -lp.end))


def innermost_loops(loops: Sequence[Loop]) -> list[Loop]:
    """The loops that contain no other loop."""
    def inside(a: Loop, b: Loop) -> bool:
        return a is not b and b.start <= a.start and a.end <= b.end and (a.start, a.end) != (b.start, b.end)
    return [b for b in loops if not any(inside(a, b) for a in loops)]


def hot_loop(instrs: Sequence[Instr], expected_bytes: float | None = None) -> Loop:
    """The streaming loop of a reduction: the innermost loop with weak (not volatile) global loads, preferring one
    whose loads per iteration are a whole multiple of ``expected_bytes`` (what one thread streams per source
    iteration; ptxas may unroll), then the most loaded bytes, then the most instructions."""
    loops = innermost_loops(find_loops(instrs))
    if not loops:
        raise SassError("no loop (backward branch) in the SASS")

    def rank(lp: Loop) -> tuple:
        weak = lp.global_load_bytes(streaming=True)
        whole = bool(expected_bytes) and weak > 0 and (weak / expected_bytes) == int(weak / expected_bytes)
        return (weak > 0, whole, weak, lp.global_load_bytes(), lp.count)

    return max(loops, key=rank)


# ---------------------------------------------------------------------------------------------------------------
# Offline compilation.
# ---------------------------------------------------------------------------------------------------------------


def unwrap(kernel):
    """The ``JITFunction`` under ``triton.autotune`` / ``triton.heuristics`` wrappers (their ``.fn`` chain)."""
    from triton.runtime.jit import JITFunction

    seen = kernel
    while not isinstance(kernel, JITFunction):
        if not hasattr(kernel, "fn"):
            raise SassError(f"{getattr(seen, '__name__', seen)!r} is not a triton.jit kernel ({type(kernel).__name__}"
                            f"{'; TRITON_INTERPRET is set' if os.environ.get('TRITON_INTERPRET') else ''})")
        kernel = kernel.fn
    return kernel


def build_signature(fn, name: str, spec: KernelSpec, config: Config, dtype: str) -> tuple[dict, dict, dict]:
    """``(signature, constexprs, attrs)`` for ``triton.compiler.ASTSource`` from the kernel's own parameters.

    Raises ``SassError`` naming any parameter the table does not type (a constexpr with a default takes it).
    """
    values = {**spec.fixed, **config.constexprs}
    signature: dict = {}
    constexprs: dict = {}
    attrs: dict = {}
    for index, param in enumerate(fn.params):
        pname = param.name
        if param.is_constexpr:
            if pname in values:
                constexprs[pname] = values[pname]
            elif param.default is not inspect.Parameter.empty:
                constexprs[pname] = param.default
            else:
                raise SassError(f"{name}: constexpr parameter {pname!r} has no value: add it to the configs (or "
                                f"'fixed') of KERNELS[{name!r}] in benchmarks/kernel_sass.py")
            signature[pname] = "constexpr"
            continue
        kind = spec.args.get(pname)
        if kind is None:
            raise SassError(f"{name}: unknown parameter {pname!r}: give its type in KERNELS[{name!r}].args in "
                            f"benchmarks/kernel_sass.py ('*in', '*fp32', 'i32' or 'i32:16')")
        aligned = kind.startswith("*") or (kind.endswith(":16") and pname not in config.unaligned)
        kind = kind.split(":")[0]
        signature[pname] = "*" + DTYPES[dtype] if kind == "*in" else kind
        if aligned:
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def compile_options() -> dict:
    """The compile options normkit launches its kernels with (FMA contraction on, said explicitly)."""
    try:
        from normkit.kernels._options import COMPILE_OPTIONS
    except ImportError:  # an older tree: triton's 3.x default
        COMPILE_OPTIONS = {"enable_fp_fusion": True}  # noqa: N806
    return dict(COMPILE_OPTIONS)


def compile_cubin(fn, signature: dict, constexprs: dict, attrs: dict, num_warps: int, num_stages: int) -> bytes:
    """sm_90 cubin of ``fn`` compiled offline (triton's bundled ptxas; no driver is asked for the target)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    options = {**compile_options(), "num_warps": num_warps, "num_stages": num_stages}
    compiled = triton.compile(src, target=GPUTarget("cuda", TARGET_ARCH, 32), options=options)
    return compiled.asm["cubin"]


def tool(name: str) -> str:
    """Path of one of triton's bundled NVIDIA tools (``cuobjdump``, ``nvdisasm``, ``ptxas``); ``SassError`` if none."""
    try:
        from triton import knobs

        return getattr(knobs.nvidia, name).path
    except Exception as exc:  # noqa: BLE001 - any failure means the same: the tool is not usable
        raise SassError(f"triton's {name} is not available: {exc}") from exc


def _sass_cache() -> Path:
    """Where disassemblies are kept (cuobjdump takes ~0.5 s a call): beside triton's own cache."""
    root = os.environ.get("TRITON_CACHE_DIR") or Path.home() / ".triton" / "cache"
    return Path(root) / "kernel_sass"


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin (kept on disk by the cubin's hash, so a rerun does not disassemble again)."""
    cached = _sass_cache() / f"{hashlib.sha256(cubin).hexdigest()}.sass"
    if cached.is_file():
        return cached.read_text()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SassError(f"cuobjdump failed: {done.stderr.strip()}")
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(done.stdout)
        os.replace(partial, cached)
    except OSError:  # a read-only cache folder only costs the next run the disassembly
        pass
    return done.stdout


def effective_constexprs(fn, name: str, spec: KernelSpec, config: Config) -> dict:
    """The constexpr values ``config`` gives the kernel ``fn`` (``build_signature``'s checks included)."""
    return build_signature(fn, name, spec, config, "fp32")[1]


def measure(fn, name: str, spec: KernelSpec, config: Config, dtype: str, label: Sequence[str] = (),
            keep_loop: bool = False) -> dict:
    """Compile one kernel x config x dtype and measure its hot loop: one row of the table (a dict). ``label``:
    the constexprs named in the config column (default: the ``BLOCK*`` ones)."""
    from triton.compiler.errors import CompilationError

    jit = unwrap(fn)
    signature, constexprs, attrs = build_signature(jit, name, spec, config, dtype)
    try:
        per_iteration = spec.elements(constexprs)
    except KeyError as exc:
        raise SassError(f"{name}: the elements per iteration need constexpr {exc.args[0]!r}, which the kernel does "
                        f"not take: update KERNELS[{name!r}].elements in benchmarks/kernel_sass.py") from exc
    try:
        cubin = compile_cubin(jit, signature, constexprs, attrs, config.num_warps, config.num_stages)
    except CompilationError as exc:
        raise SassError(f"{name} ({dtype}, {constexprs}) does not compile:\n{exc}") from exc
    sass = disassemble(cubin)
    threads = 32 * config.num_warps
    per_thread = per_iteration / threads
    streamed = ELEMENT_BYTES[dtype] * spec.streams  # bytes one element costs the loop's loads
    loop = hot_loop(parse_sass(sass, jit.__name__), per_thread * streamed)
    # ptxas may unroll the loop: its loads then cover a whole multiple of the elements one source iteration reads.
    loaded = loop.global_load_bytes(streaming=True) / streamed
    ratio = loaded / per_thread if per_thread else 0.0
    unroll = int(ratio) if ratio >= 2 and ratio == int(ratio) else 1
    names = label or [k for k in constexprs if k.startswith("BLOCK")]
    shown = {k: constexprs[k] for k in names if k in constexprs}
    row = {
        "kernel": name,
        "config": " ".join([*(f"{k}={v}" for k, v in shown.items()), f"warps={config.num_warps}"])
        + (f" ({config.note})" if config.note else ""),
        "dtype": dtype,
        "instructions": loop.count,
        "elements_per_thread": per_thread * unroll,
        "instructions_per_element": loop.count / (per_thread * unroll),
        "unroll": unroll,
        "loaded_elements_per_thread": loaded,
        "loop": [f"0x{loop.start:04x}", f"0x{loop.end:04x}"],
        "opcodes": loop.opcodes(),
        "constexprs": constexprs,
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "unaligned": [k for k, v in spec.args.items() if v.endswith(":16") and k in config.unaligned],
    }
    if keep_loop:
        row["sass"] = [f"/*{i.addr:04x}*/ {i.text} ;" for i in loop.body]
    return row


# ---------------------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------------------


def load_kernels(src: str | None):
    """normkit's ``_bn_reduce`` module, imported from ``src`` (a ``src/`` folder) when given, else from the installed
    normkit (or this checkout's ``src/`` if none is installed)."""
    if src is not None:
        sys.path.insert(0, str(Path(src).resolve()))
    elif importlib.util.find_spec("normkit") is None:
        sys.path.insert(0, str(REPO / "src"))
    module = importlib.import_module(KERNEL_MODULE)
    if src is not None and not Path(module.__file__).resolve().is_relative_to(Path(src).resolve()):
        raise SassError(f"normkit was imported from {module.__file__}, not from {src}")
    return module


def spec_for(name: str, align: int) -> KernelSpec:
    """``KERNELS[name]``; with ``align`` 1 no scalar is taken for a multiple of 16 (every config unaligned)."""
    spec = KERNELS[name]
    if align == 1:
        spec = dataclasses.replace(spec, args={k: v.split(":")[0] for k, v in spec.args.items()})
    return spec


def plan(module, names: Sequence[str], dtypes: Sequence[str], align: int, config_set: str) -> list[tuple]:
    """The ``(name, config index, dtype, label)`` jobs of one config set: configs that give a kernel the same
    compile (say, an ``EVEN`` the kernel does not take) once; ``label``: the configs' own BLOCK constexprs
    (``BLOCK`` only if no other) and any other constexpr whose value differs between the kernel's configs."""
    jobs = []
    for name in names:
        if not hasattr(module, name):
            raise SassError(f"{name} is not in {module.__name__}")
        fn, spec = unwrap(getattr(module, name)), spec_for(name, align)
        seen: dict = {}
        configs = spec.configs.get(config_set)
        if not configs:
            raise SassError(f"KERNELS[{name!r}] has no {config_set!r} configs")
        for index, config in enumerate(configs):
            key = tuple(sorted(effective_constexprs(fn, name, spec, config).items()))
            unaligned = tuple(sorted(config.unaligned)) if align == 16 else ()
            seen.setdefault((key, config.num_warps, config.num_stages, unaligned), index)
        values = [dict(k[0]) for k in seen]
        keys = {k for v in values for k in v}
        tiles = [k for k in keys if k.startswith("BLOCK") and k not in spec.fixed]
        blocks = [k for k in tiles if k != "BLOCK"] or tiles
        varying = [k for k in keys if k not in blocks and k != "BLOCK" and len({repr(v.get(k)) for v in values}) > 1]
        label = tuple(sorted(blocks) + sorted(varying))
        jobs += [(name, index, dtype, label) for dtype in dtypes for index in seen.values()]
    return jobs


def _run_job(job: tuple) -> dict:
    """One ``plan`` job in a worker process (the kernel module is already imported: fork)."""
    name, index, dtype, label, align, config_set, keep_loop = job
    module = importlib.import_module(KERNEL_MODULE)
    spec = spec_for(name, align)
    return measure(getattr(module, name), name, spec, spec.configs[config_set][index], dtype, label, keep_loop)


def table(rows: list[dict]) -> str:
    """The rows as a markdown table."""
    lines = ["| kernel | config | dtype | instructions in loop | elements/thread/iteration | instructions/element |",
             "|---|---|---|---:|---:|---:|"]
    for r in rows:
        unroll = f" (unrolled x{r['unroll']})" if r["unroll"] > 1 else ""
        lines.append(f"| {r['kernel']} | {r['config']} | {r['dtype']} | {r['instructions']} | "
                     f"{r['elements_per_thread']:g}{unroll} | {r['instructions_per_element']:.1f} |")
    return "\n".join(lines)


def _warn_if_host_moved() -> None:
    """Say so on stderr when ``_bn_tiling``'s launch constants differ from ``HOST`` (the table is then stale)."""
    try:
        tiling = importlib.import_module("normkit.kernels._bn_tiling")
    except Exception:  # noqa: BLE001 - no host module to compare with: nothing to say
        return
    moved = {k: (v, getattr(tiling, k)) for k, v in HOST.items() if getattr(tiling, k, v) != v}
    if moved:
        print("kernel_sass: the host launches differently now: " + ", ".join(
            f"{k} {now} (table: {was})" for k, (was, now) in moved.items()) + "; update HOST / KERNELS",
            file=sys.stderr)


def _rerun_without_interpreter(argv: Sequence[str] | None) -> int:
    """Run this script again in a subprocess whose environment lacks ``TRITON_INTERPRET``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = list(sys.argv[1:] if argv is None else argv)
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    """Compile, disassemble, count; print the table and the summary line. Exit status 2 if nothing could be
    measured (no triton, no tools, an unknown parameter)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kernel", action="append", choices=sorted(KERNELS), help="only this kernel (repeatable)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="input dtype (default fp32, bf16)")
    parser.add_argument("--json", type=Path, help="also write the rows (opcode mix included) to this file")
    parser.add_argument("--show-loop", action="store_true", help="print each measured loop's SASS")
    parser.add_argument("--src", help="import normkit from this src/ folder (e.g. an older tree from git archive)")
    parser.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                        help="compiles in parallel (processes; default: CPU count, at most 8)")
    parser.add_argument("--configs", choices=("host", "autotune"), default="host",
                        help="host (default): the host's launches since issue 13's rewrite; autotune: the autotune "
                             "space before it")
    parser.add_argument("--align", type=int, choices=(1, 16), default=16,
                        help="16 (default): shape scalars marked i32:16 are multiples of 16; 1: none is")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return _rerun_without_interpreter(argv)
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the options say it; this silences triton 3.9's warning
    started = time.perf_counter()
    try:
        module = load_kernels(args.src)
        tool("ptxas")
        tool("cuobjdump")
    except Exception as exc:  # noqa: BLE001 - a kernel module mid-edit can fail any way: say so, exit 2
        print(f"kernel_sass: cannot compile offline: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    names = args.kernel or list(KERNELS)
    dtypes = args.dtype or ["fp32", "bf16"]
    if args.configs == "host":
        _warn_if_host_moved()
    try:
        jobs = [(*job, args.align, args.configs, args.show_loop)
                for job in plan(module, names, dtypes, args.align, args.configs)]
        if args.jobs > 1 and len(jobs) > 1 and "fork" in multiprocessing.get_all_start_methods():
            context = multiprocessing.get_context("fork")
            pool = concurrent.futures.ProcessPoolExecutor(min(args.jobs, len(jobs)), mp_context=context)
            try:
                rows = list(pool.map(_run_job, jobs))
            finally:  # the first error stops the jobs not yet started
                pool.shutdown(wait=True, cancel_futures=True)
        else:
            rows = [_run_job(job) for job in jobs]
    except SassError as exc:
        print(f"kernel_sass: {exc}", file=sys.stderr)
        return 2
    if args.show_loop:
        for row in rows:
            print(f"\n{row['kernel']} {row['dtype']} {row['config']}: loop {row['loop'][0]}..{row['loop'][1]}, "
                  f"{row['instructions']} instructions (unroll x{row['unroll']}), opcodes {row['opcodes']}")
            print("\n".join("    " + line for line in row["sass"]))
    elapsed = time.perf_counter() - started
    print(f"\nsm_{TARGET_ARCH} SASS, hot loop of each statistics kernel ({COMMAND}; {args.configs} configs; "
          f"align {args.align}; "
          f"{len(rows)} compiles in {elapsed:.0f} s)\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"arch": f"sm_{TARGET_ARCH}", "configs": args.configs, "align": args.align,
                                         "rows": rows}, indent=1))
    print()
    for name in names:
        for dtype in dtypes:
            values = [r["instructions_per_element"] for r in rows if r["kernel"] == name and r["dtype"] == dtype]
            print(f"{name} {dtype}: {min(values):.1f} .. {max(values):.1f} instructions per element (best .. worst "
                  f"of {len(values)} configs)")
    moments = [r for r in rows if r["kernel"] in MOMENTS] or rows
    worst = max(moments, key=lambda r: r["instructions_per_element"])
    print(f"sass: {worst['kernel']} {worst['dtype']} {worst['instructions_per_element']:.1f} "
          "instructions per element")
    return 0


if __name__ == "__main__":
    sys.exit(main())
