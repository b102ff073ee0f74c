"""Every batch-norm kernel variant the host launches compiles for a real GPU (sm_90), checked without one.

The interpreter runs kernels as Python and accepts code that Triton's compiler rejects (a scalar redefined as a
block inside a branch ran under the interpreter and failed to compile for sm_90). So the launches of a matrix of
calls are recorded through the launch hook (training and evaluation, each activation (ReLU with its bitmask),
residual or not, affine or not, running statistics or not, planes and rows, even and ragged tiles, float32 and
bfloat16), and each distinct variant (kernel, argument types, constexprs) is compiled offline for sm_90 with
Triton's bundled ptxas in a subprocess without ``TRITON_INTERPRET``. Skipped, with the reason, where triton or
ptxas is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import normkit.functional as F

pytest.importorskip("triton")
kernels = pytest.importorskip("normkit.kernels")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.uint8: "u8", torch.int32: "i32",
          torch.int64: "i64"}


def _record_launches() -> list[dict]:
    from normkit.kernels import _bn_launch

    variants: dict[str, dict] = {}
    original = _bn_launch.LAUNCH

    def record(kernel, grid, args, options):
        fn = getattr(kernel, "fn", kernel)
        types = ["*" + DTYPES[a.dtype] if isinstance(a, torch.Tensor) else "fp32" if isinstance(a, float) else "i32"
                 for a in args]
        entry = {"module": fn.__module__, "name": fn.__name__, "types": types, "options": options}
        variants[json.dumps(entry, sort_keys=True)] = entry
        original(kernel, grid, args, options)

    _bn_launch.LAUNCH = record
    try:
        _calls()
    finally:
        _bn_launch.LAUNCH = original
    return list(variants.values())


def _calls() -> None:
    torch.manual_seed(0)
    shapes = [((2, 3, 4, 4), False), ((3, 5, 3, 3), False), ((2, 4, 3, 3), True), ((9, 12), False)]
    for dtype in (torch.float32, torch.bfloat16):  # float16 compiles as bfloat16 does (a 16-bit load and convert)
        for shape, channels_last in shapes:
            c = shape[1]
            x = torch.randn(shape, device=DEVICE).to(dtype)
            x = x.to(memory_format=torch.channels_last) if channels_last else x
            for act in (None, "relu", "silu"):
                for residual in (None, torch.randn_like(x)):
                    w = torch.rand(c, device=DEVICE, requires_grad=True)
                    b = torch.rand(c, device=DEVICE, requires_grad=True)
                    xi = x.clone().requires_grad_()
                    ri = residual.clone().requires_grad_() if residual is not None else None
                    rm, rv = torch.zeros(c, device=DEVICE), torch.ones(c, device=DEVICE)
                    counter = torch.zeros((), dtype=torch.long, device=DEVICE)
                    y = kernels.batch_norm_train(xi, w, b, 1e-5, activation=act, residual=ri, running_mean=rm,
                                                 running_var=rv, num_batches_tracked=counter)[0]
                    y.sum().backward()
                    y = kernels.batch_norm_train(xi, None, None, 1e-5, activation=act, residual=ri)[0]
                    y.sum().backward()
                    y = kernels.batch_norm_eval(xi, rm, rv, w, b, 1e-5, activation=act, residual=ri)
                    y.sum().backward()
                    y = kernels.batch_norm_eval(xi, rm, rv, w.detach(), None, 1e-5, activation=act, residual=ri)
                    y.sum().backward()
    x = torch.randn(4, 3, device=DEVICE)
    F.batch_norm(x, torch.zeros(3, device=DEVICE), torch.ones(3, device=DEVICE), training=True, nonfinite="propagate",
                 running_var_mode="biased", backend="triton")


COMPILE = textwrap.dedent("""
    import importlib, json, sys
    from concurrent.futures import ProcessPoolExecutor

    def compile_one(entry):
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn = getattr(importlib.import_module(entry["module"]), entry["name"])
        options = dict(entry["options"])
        num_warps = options.pop("num_warps", 4)
        types = iter(entry["types"])
        signature, constexprs = {}, {}
        for param in fn.params:
            if param.is_constexpr:
                signature[param.name] = "constexpr"
                constexprs[param.name] = options[param.name]
            else:
                signature[param.name] = next(types)
        try:
            triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "enable_fp_fusion": True})
        except Exception as error:
            return f"{entry['name']} {entry['options']} {entry['types']}: {type(error).__name__}: {str(error)[-600:]}"
        return None

    if __name__ == "__main__":
        with ProcessPoolExecutor(2) as pool:
            failures = [f for f in pool.map(compile_one, json.load(open(sys.argv[1]))) if f]
        print(json.dumps(failures))
""")


def test_every_launched_variant_compiles_for_sm90(tmp_path):
    from normkit.kernels import _bn_tiling

    if not _bn_tiling.INTERPRET:
        pytest.skip("on a GPU the kernel tests compile every variant for the real device already")
    ptxas = os.path.join(os.path.dirname(__import__("triton").__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"triton's bundled ptxas is missing ({ptxas})")
    variants = _record_launches()
    names = {v["name"] for v in variants}
    assert names == {"moments_planes", "moments_rows", "normalize", "grad_sums_planes", "grad_sums_rows",
                     "grad_input"}, names
    assert any(v["options"].get("EVEN") for v in variants) and any(v["options"].get("EVEN") is False
                                                                     for v in variants)
    path = tmp_path / "variants.json"
    path.write_text(json.dumps(variants))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    script = tmp_path / "compile_variants.py"
    script.write_text(COMPILE)
    result = subprocess.run([sys.executable, str(script), str(path)], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures)
