"""The layers' rules, checked on the source (README, Architecture): no import cycles outside
TYPE_CHECKING, the fronts apart (proxy/ imports nothing of tunnel/, tunnel/tun/ nothing of
proxy/), and no module reaching into another module's underscore names."""

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("tunnel", "proxy", "uplink")


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node, except what sits under `if TYPE_CHECKING:`."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".")
    if MODULES[module].name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(module: str, *, runtime_only: bool = True) -> set[str]:
    """The project modules `module` imports (a `from package import name` that names a
    submodule counts as that submodule)."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = _runtime_nodes(tree) if runtime_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, node)
            names = [target]
            names += [f"{target}.{alias.name}" for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def test_the_walk_sees_the_tree() -> None:
    # Guard against a walk that finds nothing and so passes everything.
    assert {"tunnel.modem.engine", "tunnel.daemon.app", "proxy.server", "uplink.contract",
            "tunnel.tun.nat"} <= set(MODULES)  # fmt: skip
    assert "tunnel.modem.engine" in imports("tunnel.modem.pool")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every back edge of a depth-first walk, as the cycle it closes."""
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append([*stack[stack.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return cycles


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles_outside_type_checking() -> None:
    graph = {m: imports(m) for m in MODULES}
    # A package's __init__ re-exports its modules: a module's edge up into its own package's
    # __init__ would close a cycle that is no coupling, so it is dropped (the __init__'s edges
    # down stay). Imports through the package resolve to the submodule named (see imports()).
    for module, targets in graph.items():
        targets.difference_update(p for p in list(targets) if module.startswith(p + "."))
    assert find_cycles(graph) == []


@pytest.mark.parametrize(
    ("importer", "forbidden"), [("proxy", "tunnel"), ("tunnel.tun", "proxy"), ("uplink", "tunnel"),
                                ("uplink", "proxy"), ("tunnel.at", "tunnel.modem"),
                                ("tunnel.modem", "tunnel.daemon"), ("tunnel.modem", "proxy"),
                                ("tunnel.modem", "tunnel.tun")],
)  # fmt: skip
def test_a_layer_imports_nothing_of_another(importer: str, forbidden: str) -> None:
    bad = {
        (m, target)
        for m in MODULES
        if m == importer or m.startswith(importer + ".")
        for target in imports(m, runtime_only=False)
        if target == forbidden or target.startswith(forbidden + ".")
    }
    assert bad == set()


def _underscore_uses(module: str) -> Iterator[str]:
    """Private names of *other* modules this one touches: `from x import _y`, `x._y` on an
    imported module, and `obj._attr` on anything that is not `self`/`cls`."""
    tree = ast.parse(MODULES[module].read_text())
    imported_modules: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    yield f"from {_resolve(module, node)} import {alias.name}"
                target = f"{_resolve(module, node)}.{alias.name}"
                if target in MODULES:
                    imported_modules[alias.asname or alias.name] = target
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in MODULES:
                    imported_modules[alias.asname or alias.name.split(".")[0]] = alias.name
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or name.startswith("__"):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
            continue
        if isinstance(owner, ast.Name) and owner.id in imported_modules:
            yield f"{owner.id}.{name}"
            continue
        if (
            isinstance(owner, ast.Call)
            and isinstance(owner.func, ast.Name)
            and (owner.func.id == "super")
        ):
            continue
        # obj._attr on some other object: allowed only on instances of a class this module
        # defines itself (its own private state), which the check below resolves by name.
        yield f"{ast.unparse(owner)}.{name}"


def _own_private_attrs(module: str) -> set[str]:
    """Underscore attributes this module's own classes assign (self._x = ...) or declare."""
    tree = ast.parse(MODULES[module].read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            if isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
        elif isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
    return names


def test_no_module_reaches_into_another_modules_underscore_names() -> None:
    bad: list[str] = []
    for module in MODULES:
        own = _own_private_attrs(module)
        for use in _underscore_uses(module):
            attr = use.rpartition(".")[2].rpartition(" ")[2]
            if not use.startswith("from ") and attr in own:
                continue  # another instance of this module's own class (e.g. other._x)
            bad.append(f"{module}: {use}")
    assert bad == []


def test_the_emulator_shares_constants_with_the_driver_never_logic() -> None:
    # It is written from the manual on its own (README): of the rest of the tree it may read the
    # manual's constants and error codes (tunnel.at.constants, tunnel.at.errors, through the
    # tunnel.at package), nothing else.
    shared = {
        (m, target)
        for m in MODULES
        if m.startswith("tunnel.emulator")
        for target in imports(m, runtime_only=False)
        if not target.startswith("tunnel.emulator")
    }
    assert {target for _m, target in shared} <= {
        "tunnel.at",
        "tunnel.at.constants",
        "tunnel.at.errors",
    }
    assert shared  # the walk does see the one import that is allowed
