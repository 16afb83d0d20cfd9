"""No import cycle inside karma: the module graph, function-level imports included, is a DAG.

Imports are read with `ast` (nothing is imported), so a cycle hidden inside a function body, which
Python tolerates until the day someone moves it to the top, fails here too. A package's
`__init__` counts as its own module; `from karma.x import y` is an edge to karma.x.y when that
is a module, else to karma.x.
"""

from __future__ import annotations

import ast
from pathlib import Path

KARMA = Path(__file__).resolve().parent.parent / "karma"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(KARMA.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(node: ast.ImportFrom, current: str, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = current.split(".") if is_package else current.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """karma module -> the karma modules it imports anywhere in its source."""
    files = {_module_name(p): p for p in KARMA.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(node, name, is_package)
                targets = [
                    f"{module}.{alias.name}" if f"{module}.{alias.name}" in files else module
                    for alias in node.names
                ]
            for target in targets:
                # `import karma.a.b` names karma.a.b; keep the longest prefix that is a module
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (iterative DFS with white / grey / black marks)."""
    state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done
    for root in sorted(graph):
        if state[root]:
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            child = next(stack[-1], None)
            if child is None:
                state[path.pop()] = 2
                stack.pop()
            elif state[child] == 1:
                return path[path.index(child) :] + [child]
            elif state[child] == 0:
                state[child] = 1
                path.append(child)
                stack.append(iter(sorted(graph[child])))
    return None


def test_finder_sees_a_cycle_and_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_includes_function_level_imports() -> None:
    graph = import_graph()
    assert "karma.train" in graph["karma.cli"]  # imported inside a handler function
    assert "karma.analysis.fidelity" in graph["karma.analysis.run"]


def test_no_import_cycle_inside_karma() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
