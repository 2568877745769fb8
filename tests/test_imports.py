"""The import graph of cdsp_core, components and pipelines, read from the source (`ast`): every
import statement counts, at the top of a module or inside a function. No module may reach itself
through it, and cdsp_core (the library) imports nothing of the KFP packages above it."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("cdsp_core", "components", "pipelines")


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for package in PACKAGES for p in sorted((REPO / package).glob("*.py"))}


def import_graph() -> dict[str, set[str]]:
    """module -> the modules of PACKAGES it imports (`from cdsp_core import x` imports cdsp_core.x)."""
    trees = sources()
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        package = name if name in PACKAGES else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):  # every statement, inside functions and classes too
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from .x import y
                    base = ".".join([package, base]) if base else package
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in trees else base for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in trees and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph as [a, b, ..., a], or [] when there is none (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the current path, "done" after
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_the_graph_sees_imports_inside_functions():
    # evaluate imports storage only inside the function that needs it (boto3 is loaded lazily)
    assert "cdsp_core.storage" in import_graph()["cdsp_core.evaluate"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle == [], " -> ".join(cycle)


def test_every_import_is_a_statement_and_the_library_imports_no_pipeline_code():
    """importlib or __import__ would hide an edge from the graph above."""
    for name, tree in sources().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                assert node.id not in ("importlib", "__import__"), name
            if isinstance(node, ast.alias):
                assert node.name.split(".")[0] != "importlib", name
    for name, imported in import_graph().items():
        if name.startswith("cdsp_core"):
            assert not {m for m in imported if not m.startswith("cdsp_core")}, name
