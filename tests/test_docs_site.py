"""The docs site's inputs, checked without building it (``make docs`` builds it, warnings as errors).

Checked here: the reference pages cover every public module; the nav lists every page under docs/; the reST-to-
Markdown conversion of docs/_ext/rst_docstrings.py; the top-level table of docs/_ext/top_level.py. With the docs
tools installed (``pip install -e ".[docs]"``, which ``make docs`` does), also: loaded the way mkdocstrings loads it,
every name of each documented module's ``__all__`` is a public member that renders, with a docstring that parses
without a warning. Without them (``make test`` installs the dev extra only) those tests skip; no test here needs the
network or a full build.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import pkgutil
import re
import sys
from pathlib import Path

import pytest

import normkit

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REFERENCE = DOCS / "reference"
#: Public modules without a reference page, and why. Any other public module needs one (docs/reference/*.md).
NOT_DOCUMENTED = {
    "normkit.cli": "the `normkit` command; README.md's 'The command' documents it",
    "normkit.experiments": "the runners behind `normkit demo` and `normkit experiment`; docs/RESULTS.md has results",
}
DIRECTIVE = re.compile(r"^:::\s+(\S+)\s*$", flags=re.M)


def _load_ext(name: str):
    """docs/_ext/NAME.py as a module (docs/_ext is not a package)."""
    spec = importlib.util.spec_from_file_location(f"normkit_docs_{name}", DOCS / "_ext" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


rst = _load_ext("rst_docstrings")
top_level = _load_ext("top_level")


def _mkdocs_config() -> dict:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _nav_pages(node) -> list[str]:
    """Every page path of an mkdocs nav (nested lists of ``{title: page}``, ``{title: [...]}`` and bare paths)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [page for value in node.values() for page in _nav_pages(value)]
    return [page for item in node for page in _nav_pages(item)]


def _documented_modules() -> dict[str, str]:
    """Module path -> the reference page (relative to docs/) whose ``:::`` directive renders it."""
    found: dict[str, str] = {}
    for page in sorted(REFERENCE.glob("*.md")):
        for identifier in DIRECTIVE.findall(page.read_text()):
            assert identifier not in found, f"{identifier} is rendered by both {found[identifier]} and {page.name}"
            found[identifier] = page.relative_to(DOCS).as_posix()
    return found


def _public_modules() -> set[str]:
    """normkit and its public subpackages and modules; a package with an empty ``__all__`` stands for its modules."""
    found = {"normkit"}
    for info in pkgutil.iter_modules(normkit.__path__, "normkit."):
        if info.name.rsplit(".", 1)[-1].startswith("_"):
            continue
        package = importlib.import_module(info.name) if info.ispkg else None
        if package is not None and not getattr(package, "__all__", None):
            found |= {sub.name for sub in pkgutil.iter_modules(package.__path__, f"{info.name}.")
                      if not sub.name.rsplit(".", 1)[-1].startswith("_")}
        else:
            found.add(info.name)
    return found


# --- pages and nav ---------------------------------------------------------------------------------------------------

def test_every_public_module_has_a_reference_page():
    documented, public = set(_documented_modules()), _public_modules()
    missing = sorted(public - documented - set(NOT_DOCUMENTED))
    assert not missing, (f"public modules without a reference page: {missing}. Add docs/reference/<name>.md with "
                         f"`::: <module>` and list it in mkdocs.yml's nav, or add it to NOT_DOCUMENTED with a reason")
    assert not documented - public, f"reference pages for modules that are not public: {documented - public}"
    assert not set(NOT_DOCUMENTED) - public, f"NOT_DOCUMENTED names no public module: {set(NOT_DOCUMENTED) - public}"


def test_the_brief_list_of_modules_is_documented():
    # the modules of issue 16's docs site, spelled out so that a change of _public_modules cannot drop one
    wanted = {"normkit", "normkit.nn", "normkit.functional", "normkit.tools", "normkit.diagnostics",
              "normkit.distributed", "normkit.compat", "normkit.integrations.lightning"}
    assert wanted <= set(_documented_modules())


def test_nav_lists_every_page_and_only_pages_that_exist():
    config = _mkdocs_config()
    nav = _nav_pages(config["nav"])
    assert len(nav) == len(set(nav)), f"pages listed twice in mkdocs.yml's nav: {[p for p in nav if nav.count(p) > 1]}"
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md") if "_ext" not in path.parts}
    assert not pages - set(nav), f"docs pages missing from mkdocs.yml's nav: {sorted(pages - set(nav))}"
    assert not set(nav) - pages, f"mkdocs.yml's nav lists pages that do not exist: {sorted(set(nav) - pages)}"
    guides = {path.name for path in DOCS.glob("*.md")}
    assert guides <= set(nav), "every docs/*.md guide is in the nav"
    assert set(_documented_modules().values()) <= set(nav), "every reference page is in the nav"


