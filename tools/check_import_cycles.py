"""Import cycles inside a package, counting every import at any depth (function-level, lazy ones included).

    python tools/check_import_cycles.py spp      -> lists the cycles; exit status 1 if there is any

Edges into the package root (``from spp import __version__``) are not counted: the root only re-exports.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports."""
    package = root.name
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        edges: set[str] = set()
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = mod.split(".") if is_package else mod.split(".")[:-1]
                    parts = parts[: len(parts) - (node.level - 1)]
                    base = ".".join([*parts, *([node.module] if node.module else [])])
                names = [base, *(f"{base}.{a.name}" for a in node.names)]
            for name in names:
                while name and name not in files:
                    name = name.rpartition(".")[0]
                if name and name not in (mod, package):
                    edges.add(name)
        graph[mod] = edges
    return graph


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per back edge of a depth-first search (none means the graph is acyclic)."""
    state: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                found.append([*stack[stack.index(w):], w])
            elif w not in state:
                visit(w)
        state[v] = 2
        stack.pop()

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in state:
            visit(v)
    return found


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "spp").resolve()
    graph = module_graph(root)
    found = cycles(graph)
    for c in found:
        print("import cycle:", " -> ".join(c))
    print(f"{len(found)} import cycles among {len(graph)} modules, {sum(map(len, graph.values()))} edges")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
