"""A griffe extension: normkit's docstrings (torch's skeleton, reST roles inside Google sections) as Markdown.

normkit writes its docstrings the way torch does, for ``help()`` and for readers of the source: Google sections
(``Args:``, ``Shape:``, ``Examples::``) with reST's ``.. math::`` blocks and ``:math:`` / ``:class:`` / ``:func:``
roles. mkdocstrings renders Markdown, so before the docstrings are parsed this rewrites, in every object of the
package:

- ``.. math::`` and its indented block -> a ``$$ ... $$`` block (pymdownx.arithmatex, MathJax);
- ``:math:`x``` -> ``$x$``;
- ``:class:`~normkit.nn.BatchNorm2d``` (and ``:func:``, ``:meth:``, ``:attr:``, ``:data:``, ``:mod:``, ``:exc:``,
  ``:obj:``) -> a cross-reference to the object, when it is normkit's: a ``normkit.`` path that exists, or a name
  in the scope of the docstring's object. The link is optional (inline code where the object has no page, e.g. a
  private helper); a ``normkit.`` path that names nothing is a required link, so ``mkdocs build --strict`` fails on
  it. Names griffe cannot see (instance attributes) and other libraries' objects (torch's: no inventory of theirs
  is reachable offline) -> inline code;
- a reST simple table (``====  ====`` borders) -> a Markdown table;
- ``Examples::`` -> ``Examples:`` with its block right below (griffe's Examples section, ``>>>`` lines as code,
  the text between them as text); any other ``Title::`` literal block -> ``Title:`` and the block fenced as Python;
- torch's grouped arguments, ``device, dtype: ...`` (names possibly wrapped over two lines), in an ``Args:`` section
  -> one entry per name with the shared description, so griffe still checks every name against the signature.

A submodule shadowed by the function it exports (``normkit.tools.freeze`` is the function ``freeze`` at run time,
not the module ``freeze.py``; griffe keeps the module) is replaced by that function, as Python sees it.

A module constant or class attribute read by inspection carries its type's docstring (``str(object='') -> str``
...); that docstring is dropped.

A class that inherits its constructor (the drop-ins take torch's ``__init__``) gets that constructor's signature, so
its ``Args:`` are checked against, and shown with, the real parameters (griffe only lists a class's own members).

The conversion (:func:`rst_to_markdown`) needs no griffe, so tests/test_docs_site.py checks it without the docs extra.
"""

from __future__ import annotations

import html
import importlib
import re
from collections.abc import Callable

try:
    from griffe import Alias, AliasResolutionError, CyclicAliasError, Extension, NameResolutionError, ObjectNode
except ImportError:  # the converter alone (tests), without the docs extra
    Extension = object

ROLE = re.compile(r":(?:py:)?(class|func|meth|attr|data|mod|exc|obj):`([^`]+)`")
MATH_ROLE = re.compile(r":math:`([^`]+)`")
LITERAL_BLOCK = re.compile(r"^(?P<indent>\s*)(?P<title>\S.*?)::\s*$")
MATH_DIRECTIVE = re.compile(r"^(?P<indent>\s*)\.\. math::\s*(?P<inline>.*?)\s*$")
ARGS_SECTION = re.compile(r"^(?P<indent>\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):$")
NAMES = r"[*]{0,2}\w+(?:\s*,\s*[*]{0,2}\w+)*"
GROUPED_ENTRY = re.compile(rf"^(?P<indent>\s*)(?P<names>{NAMES}\s*,\s*[*]{{0,2}}\w+)\s*:(?P<rest>\s.*|)$")
WRAPPED_NAMES = re.compile(rf"^\s*{NAMES}\s*,\s*$")
#: The special members a class page shows (``__init__`` merges into the class's signature and Args).
KEPT_SPECIAL = ("__init__", "__call__")
TABLE_BORDER = re.compile(r"^(?P<indent>\s*)=+(\s+=+)+\s*$")

#: ``resolve(target)``: ``(identifier, required)`` to link ``target`` to, or ``None`` to show it as inline code.
Resolver = Callable[[str], "tuple[str, bool] | None"]


def rst_to_markdown(text: str, resolve: Resolver) -> str:
    """Rewrite one docstring's reST (math blocks, literal blocks, roles) as Markdown; see the module docstring."""
    return _roles(_blocks(_simple_tables(_split_grouped_args(text.splitlines()))), resolve)