def test_config_names_files_that_exist_and_only_mathjax_from_the_network():
    config = _mkdocs_config()
    for hook in config["hooks"]:
        assert (ROOT / hook).is_file(), f"mkdocs.yml hook {hook} does not exist"
    handler = _python_handler(config)
    for extension in handler["options"]["extensions"]:
        assert (ROOT / extension.split(":")[0]).is_file(), f"mkdocstrings extension {extension} does not exist"
    remote = [script for script in config["extra_javascript"] if "://" in script]
    local = [script for script in config["extra_javascript"] if "://" not in script]
    assert all((DOCS / script).is_file() for script in local), local
    assert remote == ["https://cdn.jsdelivr.net/npm/mathjax@3/es5/tex-mml-chtml.js"], (
        f"only MathJax may load from the network (at view time, never at build time); got {remote}")


def _python_handler(config: dict) -> dict:
    plugins = [item["mkdocstrings"] for item in config["plugins"] if isinstance(item, dict) and "mkdocstrings" in item]
    return plugins[0]["handlers"]["python"]


# --- the reST conversion ---------------------------------------------------------------------------------------------

def _links(target: str):
    """A resolver like the extension's: normkit paths link (optionally; required when they name nothing)."""
    if target.startswith("normkit."):
        return target, target.endswith("Missing")
    return None


SAMPLE = """Batch norm over a 2D input.

.. math::

    y = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}

The mean :math:`\\mathrm{E}[x]` is per channel; see :class:`~normkit.nn.BatchNorm2d` and :func:`torch.relu`.

Args:
    num_features: :math:`C` from an expected input of size :math:`(N, C)`.
    device, dtype: factory arguments, as for
        :class:`torch.nn.BatchNorm1d`.

Layout::

    x = torch.randn(2, 3)

Examples::

    >>> 1 + 1
    2
"""


def test_math_block_and_role():
    out = rst.rst_to_markdown(SAMPLE, _links)
    assert "$$\ny = \\frac{x - \\mathrm{E}[x]}{\\sqrt{\\mathrm{Var}[x] + \\epsilon}}\n$$" in out
    assert "The mean $\\mathrm{E}[x]$ is per channel" in out
    assert "$C$ from an expected input of size $(N, C)$" in out
    assert ".. math::" not in out and ":math:" not in out


def test_math_directive_with_inline_formula():
    out = rst.rst_to_markdown("Text.\n\n    .. math:: a = b\n        + c\n\nAfter.", _links)
    assert out.splitlines()[2:6] == ["    $$", "    a = b", "    + c", "    $$"]
    assert out.endswith("After.")


def test_grouped_args_become_one_entry_per_name():
    out = rst.rst_to_markdown(SAMPLE, _links)
    args = out.split("Args:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert args == ["    num_features: $C$ from an expected input of size $(N, C)$.",
                    "    device: factory arguments, as for", "        `torch.nn.BatchNorm1d`.",
                    "    dtype: factory arguments, as for", "        `torch.nn.BatchNorm1d`."]


def test_grouped_names_wrapped_over_two_lines():
    text = "Args:\n    device,\n        dtype: where and how.\n    eps: added.\n"
    out = rst.rst_to_markdown(text, _links)
    assert out.splitlines() == ["Args:", "    device: where and how.", "    dtype: where and how.", "    eps: added."]


def test_a_comma_outside_args_is_left_alone():
    text = "Returns:\n    mean, var: the statistics.\n"
    assert rst.rst_to_markdown(text, _links) == text.rstrip("\n")


def test_roles_link_normkit_objects_and_show_others_as_code():
    out = rst.rst_to_markdown(SAMPLE, _links)
    assert ('<autoref identifier="normkit.nn.BatchNorm2d" optional><code>BatchNorm2d</code></autoref>' in out)
    assert "`torch.relu`" in out and ":func:" not in out and ":class:" not in out
    required = rst.rst_to_markdown(":func:`the fold <normkit.tools.Missing>` and :meth:`normkit.X.y()`", _links)
    assert required.startswith("[`the fold`][normkit.tools.Missing] and ")
    assert required.endswith('<autoref identifier="normkit.X.y" optional><code>normkit.X.y()</code></autoref>')


def test_literal_blocks_fenced_and_examples_kept_for_griffe():
    out = rst.rst_to_markdown(SAMPLE, _links)
    assert "Layout:\n\n    ```python\n    x = torch.randn(2, 3)\n    ```" in out
    assert out.endswith("Examples:\n    >>> 1 + 1\n    2")  # no blank line: griffe's section, not text
    assert "::" not in out.replace(":::", "")


