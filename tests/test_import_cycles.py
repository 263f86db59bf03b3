"""No import cycles between the modules of the four packages (ARCHITECTURE.md: "No import cycles,
between packages or between modules").

The graph is built from the source with `ast`, without importing anything: an edge X -> Y means
module X imports project module Y when X itself is imported. Imports inside functions and under
`if TYPE_CHECKING:` do not run at that time, so they are not edges.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("astrai-core", "astrai-data", "astrai-train", "astrai-serve")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the four packages."""
    modules = {}
    for package in PACKAGES:
        src = ROOT / "packages" / package / "src"
        for path in sorted(src.rglob("*.py")):
            parts = path.relative_to(src).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def is_type_checking_block(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def module_level_imports(tree: ast.Module) -> Iterator[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module is imported: the top level, and the bodies of
    top-level if/try/with blocks (but not `if TYPE_CHECKING:`), never function or class bodies."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif isinstance(node, ast.If):
            if not is_type_checking_block(node):
                pending += node.body
            pending += node.orelse
        elif isinstance(node, ast.Try):
            pending += node.body + node.orelse + node.finalbody
            for handler in node.handlers:
                pending += handler.body
        elif isinstance(node, ast.With):
            pending += node.body


def absolute_base(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The module a `from ... import` reads from, with relative levels resolved."""
    if node.level == 0:
        return node.module or ""
    parts = module.split(".")
    # A package's own `from . import x` is relative to itself; a module's to its package.
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, node.module] if node.module else anchor)


def imported_modules(node: ast.Import | ast.ImportFrom, module: str, is_package: bool,
                     known: set[str]) -> set[str]:
    """Project modules that `node` makes Python execute (the target, not its parent packages:
    a package importing its own submodules is how packages are built, not a cycle)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    base = absolute_base(node, module, is_package)
    found = set()
    for alias in node.names:
        candidate = f"{base}.{alias.name}"
        if candidate in known:  # `from a import b` where a.b is a module
            found.add(candidate)
        elif base in known:  # `from a import name` where name is defined in (or re-exported by) a
            found.add(base)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    known = set(modules)
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in module_level_imports(tree):
            edges |= imported_modules(node, module, is_package, known)
        graph[module] = edges - {module}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan), each listed as a
    closed path X -> ... -> X found inside it, sorted for a stable message."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(closed_path(graph, component) for component in components)


def closed_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component."""
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for target in sorted(graph[node] & component):
                if target == start:
                    return [*paths[node], start]
                if target not in paths:
                    paths[target] = [*paths[node], target]
                    next_frontier.append(target)
        frontier = next_frontier
    raise AssertionError(f"{sorted(component)} is strongly connected but has no cycle")


def test_no_module_imports_itself_back():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles (move the shared piece down, or import it where used):\n" + \
        "\n".join(" -> ".join(cycle) for cycle in cycles)


def test_the_checker_sees_a_cycle_and_ignores_function_and_type_checking_imports(tmp_path):
    source = {
        "a": "import b\n",
        "b": "from c import thing\n",
        "c": "from a import x\nif TYPE_CHECKING:\n    import d\ndef f():\n    import d\n",
        "d": "import c\n",
    }
    graph = {}
    for name, text in source.items():
        edges: set[str] = set()
        for node in module_level_imports(ast.parse(text)):
            edges |= imported_modules(node, name, False, set(source))
        graph[name] = edges
    assert graph["c"] == {"a"}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_relative_imports_resolve_against_the_package():
    node = ast.parse("from .x import y\nfrom . import z\n").body
    known = {"p", "p.x", "p.z"}
    assert imported_modules(node[0], "p.mod", False, known) == {"p.x"}
    assert imported_modules(node[1], "p", True, known) == {"p.z"}
