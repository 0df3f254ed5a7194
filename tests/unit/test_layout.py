"""The library's layout: imports point one way, no module grows past one sitting, every package
says what it holds. Walks the source with ``ast`` (every import, function-level ones included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 450


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for d in ("pipeline", "stages") for p in (ROOT / d).rglob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The project modules ``path`` imports: ``from a.b import c`` counts ``a.b.c`` when that is a
    module, else ``a.b``; a package's own ``__init__`` does not count as imported by its members."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in modules}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in modules else node.module)
    return found & modules


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(p, set(modules)) - {m} for m, p in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as ``[a, b, ..., a]``, or None (depth-first search, colouring nodes)."""
    state, stack = {}, []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_find_cycle_on_worked_graphs():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"y"}, "y": set(), "a": {"a2"}, "a2": {"a"}}) == ["a", "a2", "a"]


def test_no_import_circle_among_the_project_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_import_circle_among_the_packages():
    """Dependencies point one way between packages too: stages -> pipeline packages -> core."""
    package = lambda m: ".".join(m.split(".")[:2])  # noqa: E731
    graph: dict[str, set[str]] = {}
    for mod, deps in import_graph().items():
        graph.setdefault(package(mod), set()).update(package(d) for d in deps if package(d) != package(mod))
    cycle = find_cycle(graph)
    assert cycle is None, "package circle: " + " -> ".join(cycle)
    assert not graph["pipeline.core"], f"core imports {graph['pipeline.core']}: it must import nothing of ours"
    assert not [(m, d) for m, deps in graph.items() if m.startswith("pipeline") for d in deps
                if d.startswith("stages")], "the library imports a stage"


def test_the_product_does_not_import_the_world():
    """The world is the test bench: only eval (its gold judge) and config (its schema) may import it."""
    allowed = ("pipeline.world", "pipeline.eval", "pipeline.config", "stages")
    offenders = {m: sorted(d for d in deps if d.startswith("pipeline.world"))
                 for m, deps in import_graph().items() if not m.startswith(allowed)}
    assert not {m: d for m, d in offenders.items() if d}


def test_no_module_over_450_lines():
    long = {m: n for m, p in project_modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by concept: {long}"


def test_every_package_has_a_docstring():
    packages = [p for p in (ROOT / "pipeline").rglob("__init__.py")]
    assert len(packages) >= 9
    missing = [str(p.relative_to(ROOT)) for p in packages if not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing
