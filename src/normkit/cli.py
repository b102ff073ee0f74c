"""The ``normkit`` command: ``normkit demo``, ``normkit experiment NAME``, ``normkit doctor TARGET``, ``--version``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from . import __version__


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``normkit`` command."""
    parser = argparse.ArgumentParser(
        prog="normkit",
        description="Batch normalization and its family for PyTorch: exact, fast, hard to misuse.",
    )
    parser.add_argument("--version", action="version", version=f"normkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="the batch-norm paper's MNIST experiment in small: a sigmoid MLP with and without batch norm",
        description="Ioffe & Szegedy's MNIST experiment (2015, Fig. 1) in small: the same MLP with 3 hidden layers "
        "of 100 sigmoid units, trained by SGD on batches of 60 with and without normkit.nn.BatchNorm1d on every "
        "hidden layer (same seed, initial weights, batches and learning rate). Reports test accuracy vs step, the "
        "steps each arm needs to reach a target accuracy and their ratio, and the 15/50/85th percentiles of one "
        "sigmoid's input over training; writes normkit-demo.png and normkit-demo.json to --out.",
    )
    demo.add_argument("--dataset", choices=("digits", "mnist1d"), default="digits",
                      help="scikit-learn's 8x8 digits (default; target 90%%) or MNIST-1D generated locally "
                      "(target 40%%)")
    demo.add_argument("--steps", type=_positive_int, default=None, help="SGD steps per arm (default: 2000)")
    demo.add_argument("--seed", type=int, default=0,
                      help="seed of the weights and batches, and of the digits' split (default: 0)")
    demo.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                      help="directory for normkit-demo.png and normkit-demo.json (default: the current directory)")
    demo.add_argument("--json", type=Path, metavar="PATH",
                      help="write the JSON to PATH instead of DIR/normkit-demo.json (kept for older scripts)")
    demo.set_defaults(handler=_demo)

    doctor = commands.add_parser(
        "doctor",
        help="check a model for the classic batch-norm mistakes (exit 1 when an error is found)",
        description="Check a model for the classic batch-norm mistakes: static rules on the module tree and, with "
        "--input-shape, dynamic rules from one forward pass on a copy (the model is never changed). Exit status: "
        "0 no error-severity finding, 1 at least one, 2 usage error.",
    )
    doctor.add_argument(
        "target", metavar="TARGET",
        help="path/to/file.py:factory or package.module:factory (a callable returning the model), or a checkpoint "
        "of a full model saved with torch.save(model, path)",
    )
    doctor.add_argument("--input-shape", type=_shape, metavar="N,C,...",
                        help="shape of a random example input, e.g. 8,3,32,32 (enables the dynamic rules)")
    doctor.add_argument("--mode", choices=("train", "inference"),
                        help="what the model is checked for (default: its own training flag)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    doctor.set_defaults(handler=_doctor)

    from .experiments._harness import EXPERIMENTS, MIN_SEEDS

    experiment = commands.add_parser(
        "experiment",
        help="rerun one of the article's claims on real data (or 'all'): JSON, PNG and markdown per experiment",
        description="Run one experiment (or all of them) over several seeds and write NAME.json (every number and "
        "the exact configuration), NAME.png and NAME.md into --out. Experiments: " + ", ".join(EXPERIMENTS) + ".",
    )
    experiment.add_argument("name", metavar="NAME", choices=(*EXPERIMENTS, "all"),
                            help="one of " + ", ".join(EXPERIMENTS) + ", or all")
    experiment.add_argument("--quick", action="store_true", help="tiny step counts and sweeps (seconds, for CI)")
    experiment.add_argument("--seeds", type=_positive_int, default=MIN_SEEDS,
                            help=f"seeds per arm (default: {MIN_SEEDS}); tables show mean ± std over them")
    experiment.add_argument("--first-seed", type=int, default=0, help="the first seed (default: 0)")
    experiment.add_argument("--out", type=Path, default=Path("."), metavar="DIR",
                            help="where NAME.json, NAME.png and NAME.md go (default: the current directory)")
    experiment.add_argument("--report", type=Path, metavar="PATH",
                            help="also write one combined markdown report (e.g. docs/RESULTS.md)")
    experiment.set_defaults(handler=_experiment)
    return parser


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.split(","))
    except ValueError:
        shape = ()
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas like 8,3,32,32, got {text!r}")
    return shape


class _UsageError(Exception):
    """A TARGET that cannot be turned into a model."""


