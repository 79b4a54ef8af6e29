"""No import circles among the repository's modules, counting imports inside functions and TYPE_CHECKING blocks."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("loldu_sd", "eval", "research")


def modules() -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package __init__)} of every source file in PACKAGES."""
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            init = parts[-1] == "__init__"
            out[".".join(parts[:-1] if init else parts)] = (path, init)
    return out


def imported(node: ast.AST, package: list[str]) -> list[str]:
    """Dotted names one import statement may load (a from-import's names may be submodules)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = ".".join(package[: len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
        else node.module
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    """{module: the repository modules it imports anywhere in its body}; a module importing its own package
    (parent __init__) is left out, as Python runs that package first in any case."""
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, (path, init) in mods.items():
        package = name.split(".") if init else name.split(".")[:-1]
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            for target in imported(node, package):
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    edges.add(target)
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each import circle as the path from a module back to itself (depth-first search, one per back edge)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_the_walker_sees_function_level_imports():
    graph = import_graph()
    assert "loldu_sd.toyworld" in graph["eval.scorer"]  # imported inside toyworld_scorer only
    assert "loldu_sd.loading" in graph["loldu_sd.toyworld"]  # inside load_pipeline only


def test_no_import_circles():
    assert circles(import_graph()) == []
