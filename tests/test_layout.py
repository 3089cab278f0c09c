"""The module graph shows the architecture: rooms in the order data flows, each importing only downward,
the few shared modules beside them, no import cycles, and Serve reached only through its entry points."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "digits_ray"

# The rooms and their rank, in the order data flows. A module imports its own room, rooms of a lower rank
# and the shared modules; train and inference share a rank, so neither imports the other.
RANKS = {"data": 0, "models": 1, "train": 2, "inference": 2, "tune": 3, "serve": 4}
# Beside the rooms: any room may import them, and they import only one another ("digits_ray": the package).
SHARED = {"digits_ray", "config", "errors", "paths", "schema", "keras_api", "plots"}
# Entry points: they may import anything (the CLI does, lazily, one command at a time).
ENTRY = {"cli", "__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> set[str]:
    """Every module name a file imports anywhere (inside functions too); ``from a import b`` gives a and a.b,
    as b may be a module. Relative imports are resolved against the file's package."""
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join([*package[:len(package) - node.level + 1], *([node.module] if node.module else [])]
                            ) if node.level else node.module
            names |= {base, *(f"{base}.{alias.name}" for alias in node.names)}
    return names


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere (inside functions too), packages excluded."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    packages = {module_name(p) for p in PACKAGE.rglob("__init__.py")}

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name if name and name not in packages else None

    return {name: {r for t in imported_names(path) if (r := resolve(t)) and r != name}
            for name, path in modules.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def place(name: str) -> str:
    """Where a module of the package lives: its room (digits_ray.train.local -> train), else its own name."""
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def layer_problem(importer: str, imported: str) -> str | None:
    """Why ``importer`` may not import ``imported`` (both places), or None when it may."""
    if importer in ENTRY or imported == importer:
        return None
    if importer in SHARED:
        return None if imported in SHARED else "a shared module imports only shared modules"
    if imported in SHARED:
        return None
    if imported not in RANKS:
        return f"{imported} is an entry point"
    if RANKS[imported] < RANKS[importer]:
        return None
    allowed = sorted(room for room, rank in RANKS.items() if rank < RANKS[importer])
    return f"{importer} may import only {', '.join(allowed) or 'no other room'} and the shared modules"


def layer_violations() -> list[str]:
    """One line per module and place it may not import, naming the longest name imported from there."""
    found: dict[tuple[str, str], str] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = place(module_name(path))
        for name in sorted(imported_names(path), key=len):
            if name.split(".")[0] == "digits_ray" and (why := layer_problem(importer, place(name))):
                found[str(path.relative_to(ROOT)), place(name)] = f"{path.relative_to(ROOT)} imports {name}: {why}"
    return sorted(found.values())


def test_every_module_has_a_place():
    """A new top-level module or folder must be given a room, or be declared shared or an entry point."""
    places = {place(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert places - set(RANKS) - SHARED - ENTRY == set()
    assert set(RANKS) <= places, "every room is a folder of the package"


def test_layers_import_only_downward():
    assert layer_problem("models", "inference") and layer_problem("train", "inference")  # the rules bite
    assert layer_problem("config", "data") and layer_problem("serve", "cli") and not layer_problem("tune", "train")
    edges = {(place(m), place(t)) for m, targets in import_graph().items() for t in targets}
    assert {("tune", "train"), ("serve", "inference"), ("models", "models")} <= edges  # the walk found real edges
    assert layer_violations() == []


def test_only_entry_points_import_serve():
    """Nothing reaches Serve but its entry points: the CLI (``serve``, ``swap``) and serve_app.py (benchmarks and tests
    may; jobs and the rest of the package may not)."""
    files = [*ROOT.glob("*.py"), *(ROOT / "jobs").rglob("*.py"), *(ROOT / "cluster").rglob("*.py"),
             *PACKAGE.rglob("*.py")]
    callers = {str(path.relative_to(ROOT)) for path in files
               if any(name == "digits_ray.serve" or name.startswith("digits_ray.serve.")
                      for name in imported_names(path))}
    inside = {c for c in callers if c.startswith("digits_ray/serve/")}
    assert inside, "the scan sees Serve's own imports"
    assert sorted(callers - inside) == ["digits_ray/cli/serve.py", "serve_app.py"]


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
