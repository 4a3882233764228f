"""The package's layers (docs/architecture.md): no module imports one of a higher layer or of an
independent room beside it, and no two modules import each other, even lazily.

Imports are read from the source (every ``import`` statement, at any depth, including those
inside functions), except those under ``if TYPE_CHECKING:``, which never run: lower layers name
the composition root's ``RunConfig`` in annotations that way.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "megatron_hybrid"

LAYERS = (
    ("errors", "pattern", "mcore", "sections", "reliability"),
    ("backends",),
    ("parallel", "data"),
    ("model",),
    ("checkpoint",),
    ("engine",),
    ("inference",),
    ("quantization",),
    ("planning",),
    ("stages",),
    ("run_config",),
    ("recipe",),
    ("pipeline", "launch"),
    ("cli",),
    ("__main__",),
)
"""Bottom to top. A module may import its own room and the rooms of lower layers; rooms that
share a layer are independent of each other."""

ROOM_LAYER = {room: level for level, rooms in enumerate(LAYERS) for room in rooms}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package's modules that ``path`` imports when its code runs."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            submodules = {f"{base}.{alias.name}" for alias in node.names}
            found.update(submodules)
            if not submodules <= modules:  # names from the module itself, not its submodules
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return {name for name in found if name in modules and name != module_name(path)}


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


GRAPH = import_graph()


def test_every_room_has_a_layer():
    rooms = {room_of(module) for module in GRAPH} - {"__init__"}
    assert rooms <= set(ROOM_LAYER), f"rooms without a layer: {sorted(rooms - set(ROOM_LAYER))}"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    violations = []
    for module, imports in sorted(graph.items()):
        room = room_of(module)
        for target in sorted(imports):
            target_room = room_of(target)
            if target_room in (room, "__init__"):
                continue
            if ROOM_LAYER[target_room] >= ROOM_LAYER[room]:
                relation = "beside" if ROOM_LAYER[target_room] == ROOM_LAYER[room] else "above"
                violations.append(f"{module} imports {target} ({target_room} is {relation} "
                                  f"{room})")
    return violations


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Each strongly connected group of two or more modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:  # targets outside the graph have no imports of their own
            connect(node)
    return groups


def test_no_module_imports_a_higher_or_a_sibling_room():
    assert layer_violations(GRAPH) == []


def test_no_import_cycles():
    assert import_cycles(GRAPH) == []


def test_the_checks_catch_what_they_guard_against():
    """Control: an upward import and a two-module circle are reported."""
    graph = {"megatron_hybrid.model.build": {"megatron_hybrid.engine.training_loop"},
             "megatron_hybrid.engine.training_loop": {"megatron_hybrid.model.build"},
             "megatron_hybrid.data.tokenizer": {"megatron_hybrid.parallel.config"}}
    assert layer_violations(graph) == [
        "megatron_hybrid.data.tokenizer imports megatron_hybrid.parallel.config (parallel is "
        "beside data)",
        "megatron_hybrid.model.build imports megatron_hybrid.engine.training_loop (engine is "
        "above model)"]
    assert import_cycles(graph) == [["megatron_hybrid.engine.training_loop",
                                     "megatron_hybrid.model.build"]]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=module_name)
def test_modules_stay_short_or_say_why(path):
    """A module over ~500 lines says at its top why it is one module."""
    text = path.read_text(encoding="utf-8")
    if len(text.splitlines()) <= 500:
        return
    docstring = ast.get_docstring(ast.parse(text)) or ""
    assert "One module because" in docstring, (
        f"{path.name} has {len(text.splitlines())} lines: split it, or say at its top why it "
        f"is one module ('One module because ...')")