def _load_target(target: str):
    import torch

    path = Path(target)
    if path.is_file():
        return _load_checkpoint(path, torch)
    source, colon, name = target.rpartition(":")
    if not colon or not source or not name:
        raise _UsageError(f"TARGET: expected path/to/file.py:factory, package.module:factory or an existing "
                          f"checkpoint file, got {target!r}")
    factory = _import_attribute(source, name)
    if not callable(factory):
        raise _UsageError(f"TARGET: expected {name!r} in {source} to be a callable returning a model, got "
                          f"{type(factory).__name__}")
    try:
        model = factory()
    except Exception as exc:  # the factory's own failure: report it as a bad TARGET, not as findings (exit 1)
        raise _UsageError(f"TARGET: {source}:{name}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, torch.nn.Module):
        raise _UsageError(f"TARGET: expected {source}:{name}() to return an nn.Module, got {type(model).__name__}")
    return model


def _import_attribute(source: str, name: str):
    import importlib
    import importlib.util

    if source.endswith(".py") or Path(source).is_file():
        path = Path(source)
        if not path.is_file():
            raise _UsageError(f"TARGET: expected a Python file, {source!r} does not exist")
        spec = importlib.util.spec_from_file_location(f"_normkit_doctor_target_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.path.insert(0, str(path.resolve().parent))  # so that the file can import its neighbours
        try:
            spec.loader.exec_module(module)
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        added = str(Path.cwd()) not in sys.path
        if added:  # as `python -m` does, so that the console script finds modules in the working directory
            sys.path.insert(0, str(Path.cwd()))
        try:
            module = importlib.import_module(source)
        except ImportError as exc:
            raise _UsageError(
                f"TARGET: expected an importable module {source!r}, got {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            if added:
                sys.path.remove(str(Path.cwd()))
    if not hasattr(module, name):
        raise _UsageError(f"TARGET: expected {source} to define {name!r}; it does not")
    return getattr(module, name)


def _load_checkpoint(path: Path, torch):
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a full-model pickle is refused by weights_only=True; retry as trusted
        print(f"warning: {path} is not loadable with weights_only=True (a full-model pickle); loading it with "
              "weights_only=False, which runs code from the file: only do this for files you trust", file=sys.stderr)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # anything torch.load raises is a bad TARGET
            raise _UsageError(
                f"TARGET: expected a torch checkpoint, {path} raised {type(exc).__name__}: {exc}"
            ) from exc
    if not isinstance(loaded, torch.nn.Module):
        raise _UsageError(f"TARGET: expected {path} to hold a full model (torch.save(model, path)), got "
                          f"{type(loaded).__name__} (a state_dict needs its model: pass file.py:factory instead)")
    return loaded


def _doctor(args: argparse.Namespace) -> int:
    import torch

    from .diagnostics import doctor

    try:
        model = _load_target(args.target)
    except _UsageError as exc:
        print(f"usage: normkit doctor TARGET [--input-shape N,C,...] [--mode train|inference] [--json]\n"
              f"normkit doctor: error: {exc}", file=sys.stderr)
        return 2
    example = None
    if args.input_shape is not None:
        reference = next(iter((*model.parameters(), *model.buffers())), None)
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
        device = reference.device if reference is not None else "cpu"
        example = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    report = doctor(model, example, mode=args.mode)
    if args.json:
        print(report.to_json())
    else:
        from rich.console import Console

        report.render(Console())
    return 0 if report.ok else 1


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiments.demo import ARMS, LABELS, run_demo
    from .experiments.demo_plot import plot_demo

    console = Console()
    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks = {arm: bar.add_task(LABELS[arm], total=args.steps) for arm in ARMS}
        result = run_demo(
            steps=args.steps, seed=args.seed, dataset=args.dataset,
            progress=lambda arm, step, total: bar.update(tasks[arm], completed=step, total=total),
        )
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.json if args.json is not None else args.out / "normkit-demo.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = plot_demo(result, args.out / "normkit-demo.png")
    console.print(_table(result))
    console.print(result["conclusion"])
    console.print(f"wrote {png_path} and {json_path} (curves, percentiles and the exact configuration)", style="dim")
    return 0


def _table(result: dict):
    from rich.table import Table

    config = result["config"]
    table = Table(
        title=f"{config['model'].split(',')[0]} sigmoid, SGD lr={config['lr']:g}, batch {config['batch_size']}, "
        f"{config['steps']} steps, seed {config['seed']}",
        caption=f"{config['dataset']}: {config['train_size']} train / {config['test_size']} test; same init, batches "
        f"and lr for both arms; {result['elapsed_s']:.1f} s",
    )
    table.add_column("arm")
    table.add_column("final test accuracy", justify="right")
    table.add_column("best", justify="right")
    table.add_column(f"steps to {config['target']:.0%}", justify="right")
    table.add_column("ratio (no BN / BN)", justify="right")
    for arm, ratio in (("plain", "baseline"), ("batchnorm", _ratio_text(result))):
        data = result["arms"][arm]
        reached = data["steps_to_target"]
        steps_text = str(reached) if reached is not None else f"not within {config['steps']}"
        table.add_row(data["label"], f"{data['final_accuracy']:.3f}", f"{data['best_accuracy']:.3f}", steps_text,
                      ratio)
    return table


def _ratio_text(result: dict) -> str:
    if result["ratio"] is not None:
        return f"{result['ratio']:.1f}x"
    if result["ratio_lower_bound"] is not None:
        return f"> {result['ratio_lower_bound']:.1f}x (lower bound)"
    return "n/a (BN never reached it)"


def _experiment(args: argparse.Namespace) -> int:
    import time

    from rich.console import Console
    from rich.markdown import Markdown
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiments._harness import EXPERIMENTS, Settings, report, run_experiment, write

    console = Console()
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    seeds = tuple(range(args.first_seed, args.first_seed + args.seeds))
    if args.seeds < 3 and not args.quick:
        console.print(f"note: {args.seeds} seed(s); conclusions need at least 3 (--seeds 3).", style="yellow")
    columns = (TextColumn("{task.description:>28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results, start = [], time.perf_counter()
    for name in names:
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            def progress(description: str, total: int, _bar=bar, _name=name):
                task = _bar.add_task(f"{_name}: {description}", total=total)
                return lambda done: _bar.update(task, completed=done)

            result = run_experiment(name, Settings(quick=args.quick, seeds=seeds, progress=progress))
        paths = write(result, args.out)
        results.append(result)
        console.print(Markdown(paths["md"].read_text()))
        console.print(f"wrote {paths['json']}, {paths['png']}, {paths['md']}", style="dim")
    if args.report is not None:
        report(results, args.out, args.report, time.perf_counter() - start)
        console.print(f"wrote {args.report}", style="dim")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``normkit`` command.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 1 when ``normkit doctor`` finds an error-severity problem, 2 for a usage
        error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    return args.handler(args)
