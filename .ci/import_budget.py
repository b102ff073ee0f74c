"""``import normkit`` stays light: no heavy optional module loaded, and a bounded import time.

Run with the interpreter of the environment under test (an installed wheel, not the checkout)::

    python .ci/import_budget.py [--budget-s 0.5] [--repeats 5]

Each measurement is a fresh interpreter that imports torch first, then normkit, and reports the seconds each
took (``time.perf_counter``) and which of the forbidden modules ended up in ``sys.modules``. The check passes
when no run loaded a forbidden module and the fastest run's normkit share (the import time on top of torch's,
which normkit cannot change) is within the budget; the fastest, because on a shared machine the noise only ever
adds time. Exit status 0 on pass, 1 on a failure (each explained), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# Modules that normkit uses only on demand: the Triton kernels, the plots, the Lightning callbacks, the datasets
# and the Keras conversion tests. Any of them at import time costs seconds and a heavy dependency.
FORBIDDEN = ("triton", "matplotlib", "lightning", "pytorch_lightning", "sklearn", "keras")

PROBE = """
import importlib.util, json, sys, time
names = json.loads(sys.argv[1])
start = time.perf_counter()
import torch
after_torch = time.perf_counter()
import normkit
end = time.perf_counter()
print(json.dumps({"torch_s": after_torch - start, "normkit_s": end - after_torch, "file": normkit.__file__,
                  "forbidden": sorted({name.split(".")[0] for name in sys.modules} & set(names)),
                  "installed": [name for name in names if importlib.util.find_spec(name) is not None]}))
"""


def measure(python: str) -> dict:
    """One fresh interpreter's import times and the forbidden modules it loaded."""
    result = subprocess.run([python, "-c", PROBE, json.dumps(FORBIDDEN)], capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise SystemExit(f"import_budget: `import normkit` failed in {python} (exit {result.returncode}):\n"
                         f"{result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=0.5,
                        help="most seconds `import normkit` may add to `import torch` (fastest run; default 0.5)")
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters to time (default 5)")
    parser.add_argument("--python", default=sys.executable, help="interpreter to check (default: this one)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.budget_s <= 0:
        parser.error(f"expected --repeats >= 1 and --budget-s > 0, got --repeats {args.repeats} and "
                     f"--budget-s {args.budget_s}")

    runs = [measure(args.python) for _ in range(args.repeats)]
    fastest = min(runs, key=lambda run: run["normkit_s"])
    loaded = sorted({name for run in runs for name in run["forbidden"]})
    print(f"import_budget: normkit from {fastest['file']}")
    print(f"import_budget: installed here of the forbidden modules: {', '.join(runs[0]['installed']) or 'none'}")
    print("import_budget: import torch " + " ".join(f"{run['torch_s']:.2f}" for run in runs) + " s; then import "
          "normkit " + " ".join(f"{run['normkit_s']:.2f}" for run in runs) + f" s (budget {args.budget_s:.2f} s)")

    failures = []
    if loaded:
        failures.append(f"`import normkit` loaded {', '.join(loaded)}; expected none of {', '.join(FORBIDDEN)}. "
                        "Import it inside the function that needs it (python -X importtime -c 'import normkit' "
                        "shows who imports it).")
    if fastest["normkit_s"] > args.budget_s:
        failures.append(f"`import normkit` took {fastest['normkit_s']:.2f} s on top of torch in the fastest of "
                        f"{args.repeats} runs; expected at most {args.budget_s:.2f} s. Find the slow import with "
                        "python -X importtime -c 'import normkit' and make it lazy.")
    for failure in failures:
        print(f"import_budget: FAIL: {failure}", file=sys.stderr)
    if not failures:
        print("import_budget: ok")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
