"""Runs one experiment over its seeds and writes ``NAME.json``, ``NAME.png`` and ``NAME.md``.

An experiment is a module in this package with:

- ``NAME`` (the command's name), ``TITLE`` (a few words) and ``CLAIM`` (what the article claims, one sentence);
- optionally ``SEEDS``: how many seeds it runs by default (:data:`MIN_SEEDS` if absent; 8 where a seed is cheap);
- ``run(settings) -> dict``: plain, JSON-serializable data with ``config`` (everything needed to rerun it),
  ``table`` (``{"columns": [...], "rows": [[...], ...]}``, mean ± std over the seeds), ``measured`` (one sentence
  computed from the numbers, whichever way they went) and any raw numbers (per seed) under other keys;
- ``plot(result, path)``: one figure that carries one message, saved as PNG.

The harness adds the schema, the claim, the seeds, the command, the machine and the elapsed time.
"""

from __future__ import annotations

import importlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import ModuleType

import torch

from ._training import one_thread

SCHEMA = "normkit.experiment/1"
EXPERIMENTS = ("convergence", "learning-rate", "initialization", "batch-size", "train-eval-gap", "transfer",
               "placement", "dropout-order")
MIN_SEEDS = 3

ProgressFactory = Callable[[str, int], Callable[[int], None]]


def _no_progress(_description: str, _total: int) -> Callable[[int], None]:
    return lambda _done: None


@dataclass(frozen=True)
class Settings:
    """How to run an experiment.

    Args:
        quick: tiny step counts and sweeps (seconds; for CI), not for conclusions.
        seeds: the seeds; every arm runs once per seed and tables report mean ± std over them. ``None``: the
            experiment's own default count (its ``SEEDS``), starting at ``first_seed``.
        first_seed: the first seed when ``seeds`` is ``None``.
        progress: ``progress(description, total)`` returns ``advance(done)``; drives a progress bar.
    """

    quick: bool = False
    seeds: tuple[int, ...] | None = None
    first_seed: int = 0
    progress: ProgressFactory = field(default=_no_progress, compare=False)


def module_for(name: str) -> ModuleType:
    """The module of experiment ``name`` (imported on demand)."""
    if name not in EXPERIMENTS:
        import difflib

        close = difflib.get_close_matches(name, EXPERIMENTS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown experiment {name!r}; expected one of {', '.join(EXPERIMENTS)} (or 'all').{hint}")
    return importlib.import_module(f"{__package__}.{name.replace('-', '_')}")


def machine() -> dict:
    """The machine the numbers come from."""
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def default_seeds(name: str) -> int:
    """How many seeds experiment ``name`` runs by default (``"all"``: each its own)."""
    return getattr(module_for(name), "SEEDS", MIN_SEEDS)


def resolved(name: str, settings: Settings) -> Settings:
    """``settings`` with its seeds filled in from the experiment's default when ``None``."""
    if settings.seeds is not None:
        return settings
    return replace(settings, seeds=tuple(range(settings.first_seed, settings.first_seed + default_seeds(name))))


def command(name: str, settings: Settings) -> str:
    """The ``normkit experiment`` command line that reruns these settings (``--seeds`` only when they differ from
    the experiment's default)."""
    parts = ["normkit", "experiment", name]
    seeds = settings.seeds
    if seeds is not None and (name == "all" or len(seeds) != default_seeds(name)):
        parts += ["--seeds", str(len(seeds))]
    first = settings.first_seed if seeds is None else seeds[0]
    if first != 0:
        parts += ["--first-seed", str(first)]
    if settings.quick:
        parts.append("--quick")
    return " ".join(parts)


def run_experiment(name: str, settings: Settings = Settings()) -> dict:
    """Run experiment ``name`` and return its result, with the harness's keys added.

    Raises:
        ValueError: an unknown name, or fewer than one seed.
    """
    module = module_for(name)
    settings = resolved(name, settings)
    if not settings.seeds:
        raise ValueError(f"experiment {name}: expected at least one seed, got none. Pass e.g. --seeds 3.")
    start = time.perf_counter()
    with one_thread():
        result = module.run(settings)
        info = machine()
    for key in ("config", "table", "measured"):
        if key not in result:
            raise KeyError(f"experiment {name}: run() returned no {key!r}; the harness needs config, table, measured")
    return {"schema": SCHEMA, "name": name, "title": module.TITLE, "claim": module.CLAIM, "quick": settings.quick,
            "seeds": list(settings.seeds), "command": command(name, settings), **result,
            "elapsed_s": round(time.perf_counter() - start, 2), "machine": info,
            "date": time.strftime("%Y-%m-%d")}


def markdown(result: dict, image: str | None = None) -> str:
    """The experiment's markdown section: title, claim, measured, table, figure, command and machine."""
    table = result["table"]
    lines = [f"## {result['name']}: {result['title']}", "",
             f"**What the article claims:** {result['claim']}", "",
             f"**What we measured:** {result['measured']}", "",
             "| " + " | ".join(table["columns"]) + " |", "|" + "---|" * len(table["columns"])]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in table["rows"]]
    lines.append("")
    if table.get("note"):
        lines += [table["note"], ""]
    if image is not None:
        lines += [f"![{result['name']}]({image})", ""]
    seeds = ", ".join(map(str, result["seeds"]))
    lines += [f"`{result['command']}` — seeds {seeds}, {result['elapsed_s']:.0f} s on {result['machine']['cpu_count']} "
              f"CPU cores ({result['machine']['torch_threads']} torch threads), torch {result['machine']['torch']}, "
              f"{result['date']}.", ""]
    return "\n".join(lines)


