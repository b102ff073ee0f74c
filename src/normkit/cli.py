"""The ``normkit`` command: ``normkit demo``, ``normkit experiment NAME``, ``normkit doctor TARGET``, ``--version``."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from . import __version__
from ._cli_paths import OutputPathError, prepare_dir, prepare_file
from .diagnostics._doctor import RULES
from .diagnostics._report import SEVERITIES


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


class UserError(Exception):
    """A mistake in what the user asked for (a flag, a TARGET, an output path): exit 2, one line, no traceback.

    Args:
        message: what was expected, what came, and the fix.
        command: the command it belongs to (``"normkit doctor"``), when known where it is raised.
    """

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors raised as :class:`UserError` (one line naming the fix) instead of exiting."""

    def error(self, message: str):
        raise UserError(f"{message}; see '{self.prog} --help'", command=self.prog)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``normkit`` command."""
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help="show the traceback of a failure (user errors included)")
    parser = _Parser(
        prog="normkit",
        parents=[debug],
        epilog="Exit status: 0 success, 1 error-severity findings (normkit doctor), 2 a user error (bad flag, "
        "TARGET or output path; one line on stderr), 3 an internal error (a bug in normkit: please report it with "
        "the --debug traceback).",
        description="Batch normalization and its family for PyTorch: exact, fast, hard to misuse.",
    )
    parser.add_argument("--version", action="version", version=f"normkit {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo", parents=[debug],
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
        "doctor", parents=[debug],
        help="check a model for the classic batch-norm mistakes (exit 1 when an error is found)",
        description="Check a model for the classic batch-norm mistakes: static rules on the module tree and, with "
        "--input-shape, dynamic rules from one forward pass on a copy (the model is never changed). Exit status: "
        "0 no error-severity finding, 1 at least one (after --rule), 2 a user error (bad flag, TARGET that cannot "
        "be loaded), 3 an internal error.",
    )
    doctor.add_argument(
        "target", metavar="TARGET",
        help="path/to/file.py:factory or package.module:factory (a callable returning the model), or a checkpoint "
        "of a full model saved with torch.save(model, path) (needs --unsafe-load)",
    )
    doctor.add_argument("--unsafe-load", action="store_true",
                        help="load a checkpoint holding a pickled model with torch.load(weights_only=False), which "
                        "runs any code embedded in the file: only for files you trust (default: weights_only=True, "
                        "which refuses pickled objects)")
    doctor.add_argument("--input-shape", type=_shape, metavar="N,C,...",
                        help="shape of a random example input, e.g. 8,3,32,32 (enables the dynamic rules)")
    doctor.add_argument("--mode", choices=("train", "inference"),
                        help="what the model is checked for (default: its own training flag)")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    doctor.add_argument("--min-severity", choices=SEVERITIES, default="info",
                        help="leave out findings below this severity (default: info, everything)")
    doctor.add_argument("--rule", action="append", choices=sorted(RULES), metavar="RULE", dest="rules",
                        help="report only this rule (repeatable); the exit status follows what is reported. Rules: "
                        + ", ".join(sorted(RULES)))
    doctor.add_argument("--summary", action="store_true",
                        help="one line per rule that fired (severity, rule, count, layers) and the verdict")
    doctor.set_defaults(handler=_doctor)

    from .experiments._harness import EXPERIMENTS, MIN_SEEDS

    experiment = commands.add_parser(
        "experiment", parents=[debug],
        help="rerun one of the article's claims on real data (or 'all'): JSON, PNG and markdown per experiment",
        description="Run one experiment (or all of them) over several seeds and write NAME.json (every number and "
        "the exact configuration), NAME.png and NAME.md into --out. Experiments: " + ", ".join(EXPERIMENTS) + ".",
    )
    experiment.add_argument("name", metavar="NAME", choices=(*EXPERIMENTS, "all"),
                            help="one of " + ", ".join(EXPERIMENTS) + ", or all")
    experiment.add_argument("--quick", action="store_true", help="tiny step counts and sweeps (seconds, for CI)")
    experiment.add_argument("--seeds", type=_positive_int, default=None,
                            help=f"seeds per arm (default: each experiment's own, {MIN_SEEDS} or 8 where a seed is "
                                 "cheap); tables show mean ± std and comparisons a 95%% CI over them")
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


def _doctor(args: argparse.Namespace) -> int:
    import warnings

    import torch

    from .diagnostics import TargetError, doctor, load_model

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        try:
            model = load_model(args.target, allow_unsafe=args.unsafe_load)
        except TargetError as exc:
            raise UserError(str(exc)) from exc
    for warning in caught:
        print(f"normkit doctor: warning: {warning.message}", file=sys.stderr)
    example = None
    if args.input_shape is not None:
        reference = next(iter((*model.parameters(), *model.buffers())), None)
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else torch.float32
        device = reference.device if reference is not None else "cpu"
        example = torch.randn(args.input_shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    report = doctor(model, example, mode=args.mode).filter(min_severity=args.min_severity, rules=args.rules)
    if args.json:
        print(report.to_json())
    elif args.summary:
        print(_summary_lines(report))
    else:
        from rich.console import Console

        report.render(Console())
    return 0 if report.ok else 1


def _summary_lines(report) -> str:
    """One line per (severity, rule) that fired, worst first, then the verdict."""
    groups: dict[tuple[str, str], list[str]] = {}
    for finding in report.findings:
        groups.setdefault((finding.severity, finding.rule), []).append(finding.module or "(root)")
    lines = []
    for (severity, rule), modules in groups.items():
        shown = ", ".join(modules[:3]) + (f" (+{len(modules) - 3})" if len(modules) > 3 else "")
        lines.append(f"{severity:7} {rule}: {len(modules)} finding(s): {shown}")
    return "\n".join([*lines, report.summary()])


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiments.demo import ARMS, LABELS, run_demo
    from .experiments.demo_plot import plot_demo

    out = _checked(prepare_dir, args.out, "--out")
    json_path = _checked(prepare_file, args.json, "--json") if args.json is not None else out / "normkit-demo.json"
    _checked(prepare_file, json_path, "--out")
    _checked(prepare_file, out / "normkit-demo.png", "--out")
    console = Console()
    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks = {arm: bar.add_task(LABELS[arm], total=args.steps) for arm in ARMS}
        result = run_demo(
            steps=args.steps, seed=args.seed, dataset=args.dataset,
            progress=lambda arm, step, total: bar.update(tasks[arm], completed=step, total=total),
        )
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    png_path = plot_demo(result, out / "normkit-demo.png")
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

    _checked(prepare_dir, args.out, "--out")
    if args.report is not None:
        _checked(prepare_file, args.report, "--report")
    console = Console()
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    seeds = None if args.seeds is None else tuple(range(args.first_seed, args.first_seed + args.seeds))
    if args.seeds is not None and args.seeds < 3 and not args.quick:
        console.print(f"note: {args.seeds} seed(s); conclusions need at least 3 (--seeds 3).", style="yellow")
    columns = (TextColumn("{task.description:>28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    results, start = [], time.perf_counter()
    for name in names:
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            def progress(description: str, total: int, _bar=bar, _name=name):
                task = _bar.add_task(f"{_name}: {description}", total=total)
                return lambda done: _bar.update(task, completed=done)

            result = run_experiment(name, Settings(quick=args.quick, seeds=seeds, first_seed=args.first_seed,
                                                   progress=progress))
        paths = write(result, args.out)
        results.append(result)
        console.print(Markdown(paths["md"].read_text()))
        console.print(f"wrote {paths['json']}, {paths['png']}, {paths['md']}", style="dim")
    if args.report is not None:
        report(results, args.out, args.report, time.perf_counter() - start)
        console.print(f"wrote {args.report}", style="dim")
    return 0


def _checked(prepare, path: Path, flag: str) -> Path:
    try:
        return prepare(path, flag)
    except OutputPathError as exc:
        raise UserError(str(exc)) from exc


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``normkit`` command.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 1 when ``normkit doctor`` finds an error-severity problem, 2 for a user error
        (a bad flag, a TARGET that cannot be loaded, an output path that cannot be written: one line on stderr, the
        traceback with ``--debug``), 3 for an internal error (a bug: one line, the traceback with ``--debug``), 130
        when interrupted.
    """
    arguments = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in arguments
    parser = build_parser()
    command = "normkit"
    try:
        args = parser.parse_args(arguments)
        command = f"normkit {args.command}"
        return args.handler(args)
    except SystemExit as exit_:  # --help and --version
        return exit_.code if isinstance(exit_.code, int) else 0 if exit_.code is None else 2
    except KeyboardInterrupt:
        print(f"{command}: interrupted", file=sys.stderr)
        return 130
    except UserError as exc:
        if debug:
            traceback.print_exc()
        print(f"{exc.command or command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            traceback.print_exc()
        print(f"{command}: internal error: {type(exc).__name__}: {exc} (a bug in normkit; rerun with --debug for "
              "the traceback and report it)", file=sys.stderr)
        return 3