def _indent_of(line: str) -> int:
    return len(line) - len(line.lstrip())


def _block_end(lines: list[str], start: int, indent: int) -> int:
    """The index after the block of lines deeper than ``indent`` (blank lines inside) that starts at ``start``."""
    end = start
    for index in range(start, len(lines)):
        if lines[index].strip() and _indent_of(lines[index]) <= indent:
            break
        if lines[index].strip():
            end = index + 1
    return end


def _split_grouped_args(lines: list[str]) -> list[str]:
    """``a, b: text`` entries of Args sections as ``a: text`` and ``b: text`` (names wrapped over two lines joined)."""
    out: list[str] = []
    section_indent = item_indent = None
    index = 0
    while index < len(lines):
        line = lines[index]
        header = ARGS_SECTION.match(line)
        if header:
            section_indent, item_indent = len(header.group("indent")), None
        elif line.strip() and section_indent is not None and _indent_of(line) <= section_indent:
            section_indent = None
        elif line.strip() and section_indent is not None and item_indent is None:
            item_indent = _indent_of(line)
        if section_indent is None or header or not line.strip() or _indent_of(line) != item_indent:
            out.append(line)
            index += 1
            continue
        if WRAPPED_NAMES.match(line) and index + 1 < len(lines):
            line = f"{line.rstrip()} {lines[index + 1].strip()}"
            index += 1
        entry = GROUPED_ENTRY.match(line)
        if entry is None:
            out.append(line)
            index += 1
            continue
        end = _block_end(lines, index + 1, len(entry.group("indent")))
        for name in re.split(r"\s*,\s*", entry.group("names")):
            out += [f"{entry.group('indent')}{name}:{entry.group('rest')}", *lines[index + 1:end]]
        index = end
    return out


def _simple_tables(lines: list[str]) -> list[str]:
    """reST simple tables (a header between the first two borders) as Markdown tables; continuation rows joined."""
    out: list[str] = []
    index = 0
    while index < len(lines):
        border = TABLE_BORDER.match(lines[index])
        borders = [i for i in range(index, len(lines)) if lines[i] == lines[index]] if border else []
        if len(borders) < 3:
            out.append(lines[index])
            index += 1
            continue
        starts = [match.start() for match in re.finditer(r"=+", lines[index])]
        rows: list[list[str]] = []
        for line in lines[borders[0] + 1:borders[2]]:
            if not line.strip() or line == lines[index]:
                continue
            cells = [line[start:end].strip() for start, end in zip(starts, [*starts[1:], len(line)], strict=True)]
            if rows and not cells[0]:
                rows[-1] = [f"{old} {new}".strip() for old, new in zip(rows[-1], cells, strict=True)]
            else:
                rows.append(cells)
        indent = border.group("indent")
        table = [" | ".join(cell.replace("|", "\\|") for cell in row) for row in rows]
        out += [f"{indent}| {table[0]} |", f"{indent}|{'---|' * len(starts)}"]
        out += [f"{indent}| {row} |" for row in table[1:]]
        index = borders[2] + 1
    return out


def _blocks(lines: list[str]) -> str:
    out: list[str] = []
    index = 0
    while index < len(lines):
        line = lines[index]
        math = MATH_DIRECTIVE.match(line)
        literal = None if math else LITERAL_BLOCK.match(line)
        if math is None and literal is None:
            out.append(line)
            index += 1
            continue
        indent = (math or literal).group("indent")
        end = _block_end(lines, index + 1, len(indent))
        body = [body_line.strip() for body_line in lines[index + 1:end]]
        if math:
            formula = [math.group("inline")] if math.group("inline") else []
            formula += [body_line for body_line in body if body_line]
            out += [f"{indent}$$", *(f"{indent}{body_line}" for body_line in formula), f"{indent}$$"]
        elif literal.group("title") == "Examples" or not body:
            # no blank line after the title: griffe reads a title and a blank line as text, not as the section
            block = lines[index + 1:end]
            while block and not block[0].strip():
                block.pop(0)
            out += [f"{indent}{literal.group('title')}:", *block]
        else:
            block = lines[index + 1:end]
            while block and not block[0].strip():
                block.pop(0)
            inner = " " * min(_indent_of(block_line) for block_line in block if block_line.strip())
            out += [f"{indent}{literal.group('title')}:", "", f"{inner}```python", *block, f"{inner}```"]
        index = end
    return "\n".join(out)


