"""benchmarks/kernel_sass.py: the SASS loop finder on known snippets, and one offline sm_90 compile of a tiny kernel.

The compile runs in a subprocess without ``TRITON_INTERPRET`` (the suite sets it on CPU, and under it ``triton.jit``
makes interpreter functions that cannot be compiled). It is skipped, with the reason, when triton or its bundled
ptxas / cuobjdump are missing. Speed is measured by the script, not asserted here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def ks():
    """The benchmarks/kernel_sass.py module (it imports no triton at module level)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import kernel_sass

        yield kernel_sass
    finally:
        sys.path.remove(str(BENCHMARKS))
        sys.modules.pop("kernel_sass", None)


# cuobjdump -sass layout: an outer loop (0x0080..0x01a0) around an inner streaming loop (0x00c0..0x0150), a merge
# loop of volatile loads (0x0200..0x0240), and the self-branch trap after EXIT (not a loop).
CUOBJDUMP = """
	code for sm_90a
		Function : toy
	.headerflags	@"EF_CUDA_ACCELERATORS EF_CUDA_SM90 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM90)"
        /*0000*/                   LDC R1, c[0x0][0x28] ;                     /* 0x00000a00ff017b82 */
                                                                              /* 0x000ff00000000800 */
        /*0010*/                   S2R R0, SR_TID.X ;                         /* 0x0000000000007919 */
                                                                              /* 0x000e220000002100 */
        /*0080*/                   IADD3 R4, R4, 0x1, RZ ;                    /* 0x0000000104047810 */
                                                                              /* 0x000fe20007ffe0ff */
        /*0090*/                   MOV R5, RZ ;                               /* 0x000000ff00057202 */
                                                                              /* 0x000fe20000000f00 */
        /*00a0*/                   NOP ;                                      /* 0x0000000000007918 */
                                                                              /* 0x000fe20000000000 */
        /*00c0*/              @!P0 LDG.E.128 R8, desc[UR6][R2.64] ;          /* 0x0000000602088981 */
                                                                              /* 0x000ea2000c1e1d00 */
        /*00d0*/                   IADD3 R5, R5, 0x400, RZ ;                  /* 0x0000040005057810 */
                                                                              /* 0x000fe20007ffe0ff */
        /*00e0*/                   FADD R12, R12, R8 ;                        /* 0x0000000c0c0c7221 */
                                                                              /* 0x004fe20000000000 */
        /*00f0*/                   FFMA R13, R8, R8, R13 ;                    /* 0x00000008080d7223 */
                                                                              /* 0x000fe2000000000d */
        /*0100*/                   NOP ;                                      /* 0x0000000000007918 */
                                                                              /* 0x000fe20000000000 */
        /*0150*/              @!P1 BRA 0xc0 ;                                 /* 0xfffffffc00d89947 */
                                                                              /* 0x000fea000383ffff */
        /*0160*/                   ISETP.GE.AND P2, PT, R4, R6, PT ;          /* 0x000000060400720c */
                                                                              /* 0x000fda0003f46270 */
        /*01a0*/              @!P2 BRA 0x80 ;                                 /* 0xfffffffc00b4a947 */
                                                                              /* 0x000fea000383ffff */
        /*0200*/                   LDG.E.STRONG.SYS R14, desc[UR6][R2.64] ;   /* 0x000000060202e981 */
                                                                              /* 0x000ea2000c1f5900 */
        /*0210*/                   LDG.E.STRONG.SYS R15, desc[UR6][R2.64+0x4] ;
        /*0220*/                   LDG.E.STRONG.SYS R16, desc[UR6][R2.64+0x8] ;
        /*0230*/                   LDG.E.STRONG.SYS R17, desc[UR6][R2.64+0xc] ;
        /*0240*/               @P3 BRA 0x200 ;                                /* 0xfffffffc00ec3947 */
                                                                              /* 0x000fea000383ffff */
        /*0250*/                   EXIT ;                                     /* 0x000000000000794d */
                                                                              /* 0x000fea0003800000 */
        /*0260*/                   BRA 0x260;                                 /* 0xfffffffc00fc7947 */
                                                                              /* 0x000fc0000383ffff */
		..........
"""

# nvdisasm layout (labels instead of addresses) of one loop.
NVDISASM = """
        .text.toy:
        /*0000*/                   MOV R2, RZ ;
.L_x_1:
        /*0010*/                   LDG.E.64 R4, desc[UR4][R6.64] ;
        /*0020*/                   FADD R2, R2, R4 ;
        /*0030*/                   FADD R2, R2, R5 ;
        /*0040*/               @P0 BRA `(.L_x_1) ;
        /*0050*/                   EXIT ;
.L_x_2:
        /*0060*/                   BRA `(.L_x_2);
"""


