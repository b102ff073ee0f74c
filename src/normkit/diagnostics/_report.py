"""Findings and the report the doctor returns: a table (rich), JSON with a schema version, plain text."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

Severity = Literal["error", "warning", "info"]

SCHEMA = "normkit.doctor/1"
SEVERITIES: tuple[str, ...] = ("error", "warning", "info")


@dataclass(frozen=True)
class Finding:
    """One problem the doctor found.

    Args:
        rule: the stable rule id, e.g. ``"bn-after-dropout"``.
        severity: ``"error"``, ``"warning"`` or ``"info"``.
        module: the qualified name of the module (``""`` is the root).
        message: what is wrong, with the numbers that show it.
        fix: what to do about it.
        fixed: ``True`` when ``doctor(..., fix=True)`` applied the fix.
    """

    rule: str
    severity: Severity
    module: str
    message: str
    fix: str
    fixed: bool = False

    def __post_init__(self) -> None:
        if self.severity not in SEVERITIES:
            raise ValueError(f"Finding.severity: expected one of {SEVERITIES}, got {self.severity!r}")


@dataclass
class Report:
    """What :func:`normkit.diagnostics.doctor` found, worst first.

    Args:
        findings: the findings, sorted by severity (errors first) and then by module order.
        mode: the use the model was checked for, ``"train"`` or ``"inference"``.
        dynamic: whether a forward pass on an example input was part of the check.
        changes: what ``fix=True`` changed, one sentence each (empty without ``fix=True``).

    Examples::

        >>> import torch
        >>> from normkit.diagnostics import doctor
        >>> report = doctor(torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.BatchNorm1d(4),
        ...                                     torch.nn.ReLU(), torch.nn.Linear(4, 2)))
        >>> report.ok, report.to_dict()["schema"]
        (True, 'normkit.doctor/1')
    """

    findings: list[Finding] = field(default_factory=list)
    mode: str = "train"
    dynamic: bool = False
    changes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        """The findings of severity ``"error"``."""
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        """The findings of severity ``"warning"``."""
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """``True`` when no finding is an error (warnings and infos allowed)."""
        return not self.errors

    def rules(self) -> set[str]:
        """The rule ids that fired."""
        return {f.rule for f in self.findings}

    def to_dict(self) -> dict:
        """The report as plain data (the schema of :meth:`to_json`)."""
        counts = {severity: sum(f.severity == severity for f in self.findings) for severity in SEVERITIES}
        return {
            "schema": SCHEMA,
            "mode": self.mode,
            "dynamic": self.dynamic,
            "ok": self.ok,
            "counts": counts,
            "findings": [asdict(f) for f in self.findings],
            "changes": list(self.changes),
        }

    def to_json(self, indent: int | None = 2) -> str:
        """The report as JSON: ``schema``, ``mode``, ``dynamic``, ``ok``, ``counts``, ``findings``, ``changes``."""
        return json.dumps(self.to_dict(), indent=indent)

    def __rich_console__(self, console, options):
        """A table on consoles 120 columns wide or more, one block per finding on narrower ones."""
        from rich.padding import Padding
        from rich.table import Table
        from rich.text import Text

        styles = {"error": "bold red", "warning": "yellow", "info": "cyan"}
        checks = "module tree + one forward pass" if self.dynamic else "module tree only (no example input)"
        if not self.findings:
            yield Text(f"normkit doctor: no batch-norm problem found (checked for {self.mode}; {checks})",
                       style="green")
            return
        if options.max_width < 120:
            yield Text(f"normkit doctor: checked for {self.mode}; {checks}", style="bold")
            for f in self.findings:
                yield Text.assemble((f"{f.severity:8}", styles[f.severity]), (f.rule, "bold"),
                                    f"  [{f.module or '(root)'}]")
                yield Padding(Text(f.message), (0, 0, 0, 9))
                yield Padding(Text(f"fix{' (applied)' if f.fixed else ''}: {f.fix}", style="dim"), (0, 0, 0, 9))
            yield Text(self._summary(), style="bold red" if not self.ok else "bold")
            return
        table = Table(title=f"normkit doctor: checked for {self.mode}; {checks}", show_lines=True,
                      caption=self._summary())
        table.add_column("severity", no_wrap=True)
        table.add_column("rule", no_wrap=True)
        table.add_column("module", overflow="fold")
        table.add_column("problem", ratio=3)
        table.add_column("fix", ratio=2)
        for f in self.findings:
            fix = f"[fixed] {f.fix}" if f.fixed else f.fix
            table.add_row(Text(f.severity, style=styles[f.severity]), f.rule, f.module or "(root)", Text(f.message),
                          Text(fix))
        yield table

    def render(self, console=None) -> None:
        """Print the report with rich (to ``console``, default a new stdout console): a table when it is 120 columns
        wide or more, one block per finding otherwise."""
        if console is None:
            from rich.console import Console

            console = Console()
        console.print(self)
        for change in self.changes:
            console.print(f"changed: {change}")

    def _summary(self) -> str:
        counts = self.to_dict()["counts"]
        verdict = "OK" if self.ok else "FAILED"
        return f"{verdict}: {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"

    def __str__(self) -> str:
        lines = [f"normkit doctor ({self.mode}, {'dynamic' if self.dynamic else 'static'}): {self._summary()}"]
        for f in self.findings:
            lines.append(f"{f.severity:7} {f.rule} [{f.module or '(root)'}] {f.message}")
            lines.append(f"        fix{' (applied)' if f.fixed else ''}: {f.fix}")
        lines.extend(f"changed: {change}" for change in self.changes)
        return "\n".join(lines)
