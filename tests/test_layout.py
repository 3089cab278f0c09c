"""The module graph shows the architecture: no import cycles, and the layers import only downward."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "digits_ray"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere (inside functions too), packages excluded."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name if name and name not in packages else None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                targets |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = {r for t in targets if (r := resolve(t)) and r != name}
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles():
    graph = import_graph()
    assert "digits_ray.config" in graph and graph["digits_ray.train.distributed"]  # the walk found real edges
    cycles = sorted(m for m in graph if m in reachable(graph, m))
    assert not cycles, f"modules on an import cycle: {cycles}"


@pytest.mark.parametrize("module", ["digits_ray.schema", "digits_ray.errors", "digits_ray.models.zoo",
                                    "digits_ray.train.feed", "digits_ray.train.checkpoint", "digits_ray.config"])
def test_lower_layers_do_not_import_the_data_loader(module):
    assert "digits_ray.data.mnist" not in reachable(import_graph(), module)


def test_schema_has_no_dependencies():
    assert import_graph()["digits_ray.schema"] == set()