def test_parse_sass_reads_cuobjdump(ks):
    instrs = ks.parse_sass(CUOBJDUMP)
    assert [i.addr for i in instrs][:3] == [0x0, 0x10, 0x80]
    load = next(i for i in instrs if i.addr == 0xC0)
    assert (load.pred, load.opcode, load.base) == ("@!P0", "LDG.E.128", "LDG")
    assert ks.branch_target(instrs[-1]) == 0x260
    assert ks.parse_sass(CUOBJDUMP, "toy") == instrs
    with pytest.raises(ks.SassError, match="no function 'other'"):
        ks.parse_sass(CUOBJDUMP, "other")


def test_loop_finder_on_known_snippet(ks):
    instrs = ks.parse_sass(CUOBJDUMP)
    loops = ks.find_loops(instrs)
    assert [(lp.start, lp.end) for lp in loops] == [(0x80, 0x1A0), (0xC0, 0x150), (0x200, 0x240)]  # no trap
    assert [(lp.start, lp.end) for lp in ks.innermost_loops(loops)] == [(0xC0, 0x150), (0x200, 0x240)]
    hot = ks.hot_loop(instrs)
    # The merge loop loads 16 bytes too, but volatile (.STRONG): the streaming loop is the weak-load one.
    assert (hot.start, hot.end) == (0xC0, 0x150)
    assert hot.count == 5  # LDG, IADD3, FADD, FFMA, BRA: the NOP is padding
    assert hot.global_load_bytes() == 16
    assert hot.opcodes() == {"LDG": 1, "IADD3": 1, "FADD": 1, "FFMA": 1, "BRA": 1}


def test_loop_finder_on_nvdisasm_labels(ks):
    instrs = ks.parse_sass(NVDISASM)
    assert ks.branch_target(instrs[4]) == 0x10
    hot = ks.hot_loop(instrs)
    assert (hot.start, hot.end, hot.count, hot.global_load_bytes()) == (0x10, 0x40, 4, 8)


def test_no_loop_is_an_error(ks):
    with pytest.raises(ks.SassError, match="no loop"):
        ks.hot_loop(ks.parse_sass("        /*0000*/                   EXIT ;\n"))


# A tiny reduction compiled offline for sm_90 in a subprocess; it prints the measured row as JSON.
SCRIPT = """
import json, sys
sys.path.insert(0, {benchmarks!r})
import triton
import triton.language as tl
import kernel_sass as ks


@triton.jit
def tiny_sum(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr, tl.sum(acc))


spec = ks.KernelSpec(args={{"x_ptr": "*in", "out_ptr": "*fp32", "n": "i32:16"}},
                     configs={{"host": (ks.Config({{"BLOCK": 512}}, num_warps=4),)}}, elements=lambda k: k["BLOCK"])
row = ks.measure(tiny_sum, "tiny_sum", spec, spec.configs["host"][0], "fp32", keep_loop=True)
try:
    ks.measure(tiny_sum, "tiny_sum", ks.KernelSpec(args={{"x_ptr": "*in", "out_ptr": "*fp32"}}, configs={{}},
               elements=len), spec.configs["host"][0], "fp32")
    row["unknown"] = None
except ks.SassError as exc:
    row["unknown"] = str(exc)
print(json.dumps(row))
"""


def test_offline_compile_counts_a_tiny_loop(ks, tmp_path):
    pytest.importorskip("triton", reason="triton is not installed")
    try:
        ks.tool("ptxas")
        ks.tool("cuobjdump")
    except ks.SassError as exc:
        pytest.skip(f"triton's NVIDIA tools are missing: {exc}")
    script = tmp_path / "tiny.py"
    script.write_text(textwrap.dedent(SCRIPT.format(benchmarks=str(BENCHMARKS))))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    row = json.loads(done.stdout.strip().splitlines()[-1])
    # 512 elements per iteration over 4 warps: 4 per thread (times ptxas's unroll, seen in the loads).
    assert row["elements_per_thread"] == 4 * row["unroll"]
    assert row["loaded_elements_per_thread"] == row["elements_per_thread"]
    assert row["opcodes"].get("LDG", 0) >= 1 and row["opcodes"].get("BRA", 0) >= 1
    assert any("LDG.E.128" in line for line in row["sass"])  # n and x_ptr aligned: one 16-byte load per 4 values
    assert row["instructions"] == len([line for line in row["sass"] if " NOP " not in line])
    assert row["instructions_per_element"] == pytest.approx(row["instructions"] / row["elements_per_thread"])
    assert "unknown parameter 'n'" in row["unknown"]
