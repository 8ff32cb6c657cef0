"""The package's shape stays easy to follow: no import circles, no module reaching for another's private names,
and a controller whose step reads top to bottom."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "raygrpo"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules[name] = path
    return modules


def _imports(modules: dict[str, Path]) -> tuple[dict[str, set[str]], list[str]]:
    """Each module's raygrpo imports (wherever they stand in the file), and every ``from m import _private`` across modules."""
    edges: dict[str, set[str]] = {name: set() for name in modules}
    private = []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module is not None:
                module = node.module if not node.level else ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [node.module])
                if not module.startswith("raygrpo"):
                    continue
                for alias in node.names:
                    target = f"{module}.{alias.name}" if f"{module}.{alias.name}" in modules else module
                    if target in modules and target != name:
                        edges[name].add(target)
                    if alias.name.startswith("_") and target != name:
                        private.append(f"{name} imports {module}.{alias.name}")
            elif isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name in modules and a.name != name}
    return edges, private


def _is_package_edge(a: str, b: str, modules: dict[str, Path]) -> bool:
    """A package importing its own submodules (its __init__ re-exporting them), or a submodule its parent package."""
    return (modules[a].name == "__init__.py" and b.startswith(a + ".")) or (modules[b].name == "__init__.py" and a.startswith(b + "."))


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_circles_and_no_private_names_across_modules():
    modules = _modules()
    edges, private = _imports(modules)
    edges = {a: {b for b in targets if not _is_package_edge(a, b, modules)} for a, targets in edges.items()}
    assert _cycles(edges) == []
    assert private == []


def test_the_controller_step_reads_top_to_bottom():
    """Its phases in one short function; the algorithms never touch FSDP or the rank layout."""
    from raygrpo.controller import Controller

    lines = inspect.getsource(Controller.step).splitlines()
    assert len(lines) <= 60, f"Controller.step grew to {len(lines)} lines"
    for algorithm in ("dancegrpo.py", "dgpo.py"):
        code = (PACKAGE / "algorithms" / algorithm).read_text().split('"""', 2)[2]  # past the module docstring
        for plumbing in ("set_requires_gradient_sync", "learner.shard", "optimizer.step", "zero_grad", "clip_grad_norm", ".backward("):
            assert plumbing not in code, f"{algorithm} does the learner's work: {plumbing}"
