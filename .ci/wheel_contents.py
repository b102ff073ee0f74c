"""Check that a built wheel and sdist carry exactly the package in ``src/normkit`` and the metadata of pyproject.toml.

    python .ci/wheel_contents.py DIST_DIR

``DIST_DIR`` holds the one ``normkit-*.whl`` and ``normkit-*.tar.gz`` that ``python -m build`` made. Checked: every
file under ``src/normkit`` (but ``__pycache__``) is in the wheel at the same place, byte for byte, and in the sdist;
the wheel has nothing else but its ``.dist-info``; its name, version, Python and dependency requirements, extras
and the ``normkit`` command are pyproject.toml's. Exit status 0 on pass, 1 with every difference listed.
"""

from __future__ import annotations

import email.parser
import sys
import tarfile
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "normkit"


def source_files() -> dict[str, bytes]:
    """``normkit/...`` path -> bytes of every file of the package in the checkout."""
    return {f"normkit/{path.relative_to(PACKAGE).as_posix()}": path.read_bytes()
            for path in sorted(PACKAGE.rglob("*")) if path.is_file() and "__pycache__" not in path.parts}


def only(dist: Path, pattern: str) -> Path:
    found = sorted(dist.glob(pattern))
    if len(found) != 1:
        raise SystemExit(f"wheel_contents: expected exactly one {pattern} in {dist}, found {len(found)}: "
                         f"{[p.name for p in found]}. Build into an empty directory (python -m build --outdir DIR).")
    return found[0]


def check_wheel(wheel: Path, project: dict, sources: dict[str, bytes]) -> list[str]:
    problems = []
    name, version = project["name"], project["version"]
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for path, data in sources.items():
            if path not in names:
                problems.append(f"the wheel lacks {path} (in src/normkit); check [tool.setuptools] package "
                                "discovery and package-data in pyproject.toml")
            elif archive.read(path) != data:
                problems.append(f"the wheel's {path} differs from the checkout's: a stale build/ directory?")
        extra = sorted(n for n in names if n not in sources and not n.startswith(info + "/"))
        if extra:
            problems.append(f"the wheel has files outside the package and {info}: {extra[:10]}")
        if f"{info}/METADATA" not in names:
            return [*problems, f"the wheel has no {info}/METADATA (name or version differ from pyproject.toml?)"]
        metadata = email.parser.Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        entry_points = archive.read(f"{info}/entry_points.txt").decode() if f"{info}/entry_points.txt" in names else ""

    expected = {"Name": name, "Version": version, "Requires-Python": project["requires-python"]}
    for field, value in expected.items():
        if metadata[field] != value:
            problems.append(f"METADATA {field}: expected {value!r} (pyproject.toml), got {metadata[field]!r}")
    requires = [r.replace(" ", "") for r in metadata.get_all("Requires-Dist") or []]
    for requirement in project["dependencies"]:
        if requirement.replace(" ", "") not in requires:
            problems.append(f"METADATA lacks Requires-Dist {requirement!r}; it has {requires}")
    for extra_name in project.get("optional-dependencies", {}):
        if extra_name not in (metadata.get_all("Provides-Extra") or []):
            problems.append(f"METADATA lacks the extra {extra_name!r}")
    for command, target in project.get("scripts", {}).items():
        if f"{command} = {target}" not in entry_points:
            problems.append(f"entry_points.txt lacks the command `{command} = {target}`; it has:\n{entry_points}")
    return problems


def check_sdist(sdist: Path, project: dict, sources: dict[str, bytes]) -> list[str]:
    prefix = f"{project['name']}-{project['version']}/"
    with tarfile.open(sdist) as archive:
        names = {member.name.removeprefix(prefix) for member in archive.getmembers()}
    wanted = [f"src/{path}" for path in sources] + ["pyproject.toml", project["readme"]]
    return [f"the sdist lacks {path}" for path in wanted if path not in names]


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python .ci/wheel_contents.py DIST_DIR (the directory python -m build wrote)", file=sys.stderr)
        return 2
    dist = Path(argv[0])
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    sources = source_files()
    wheel, sdist = only(dist, "normkit-*.whl"), only(dist, "normkit-*.tar.gz")
    problems = check_wheel(wheel, project, sources) + check_sdist(sdist, project, sources)
    for problem in problems:
        print(f"wheel_contents: FAIL: {problem}", file=sys.stderr)
    if not problems:
        print(f"wheel_contents: ok: {wheel.name} and {sdist.name} carry the {len(sources)} files of src/normkit "
              "and pyproject.toml's metadata")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