def write(result: dict, out: Path) -> dict[str, Path]:
    """Write ``NAME.json``, ``NAME.png`` and ``NAME.md`` into ``out`` (created if missing); returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    name = result["name"]
    paths = {"json": out / f"{name}.json", "png": out / f"{name}.png", "md": out / f"{name}.md"}
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    module_for(name).plot(result, paths["png"])
    paths["md"].write_text(markdown(result, paths["png"].name))
    return paths


METHOD = ("**How to read the numbers.** Tables give mean ± standard deviation over the seeds. Every choice (a "
          "learning rate per arm, an optimizer, a step count) is made on a validation part held out from the "
          "training data (each JSON's `\"validation\"` key says which); the test part only reports. A comparison is "
          "the mean of the per-seed paired differences with its 95 % confidence interval (Student t): an arm wins "
          "only when the interval excludes zero; otherwise we write \"no difference detected\", which with a few "
          "seeds is not evidence of no effect. The runs use one torch thread and fixed seeds, so a rerun on the same "
          "machine gives the same numbers; on another CPU the floating-point reductions differ in the last bits, "
          "training amplifies that, and the last printed digit can change (e.g. a ratio 6.5 ± 1.1 became "
          "6.8 ± 0.9): read the confidence intervals, not the third digit.")


def report(results: list[dict], out: Path, path: Path, total_s: float) -> None:
    """The combined report (``docs/RESULTS.md``): a claims-vs-measured overview, then every experiment's section,
    with figure links relative to ``path``."""
    relative = Path(os.path.relpath(out, path.parent))
    first = results[0]
    own_defaults = all(len(r["seeds"]) == default_seeds(r["name"]) for r in results)
    rerun = command("all", Settings(quick=first["quick"], seeds=None if own_defaults else tuple(first["seeds"]),
                                    first_seed=first["seeds"][0]))
    lines = ["# Results: what the article claims, what we measured", ""]
    if first["quick"]:
        lines += ["**Quick run (`--quick`): tiny step counts and sweeps to exercise the code; these numbers support "
                  "no conclusion.**", ""]
    lines += [f"Every number below comes from `{rerun} --out {out} --report {path}` ({total_s / 60:.1f} min in all on "
              f"{first['machine']['cpu_count']} CPU cores, {first['machine']['processor']}, torch "
              f"{first['machine']['torch']}, {first['date']}; seeds per experiment in its section); each figure's "
              "JSON beside it holds every number and the exact configuration.", "", METHOD, "",
              "| experiment | what the article claims | what we measured | time |", "|---|---|---|---|"]
    lines += [f"| [{r['name']}](#{_anchor(r)}) | {r['claim']} | {r['measured']} | {r['elapsed_s']:.0f} s |"
              for r in results]
    lines.append("")
    for r in results:
        lines.append(markdown(r, (relative / f"{r['name']}.png").as_posix()))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))


def _anchor(result: dict) -> str:
    text = f"{result['name']}: {result['title']}".lower()
    return "".join(ch for ch in text.replace(" ", "-") if ch.isalnum() or ch in "-_")
