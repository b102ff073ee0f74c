"""Findings and the report the doctor returns: a table (rich), JSON with a schema version, plain text."""

from __future__ import annotations

import json
from collections.abc import Iterable
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

    def groups(self) -> list[tuple[str, str, list[Finding]]]:
        """The findings grouped by ``(severity, rule)``, in report order (worst first, then module order).

        Returns:
            A list of ``(severity, rule, findings)``; every finding is in exactly one group.

        Examples::

            >>> report = Report([Finding("bn-after-dropout", "warning", m, "msg", "fix") for m in ("a", "b")])
            >>> [(severity, rule, len(findings)) for severity, rule, findings in report.groups()]
            [('warning', 'bn-after-dropout', 2)]
        """
        groups: dict[tuple[str, str], list[Finding]] = {}
        for finding in self.findings:
            groups.setdefault((finding.severity, finding.rule), []).append(finding)
        return [(severity, rule, findings) for (severity, rule), findings in groups.items()]

    def filter(self, min_severity: str | None = None, rules: Iterable[str] | None = None) -> Report:
        """A new report with the findings at or above ``min_severity`` whose rule is in ``rules``.

        Args:
            min_severity: ``"error"``, ``"warning"`` or ``"info"`` (severities order error > warning > info);
                default ``None`` keeps every severity.
            rules: rule ids from :data:`normkit.diagnostics.RULES` (one id as a string works too); default
                ``None`` keeps every rule.

        Returns:
            A :class:`Report` with the same ``mode``, ``dynamic`` and ``changes``; ``ok`` and the counts follow the
            findings that are kept.

        Raises:
            ValueError: an unknown severity or rule id (the message lists the valid ones).

        Examples::

            >>> report = Report([Finding("bias-before-bn", "info", "0", "msg", "fix"),
            ...                  Finding("small-batch", "warning", "1", "msg", "fix")])
            >>> [f.rule for f in report.filter(min_severity="warning").findings]
            ['small-batch']
            >>> [f.rule for f in report.filter(rules=["bias-before-bn"]).findings]
            ['bias-before-bn']
        """
        from ._doctor import RULES  # a lazy import: _doctor imports this module

        keep_severities = set(SEVERITIES)
        if min_severity is not None:
            if min_severity not in SEVERITIES:
                raise ValueError(f"Report.filter: expected min_severity in {list(SEVERITIES)} or None, got "
                                 f"{min_severity!r}")
            keep_severities = set(SEVERITIES[: SEVERITIES.index(min_severity) + 1])
        keep_rules = None
        if rules is not None:
            keep_rules = {rules} if isinstance(rules, str) else set(rules)
            unknown = sorted(keep_rules - set(RULES), key=str)
            if unknown:
                raise ValueError(f"Report.filter: expected rule ids from normkit.diagnostics.RULES "
                                 f"({', '.join(RULES)}), got unknown {', '.join(map(repr, unknown))}")
        findings = [f for f in self.findings
                    if f.severity in keep_severities and (keep_rules is None or f.rule in keep_rules)]
        return Report(findings=findings, mode=self.mode, dynamic=self.dynamic, changes=list(self.changes))

    def summary(self) -> str:
        """One line: the verdict and the counts, e.g. ``"FAILED: 1 error(s), 2 warning(s), 0 info"``.

        Examples::

            >>> Report().summary()
            'OK: 0 error(s), 0 warning(s), 0 info'
        """
        counts = self.to_dict()["counts"]
        verdict = "OK" if self.ok else "FAILED"
        return f"{verdict}: {counts['error']} error(s), {counts['warning']} warning(s), {counts['info']} info"

    def __rich_console__(self, console, options):
        """A table on consoles 120 columns wide or more, one block per group of findings on narrower ones."""
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
            for severity, rule, findings in self.groups():
                where = _where(findings)
                yield Text.assemble((f"{severity:8}", styles[severity]), (rule, "bold"),
                                    f"  [{where}]" if len(findings) == 1 else f": {where}")
                yield Padding(Text(_message(findings)), (0, 0, 0, 9))
                yield Padding(Text(f"{_fix_label(findings)}: {_fix(findings)}", style="dim"), (0, 0, 0, 9))
            yield Text(self.summary(), style="bold red" if not self.ok else "bold")
            return
        table = Table(title=f"normkit doctor: checked for {self.mode}; {checks}", show_lines=True,
                      caption=self.summary())
        table.add_column("severity", no_wrap=True)
        table.add_column("rule", no_wrap=True)
        table.add_column("module", overflow="fold")
        table.add_column("problem", ratio=3)
        table.add_column("fix", ratio=2)
        for severity, rule, findings in self.groups():
            fixed = sum(f.fixed for f in findings)
            mark = "" if not fixed else "[fixed] " if fixed == len(findings) else f"[fixed {fixed} of {len(findings)}] "
            fix = f"{mark}{_fix(findings)}"
            table.add_row(Text(severity, style=styles[severity]), rule, _where(findings), Text(_message(findings)),
                          Text(fix))
        yield table

    def render(self, console=None) -> None:
        """Print the report with rich (to ``console``, default a new stdout console): a table when it is 120 columns
        wide or more, one block per group of findings otherwise. Findings of one severity and rule form one group
        (one row) naming the layers; :meth:`to_json` keeps every finding."""
        if console is None:
            from rich.console import Console

            console = Console()
        console.print(self)
        for change in self.changes:
            console.print(f"changed: {change}")

    def __str__(self) -> str:
        """Plain text: the summary line, then one block per ``(severity, rule)`` group, then the changes."""
        lines = [f"normkit doctor ({self.mode}, {'dynamic' if self.dynamic else 'static'}): {self.summary()}"]
        for severity, rule, findings in self.groups():
            if len(findings) == 1:
                lines.append(f"{severity:7} {rule} [{_where(findings)}] {_message(findings)}")
            else:
                lines.append(f"{severity:7} {rule}: {_where(findings)}")
                lines.append(f"        {_message(findings)}")
            lines.append(f"        {_fix_label(findings)}: {_fix(findings)}")
        lines.extend(f"changed: {change}" for change in self.changes)
        return "\n".join(lines)


#: How many module names a group's header shows before "(+N)".
SHOWN_NAMES = 3


def _name(finding: Finding) -> str:
    return finding.module or "(root)"


def _name_list(names: list[str], shown: int = SHOWN_NAMES) -> str:
    """``"a, b, c"``, or ``"a, b, c (+2)"`` past ``shown`` names."""
    more = f" (+{len(names) - shown})" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _where(findings: list[Finding]) -> str:
    """``"a"`` for one finding, ``"3 layers: a, b, c"`` or ``"5 layers: a, b, c (+2)"`` for a group."""
    if len(findings) == 1:
        return _name(findings[0])
    return f"{len(findings)} layers: {_name_list([_name(f) for f in findings])}"


def _message(findings: list[Finding]) -> str:
    """The message once when the group agrees, else the first one as an example."""
    first = findings[0]
    if all(f.message == first.message for f in findings):
        return first.message
    return f"e.g. [{_name(first)}]: {first.message}"


def _fix(findings: list[Finding]) -> str:
    first = findings[0]
    if all(f.fix == first.fix for f in findings):
        return first.fix
    return f"e.g. [{_name(first)}]: {first.fix}"


def _fix_label(findings: list[Finding]) -> str:
    fixed = sum(f.fixed for f in findings)
    if fixed == 0:
        return "fix"
    if fixed == len(findings):
        return "fix (applied)"
    return f"fix (applied to {fixed} of {len(findings)})"
