"""BatchNorm on CPU: normkit vs torch eager, side by side; and each pass's candidate implementations.

    python benchmarks/bench_batchnorm.py            # end to end, markdown rows for BENCHMARKS.md
    python benchmarks/bench_batchnorm.py --passes   # composition vs ATen statistics per plan row (CPU_PLAN)
    python benchmarks/bench_batchnorm.py --guard    # the default non-finite guard's cost (skip vs propagate)
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import normkit
import normkit.functional as F
from normkit.functional import _dispatch

from runner import interleaved, machine, paired, today

SHAPES = [
    ((32, 64, 56, 56), "nchw"),
    ((32, 64, 56, 56), "channels_last"),
    ((32, 256, 14, 14), "nchw"),
    ((32, 256, 14, 14), "channels_last"),
    ((32, 512, 7, 7), "nchw"),
    ((256, 1024), "-"),
    ((8, 128, 32), "nlc"),
]
# --passes also measures 28x28 planes, the size between the composition's threshold and the planes it loses on
PASS_SHAPES = [*SHAPES[:2], ((32, 128, 28, 28), "nchw"), *SHAPES[2:]]
COMMAND = "python benchmarks/bench_batchnorm.py"


def make_input(shape, layout, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 2 + 1).to(dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    if layout == "nlc":  # (N, C, L) stored as (N, L, C): BatchNorm1d on a transformer-style sequence
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    return x


def module_pair(channels, rank):
    name = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}[rank]
    ours, theirs = getattr(normkit, name)(channels), getattr(torch.nn, name)(channels)
    theirs.load_state_dict(ours.state_dict())
    return ours, theirs


def end_to_end(rounds, repeat):
    """Every shape and pass, ``repeat`` times over; the table reports medians over the repeats and their range."""
    results: dict[tuple[str, str, str], list] = {}
    for attempt in range(repeat):
        for shape, layout in SHAPES:
            x = make_input(shape, layout)
            ours, theirs = module_pair(shape[1], len(shape))
            upstream = torch.randn_like(x)
            for pass_name in ("train fwd", "train fwd+bwd", "eval fwd"):
                train = pass_name != "eval fwd"
                ours.train(train)
                theirs.train(train)
                backward = pass_name.endswith("bwd")

                def call(module, backward=backward):
                    if not backward:
                        with torch.no_grad():
                            return module(x)
                    xi = x.detach().requires_grad_()
                    return torch.autograd.grad(module(xi), (xi, module.weight, module.bias), upstream)

                r = paired(lambda m=theirs: call(m), lambda m=ours: call(m), rounds=rounds)
                key = (pass_name, "x".join(map(str, shape)), layout)
                results.setdefault(key, []).append(r)
                print(f"  [{attempt + 1}/{repeat}] {pass_name:14s} {key[1]:>14s} {layout:13s} torch "
                      f"{r.baseline_ms:7.2f} ms  normkit {r.candidate_ms:7.2f} ms  {r.speedup:.2f}x", file=sys.stderr)
    print("\n| op | shape | layout | dtype | torch ms | normkit ms | speed-up | range over runs | machine | date | "
          "command |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (pass_name, shape, layout), runs in results.items():
        speedups = sorted(r.speedup for r in runs)
        print(f"| bn {pass_name} | {shape} | {layout} | fp32 | {statistics.median(r.baseline_ms for r in runs):.2f} | "
              f"{statistics.median(r.candidate_ms for r in runs):.2f} | {statistics.median(speedups):.2f}x | "
              f"{speedups[0]:.2f}-{speedups[-1]:.2f}x | {machine()} | {today()} | `{COMMAND} --repeat {repeat}` |")


def pass_candidates(rounds, repeat=1):
    """For every contiguous-planes shape, normkit's composition against ATen's kernel for the training statistics,
    each behind the same front (the CPU_PLAN evidence); the backward is ATen's either way. One row per shape, pass
    and repeat."""
    print("\n| plan row | pass | shape | compose ms | aten ms | compose speed-up | plan | machine | date |")
    print("|---|---|---|---|---|---|---|---|---|")
    for shape, layout in [case for _ in range(repeat) for case in PASS_SHAPES]:
        x = make_input(shape, layout)
        kind = _dispatch.plan_kind(x)
        if kind == "rows":
            continue  # channels innermost: the composition takes contiguous planes only
        channels = shape[1]
        w, b = torch.rand(channels) + 0.5, torch.randn(channels)
        upstream = torch.randn_like(x)
        rm, rv = torch.zeros(channels), torch.ones(channels)

        def forward():
            with torch.no_grad():
                return F.batch_norm(x, rm, rv, w, b, training=True)

        def forward_backward():
            xi = x.detach().requires_grad_()
            return torch.autograd.grad(F.batch_norm(xi, rm, rv, w, b, training=True), xi, upstream)

        for pass_name, call in (("train fwd", forward), ("train fwd+bwd", forward_backward)):
            r = paired(_with_plan(kind, "aten", call), _with_plan(kind, "compose", call), rounds=rounds)
            print(f"| {kind} | {pass_name} | {'x'.join(map(str, shape))} ({layout}) | {r.candidate_ms:.2f} | "
                  f"{r.baseline_ms:.2f} | {r.speedup:.2f}x | {_dispatch.CPU_PLAN[kind]} | {machine()} | {today()} |")


def guard_cost(rounds):
    """What the default non-finite guard costs: torch's module, normkit's with ``nonfinite="skip"`` (the default) and
    with ``"propagate"`` (torch's semantics, no guard), training forward under no_grad, interleaved in one run."""
    print("\n| shape | layout | skip / torch | propagate / torch | machine | date | command |")
    print("|---|---|---|---|---|---|---|")
    for shape, layout in SHAPES:
        x = make_input(shape, layout)
        skip, theirs = module_pair(shape[1], len(shape))
        propagate, _ = module_pair(shape[1], len(shape))
        propagate.nonfinite = "propagate"

        def forward(module):
            def run():
                with torch.no_grad():
                    return module(x)
            return run

        timing = interleaved({"torch": forward(theirs), "skip": forward(skip), "propagate": forward(propagate)},
                             rounds=rounds, sample_ms=20.0)
        print(f"| {'x'.join(map(str, shape))} | {layout} | {timing.ratio('skip', 'torch'):.3f}x | "
              f"{timing.ratio('propagate', 'torch'):.3f}x | {machine()} | {today()} | `{COMMAND} --guard` |",
              flush=True)


def compiled_candidate(rounds):
    """Would a compiled CPU kernel be worth it? torch.compile's (Inductor C++) training forward against normkit's."""
    import torch.nn.functional as F

    print("\n| op | shape | layout | inductor ms | normkit ms | normkit speed-up | machine | date |")
    print("|---|---|---|---|---|---|---|---|")
    for shape, layout in SHAPES[:4]:
        x = make_input(shape, layout)
        ours, _ = module_pair(shape[1], len(shape))
        channels = shape[1]
        rm, rv, w, b = torch.zeros(channels), torch.ones(channels), torch.ones(channels), torch.zeros(channels)
        compiled = torch.compile(lambda t: F.batch_norm(t, rm, rv, w, b, True, 0.1, 1e-5))
        with torch.no_grad():
            compiled(x)  # compile outside the timing
            r = paired(lambda: compiled(x), lambda: ours(x), rounds=rounds)
        print(f"| bn train fwd | {'x'.join(map(str, shape))} | {layout} | {r.baseline_ms:.2f} | {r.candidate_ms:.2f} | "
              f"{r.speedup:.2f}x | {machine()} | {today()} |")


def _with_plan(kind, impl, call):
    def run():
        saved = _dispatch.CPU_PLAN[kind]
        _dispatch.CPU_PLAN[kind] = impl
        try:
            return call()
        finally:
            _dispatch.CPU_PLAN[kind] = saved

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", action="store_true", help="compare each pass's candidate implementations")
    parser.add_argument("--compiled", action="store_true", help="compare against torch.compile's CPU kernel")
    parser.add_argument("--guard", action="store_true", help="the cost of the default non-finite guard")
    parser.add_argument("--rounds", type=int, default=21, help="timed rounds per measurement (median reported)")
    parser.add_argument("--repeat", type=int, default=3, help="times the whole end-to-end suite runs")
    args = parser.parse_args(argv)
    if args.guard:
        guard_cost(args.rounds)
    elif args.compiled:
        compiled_candidate(args.rounds)
    elif args.passes:
        pass_candidates(args.rounds, args.repeat)
    else:
        end_to_end(args.rounds, args.repeat)


if __name__ == "__main__":
    main()
