"""Check that code marked ``# Copied from <module>.<Class>.<name>`` still matches its source.

raygrpo keeps one file per model family (diffusers' rule: a readable copy beats a hasty
abstraction). Where two families share a function on purpose, the copy carries a marker on the line
just above its ``def`` / ``class`` (or its decorators)::

    # Copied from raygrpo.models.sd3.SD3Model.initial_noise
    def initial_noise(self, generator, num): ...

    # Copied from raygrpo.models.flux.FluxModel.decode with FluxModel->SD3Model, images->frames

The code must equal the source's after the ``with old->new`` replacements (applied in order to the
source's text). Docstrings are left out of the comparison: they name each family's own shapes and
pipeline. Run from anywhere; the exit status is 1 when a copy has drifted, with a diff per copy::

    python scripts/check_copies.py            # every .py file under raygrpo/
    python scripts/check_copies.py PATH ...   # files or folders, resolved against --root
"""

from __future__ import annotations

import argparse
import ast
import difflib
import re
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"^\s*# Copied from ([\w.]+)(?: with (.+))?$")


@dataclass(frozen=True)
class Copy:
    file: Path
    line: int  # 1-based line of the marker
    source: str  # dotted name of the original
    replacements: tuple[tuple[str, str], ...]


def _replacements(text: str | None) -> tuple[tuple[str, str], ...]:
    if not text:
        return ()
    pairs = []
    for part in text.split(","):
        old, arrow, new = part.strip().partition("->")
        if not arrow or not old:
            raise ValueError(f"replacement {part.strip()!r} is not of the form old->new")
        pairs.append((old.strip(), new.strip()))
    return tuple(pairs)


def find_copies(path: Path) -> list[Copy]:
    copies = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        match = MARKER.match(line)
        if match:
            copies.append(Copy(path, number, match.group(1), _replacements(match.group(2))))
    return copies


def _definitions(tree: ast.AST) -> list[ast.AST]:
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]


def _first_line(node: ast.AST) -> int:
    return min([node.lineno, *(d.lineno for d in node.decorator_list)])


def code_without_docstring(lines: list[str], node: ast.AST) -> str:
    """The definition's text (decorators included), its docstring cut out, dedented."""
    body = node.body
    skip = set()
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        skip = set(range(body[0].lineno, body[0].end_lineno + 1))
    kept = [lines[n - 1].rstrip() for n in range(_first_line(node), node.end_lineno + 1) if n not in skip]
    return textwrap.dedent("\n".join(kept)) + "\n"


def _resolve(name: str, root: Path) -> tuple[Path, list[str]]:
    """The file of the longest module prefix of ``name`` under ``root``, and the attribute path left inside it."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        base = root.joinpath(*parts[:cut])
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate, parts[cut:]
    raise LookupError(f"no module of {name!r} under {root}")


def _lookup(tree: ast.Module, attributes: list[str]) -> ast.AST:
    scope: ast.AST = tree
    for attribute in attributes:
        definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
        found = [n for n in getattr(scope, "body", []) if isinstance(n, definitions) and n.name == attribute]
        if not found:
            raise LookupError(f"{attribute!r} is not defined there")
        scope = found[0]
    return scope


def check(copy: Copy, root: Path) -> str | None:
    """None when the copy matches its source; else what is wrong, with a diff."""
    where = f"{copy.file.relative_to(root) if copy.file.is_relative_to(root) else copy.file}:{copy.line}"
    lines = copy.file.read_text().splitlines()
    following = [n for n in _definitions(ast.parse("\n".join(lines))) if _first_line(n) == copy.line + 1]
    if not following:
        return f"{where}: the marker '# Copied from {copy.source}' must stand on the line just above a def or class"
    try:
        source_file, attributes = _resolve(copy.source, root)
        source_lines = source_file.read_text().splitlines()
        original = _lookup(ast.parse("\n".join(source_lines)), attributes)
    except LookupError as error:
        return f"{where}: cannot find {copy.source}: {error}"
    expected = code_without_docstring(source_lines, original)
    for old, new in copy.replacements:
        expected = expected.replace(old, new)
    actual = code_without_docstring(lines, following[0])
    if actual == expected:
        return None
    diff = difflib.unified_diff(expected.splitlines(), actual.splitlines(), f"{copy.source} (with replacements)", where, lineterm="")
    return f"{where}: differs from {copy.source} (docstrings aside)\n" + "\n".join(diff)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", help="files or folders to check (default: raygrpo)")
    parser.add_argument("--root", type=Path, default=ROOT, help="where dotted names resolve (default: the repository)")
    args = parser.parse_args(argv)
    root = args.root.resolve()
    files: list[Path] = []
    for name in args.paths or ["raygrpo"]:
        path = (root / name).resolve()
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    copies = [copy for file in files for copy in find_copies(file)]
    problems = [problem for copy in copies if (problem := check(copy, root)) is not None]
    for problem in problems:
        print(problem, end="\n\n")
    print(f"{len(copies)} marked copies checked, {len(problems)} differ from their source")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
