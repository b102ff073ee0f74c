"""mkdocs hook: the table of ``normkit``'s top-level names on reference/normkit.md, made from ``normkit.__all__``.

The top-level names are re-exports; each is documented once, on the page of the subpackage that exports it, so the
table links there instead of repeating the docs. Made at build time, it cannot drift from ``normkit.__all__``; a
name that no public subpackage exports fails the build.
"""

from __future__ import annotations

import importlib
import inspect
import re
import types

MARKER = "<!-- normkit: top-level names -->"
#: The subpackages with a reference page, searched in this order for the home of a top-level name.
HOMES = ("normkit.nn", "normkit.functional", "normkit.tools", "normkit.diagnostics", "normkit.distributed",
         "normkit.compat")


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, top_level_table())


def top_level_table() -> str:
    """One row per name of ``normkit.__all__``: a link to its documentation and the first line of its docstring."""
    normkit = importlib.import_module("normkit")
    rows = ["| `normkit.` | what it is |", "|---|---|"]
    for name in normkit.__all__:
        value = getattr(normkit, name)
        if name == "__version__":
            rows.append(f"| `__version__` | `{value}` |")
            continue
        home = value.__name__ if isinstance(value, types.ModuleType) else _home(name, value)
        identifier = home if isinstance(value, types.ModuleType) else f"{home}.{name}"
        rows.append(f"| [`{name}`][{identifier}] | {_summary(value)} |")
    return "\n".join(rows)


def _home(name: str, value) -> str:
    for module_name in HOMES:
        module = importlib.import_module(module_name)
        if name in getattr(module, "__all__", ()) and getattr(module, name) is value:
            return module_name
    from mkdocs.exceptions import PluginError  # here: tests/test_docs_site.py runs the table without mkdocs

    raise PluginError(f"docs: expected normkit.{name} to be exported by one of {', '.join(HOMES)} (its reference "
                      f"page), but none of their __all__ has it. Export it there, or add its subpackage to HOMES in "
                      f"docs/_ext/top_level.py and a page under docs/reference/.")


def _summary(value) -> str:
    """The docstring's first line, reST roles as inline code, ``|`` escaped for the table."""
    line = (inspect.getdoc(value) or "").split("\n\n", 1)[0].replace("\n", " ")
    line = re.sub(r":math:`([^`]+)`", r"$\1$", line)
    line = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", line)
    return line.replace("|", "\\|")