def test_simple_table_becomes_a_markdown_table():
    text = "Modes:\n\n    ======  ==============\n    mode    meaning\n    ======  ==============\n" \
           "    skip    keep the old\n            statistics\n    raise   a | b\n    ======  ==============\n"
    out = rst.rst_to_markdown(text, _links).splitlines()
    assert out[2:6] == ["    | mode | meaning |", "    |---|---|", "    | skip | keep the old statistics |",
                        "    | raise | a \\| b |"]


def test_converted_sample_parses_as_google_sections():
    griffe = pytest.importorskip("griffe", reason="the docs tools (pip install -e '.[docs]')")
    docstring = griffe.Docstring(rst.rst_to_markdown(SAMPLE, _links), parser="google",
                                 parser_options={"warn_missing_types": False})
    sections = [section.kind.value for section in docstring.parse()]
    assert sections == ["text", "parameters", "text", "examples"]
    parsed = docstring.parsed
    assert [parameter.name for parameter in parsed[1].value] == ["num_features", "device", "dtype"]
    assert "$$" in parsed[0].value and "```python" in parsed[2].value
    assert parsed[3].value == [(griffe.DocstringSectionKind.examples, ">>> 1 + 1\n2")]


# --- the top-level table ---------------------------------------------------------------------------------------------

def test_top_level_table_has_every_name_linked_to_a_reference_page():
    rows = top_level.top_level_table().splitlines()[2:]
    assert len(rows) == len(normkit.__all__)
    pages = _documented_modules()
    for name, row in zip(normkit.__all__, rows, strict=True):
        assert row.startswith(f"| [`{name}`][" if name != "__version__" else "| `__version__` |"), row
        for identifier in re.findall(r"\]\[([\w.]+)\]", row):
            home = identifier if identifier in pages else identifier.rsplit(".", 1)[0]
            assert home in pages, f"normkit.{name} links to {identifier}, on no reference page"
        assert not re.search(r":\w+:`", row), f"a reST role left in the summary: {row}"


# --- the docstrings as mkdocstrings loads them (docs tools needed) ----------------------------------------------------

@pytest.fixture(scope="module")
def loaded():
    """normkit as mkdocs.yml's python handler loads it (inspection, the extension, google docstrings)."""
    griffe = pytest.importorskip("griffe", reason="the docs tools (pip install -e '.[docs]')")
    handler = _python_handler(_mkdocs_config())
    options = handler["options"]
    extensions = griffe.load_extensions(*(str(ROOT / spec) for spec in options["extensions"]))
    package = griffe.load("normkit", search_paths=[*(str(ROOT / path) for path in handler["paths"]), *sys.path],
                          extensions=extensions, force_inspection=options["force_inspection"],
                          docstring_parser=options["docstring_style"], docstring_options=options["docstring_options"],
                          resolve_aliases=True)
    return package


def _module(package, path: str):
    return package if path == "normkit" else package[path.removeprefix("normkit.")]


@pytest.mark.parametrize("path", sorted(set(_documented_modules())))
def test_every_exported_name_renders_with_a_docstring(loaded, path, caplog):
    module, runtime = _module(loaded, path), importlib.import_module(path)
    assert list(module.exports or []) == list(runtime.__all__), f"griffe reads {path}.__all__ differently"
    problems = []
    for name in runtime.__all__:
        member = module.members.get(name)
        if member is None or not member.is_public:
            problems.append(f"{name}: {'absent' if member is None else 'not public'} in the loaded {path}")
            continue
        target = member.final_target if member.is_alias else member
        if target.is_attribute:
            if target.docstring is not None and _is_type_doc(getattr(runtime, name), target.docstring.value):
                problems.append(f"{name}: shows the docstring of {type(getattr(runtime, name)).__name__}")
            continue
        if target.docstring is None or not target.docstring.value.strip():
            problems.append(f"{name}: no docstring")
            continue
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            for obj in [target, *(m for n, m in target.members.items() if not n.startswith("_") and not m.is_alias)]:
                if obj.docstring is not None:
                    obj.docstring.parse()
            problems += [f"{name}: {record.getMessage()}" for record in caplog.records]
    assert not problems, f"{path} (what `mkdocs build --strict` would render):\n" + "\n".join(problems)


def _is_type_doc(value, doc: str) -> bool:
    import inspect

    return any(kind.__doc__ and doc == inspect.cleandoc(kind.__doc__) for kind in type(value).__mro__)


def test_shadowed_submodule_is_the_function(loaded):
    # normkit.tools.freeze is the function at run time, not the module freeze.py (docs/_ext/rst_docstrings.py)
    assert loaded["tools.freeze"].final_target.is_function


def test_constants_do_not_carry_their_types_docstring(loaded):
    schema = loaded["diagnostics.SCHEMA"]
    assert (schema.final_target if schema.is_alias else schema).docstring is None
    assert loaded["integrations.lightning.FIRST_BATCH"].docstring is None