def _roles(text: str, resolve: Resolver) -> str:
    text = MATH_ROLE.sub(lambda match: f"${match.group(1).strip()}$", text)

    def reference(match: re.Match) -> str:
        content = match.group(2).strip()
        explicit = re.fullmatch(r"(?P<title>.+?)\s*<(?P<target>[^>]+)>", content)
        if explicit:
            title, target = explicit.group("title"), explicit.group("target")
        else:
            target = content.lstrip("~")
            title = target.rsplit(".", 1)[-1] if content.startswith("~") else target
        link = resolve(target.removesuffix("()"))
        if link is None:
            return f"`{title}`"
        identifier, required = link
        if required:
            return f"[`{title}`][{identifier}]"
        return f'<autoref identifier="{html.escape(identifier)}" optional><code>{html.escape(title)}</code></autoref>'

    return ROLE.sub(reference, text)


class RstDocstrings(Extension):
    """Rewrite the docstrings of every object of the loaded package (see the module docstring)."""

    def on_class_members(self, *, node, cls, agent, **kwargs) -> None:
        """An inherited constructor (torch's, for the drop-ins) as the class's own, without its docstring."""
        init = getattr(node.obj, "__init__", None) if isinstance(node, ObjectNode) else None
        if "__init__" in cls.members or init is None or init is object.__init__:
            return
        agent.handle_function(ObjectNode(init, "__init__", parent=node))
        cls.members["__init__"].docstring = None

    def on_attribute_instance(self, *, node, attr, **kwargs) -> None:
        """No docstring for a value whose ``__doc__`` is its type's (``SCHEMA = "..."`` would show ``str``'s)."""
        if isinstance(node, ObjectNode) and attr.docstring is not None and _doc_is_its_types(node.obj):
            attr.docstring = None

    def on_package(self, *, pkg, **kwargs) -> None:
        self._convert(pkg, seen=set())
        _unshadow(pkg)

    def _convert(self, obj, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = rst_to_markdown(obj.docstring.value, lambda target: _resolve(obj, target))
        for name, member in list(obj.members.items()):
            if obj.is_class and name.startswith("__") and name.endswith("__") and name not in KEPT_SPECIAL:
                # what inspection finds besides the API (__doc__, __module__, __weakref__, protocol hooks); deleted,
                # since the aliases through which pages show a class do not carry a member's `public` flag
                obj.del_member(name)
            elif not member.is_alias:
                self._convert(member, seen)


def _doc_is_its_types(value) -> bool:
    """Whether ``value.__doc__`` is only the docstring of its type (a constant's, a dataclass default's)."""
    doc = getattr(value, "__doc__", None)
    return doc is not None and any(doc == getattr(kind, "__doc__", None) for kind in type(value).__mro__)


def _unshadow(module) -> None:
    """Put back, over each submodule, the same-named object that its parent module's namespace holds at run time."""
    for name, member in list(module.members.items()):
        if member.is_alias or not member.is_module:
            continue
        _unshadow(member)
        runtime = getattr(importlib.import_module(module.path), name, None)
        if name in member.members and getattr(runtime, "__module__", None) == member.path:
            module.set_member(name, Alias(name, member.members[name], parent=module))


def _resolve(obj, target: str) -> tuple[str, bool] | None:
    """normkit's targets: ``(path, required)``, required only for a path that names nothing; others ``None``."""
    root = obj.package
    if target == root.name or target.startswith(root.name + "."):
        return target, not _exists(root, target)
    head = target.split(".", 1)[0]
    try:
        resolved_head = obj.resolve(head)
    except NameResolutionError:
        return None
    if not (resolved_head == root.name or resolved_head.startswith(root.name + ".")):
        return None
    return resolved_head + target[len(head):], False


def _exists(root, path: str) -> bool:
    """Whether the dotted ``path`` names an object in the package ``root``."""
    obj = root
    for part in path.split(".")[1:]:
        try:
            obj = obj.members[part]
        except (KeyError, AliasResolutionError, CyclicAliasError):  # no such member, or an alias to nothing
            return False
    return True
