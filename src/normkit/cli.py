"""The ``normkit`` command: ``normkit demo`` and ``normkit --version``."""

from __future__ import annotations

import argparse
import json
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
        help="train the same sigmoid MLP with and without batch norm on the digits and compare the steps",
        description="Train the same sigmoid MLP (64-100-100-100-10) on scikit-learn's 8x8 digits with and without "
        "normkit.nn.BatchNorm1d, same seed, batches and learning rate, and report the steps to a target test "
        "accuracy.",
    )
    demo.add_argument("--steps", type=_positive_int, default=600, help="SGD steps per arm (default: 600)")
    demo.add_argument("--seed", type=int, default=0, help="seed of the split, weights and batches (default: 0)")
    demo.add_argument("--json", type=Path, metavar="PATH", help="also write the full result as JSON to PATH")
    demo.set_defaults(handler=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from .experiments.demo import ARMS, LABELS, conclusion, run_demo

    console = Console()
    columns = (TextColumn("{task.description:>10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        tasks = {arm: bar.add_task(LABELS[arm], total=args.steps) for arm in ARMS}
        result = run_demo(
            steps=args.steps, seed=args.seed, progress=lambda arm, step, _: bar.update(tasks[arm], completed=step)
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    console.print(_table(result))
    console.print(conclusion(result))
    if args.json is not None:
        console.print(f"Full result (curves included) written to {args.json}.", style="dim")
    return 0


def _table(result: dict):
    from rich.table import Table

    config = result["config"]
    table = Table(
        title=f"{config['model']}, SGD lr={config['lr']:g}, batch {config['batch_size']}, {config['steps']} steps, "
        f"seed {config['seed']}",
        caption=f"digits: {config['train_size']} train / {config['test_size']} test, same init, batches and lr "
        f"for both arms; {result['elapsed_s']:.1f} s",
    )
    table.add_column("arm")
    table.add_column("final test accuracy", justify="right")
    table.add_column(f"steps to {config['target']:.0%}", justify="right")
    table.add_column("ratio (no BN / BN)", justify="right")
    for arm, ratio in (("plain", "baseline"), ("batchnorm", _ratio_text(result))):
        data = result["arms"][arm]
        reached = data["steps_to_target"]
        steps_text = str(reached) if reached is not None else f"not within {config['steps']}"
        table.add_row(data["label"], f"{data['final_accuracy']:.3f}", steps_text, ratio)
    return table


def _ratio_text(result: dict) -> str:
    if result["ratio"] is not None:
        return f"{result['ratio']:.1f}x"
    if result["ratio_lower_bound"] is not None:
        return f"> {result['ratio_lower_bound']:.0f}x"
    return "n/a"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``normkit`` command.

    Args:
        argv: the arguments after the program name; ``None`` reads ``sys.argv``.

    Returns:
        The exit status: 0 on success, 2 for a usage error.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    return args.handler(args)
