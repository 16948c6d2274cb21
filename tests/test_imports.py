"""The first-party import graph, read from the source with ``ast``: no import cycles, and the
layering between the packages (a service imports only itself and ``shared``; ``shared``
imports no service). Every import counts, module-level or inside a function."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("shared", "services", "loadgen", "bench")


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # path:line of the import statement

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} ({self.where})"


def module_files() -> dict[str, Path]:
    """Every first-party module by its dotted name (a package by its ``__init__``)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def known_module(name: str, modules: dict[str, Path]) -> str | None:
    """The first-party module ``name`` loads: itself, or the nearest package that holds it
    (``from shared.model import Engine`` loads ``shared.model``)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in modules:
            return candidate
        parts.pop()
    return None


def imported_names(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The absolute dotted names one import statement asks for."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        # The package a relative import starts from: the module's own if it is a package.
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        prefix = ".".join([*base, node.module] if node.module else base)
    else:
        prefix = node.module or ""
    # ``from package import submodule`` imports the submodule; ``from module import name``
    # the module (both resolved to a first-party module by the caller).
    return [f"{prefix}.{alias.name}" for alias in node.names]


def import_edges() -> list[Edge]:
    modules = module_files()
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            for name in imported_names(node, module, is_package):
                target = known_module(name, modules)
                if target is not None and target != module:
                    edges.append(Edge(module, target, where))
    # One edge per statement and target (``from x import a, b`` names x once).
    return list(dict.fromkeys(edges))


def strongly_connected(nodes: list[str], edges: list[Edge]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    successors: dict[str, list[str]] = {node: [] for node in nodes}
    for edge in edges:
        successors[edge.source].append(edge.target)
    index: dict[str, int] = {}
    lowlink: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in nodes:
        if root in index:
            continue
        # Each frame: a node and the iterator over its successors still to visit.
        work: list[tuple[str, Iterator[str]]] = [(root, iter(successors[root]))]
        index[root] = lowlink[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, pending = work[-1]
            for successor in pending:
                if successor not in index:
                    index[successor] = lowlink[successor] = len(index)
                    stack.append(successor)
                    on_stack.add(successor)
                    work.append((successor, iter(successors[successor])))
                    break
                if successor in on_stack:
                    lowlink[node] = min(lowlink[node], index[successor])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    lowlink[parent] = min(lowlink[parent], lowlink[node])
                if lowlink[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def describe_cycles(components: list[list[str]], edges: list[Edge]) -> str:
    lines = []
    for component in components:
        members = set(component)
        lines.append("cycle: " + ", ".join(component))
        lines.extend(
            f"    {edge}" for edge in edges if edge.source in members and edge.target in members
        )
    return "\n".join(lines)


def test_the_graph_sees_the_imports_it_should() -> None:
    # A guard on the reader itself: an empty or unresolved graph would pass every rule below.
    modules = module_files()
    edges = {(edge.source, edge.target) for edge in import_edges()}
    assert {"shared.rpc", "services.scheduler.service", "loadgen.simulate"} <= set(modules)
    assert ("shared.rpc", "shared.codec") in edges  # module-level, absolute
    assert ("loadgen.simulate", "services.scheduler.policy") in edges


def test_a_relative_import_resolves_against_its_package() -> None:
    node = ast.parse("from ..model import engine\nfrom . import codec").body
    first, second = (n for n in node if isinstance(n, ast.ImportFrom))
    assert imported_names(first, "shared.loading.store", False) == ["shared.model.engine"]
    assert imported_names(second, "shared", True) == ["shared.codec"]


def test_the_cycle_finder_finds_cycles() -> None:
    edges = [Edge("a", "b", ""), Edge("b", "c", ""), Edge("c", "a", ""), Edge("c", "d", "")]
    components = strongly_connected(["a", "b", "c", "d"], edges)
    assert sorted(components) == [["a", "b", "c"], ["d"]]


def test_no_import_cycles_among_first_party_modules() -> None:
    edges = import_edges()
    components = strongly_connected(sorted(module_files()), edges)
    cycles = [component for component in components if len(component) > 1]
    assert not cycles, "import cycles:\n" + describe_cycles(cycles, edges)


def package_of(module: str) -> tuple[str, ...]:
    """``services.planner.policy`` -> ("services", "planner"); ``shared.rpc`` -> ("shared",)."""
    parts = module.split(".")
    return tuple(parts[:2]) if parts[0] == "services" else (parts[0],)


def test_a_service_imports_only_itself_and_shared() -> None:
    wrong = [
        edge
        for edge in import_edges()
        if edge.source.startswith("services.")
        and package_of(edge.target) not in (package_of(edge.source), ("shared",))
    ]
    assert not wrong, "a service imports another service:\n" + "\n".join(map(str, wrong))


def test_shared_imports_no_service() -> None:
    wrong = [
        edge
        for edge in import_edges()
        if package_of(edge.source) == ("shared",) and edge.target.split(".")[0] == "services"
    ]
    assert not wrong, "shared imports a service:\n" + "\n".join(map(str, wrong))
