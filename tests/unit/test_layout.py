"""The package's layout: no import cycle between its modules, and no module over 600 lines.

The import graph is read from the source with :mod:`ast`, so every import counts: those
at module level, those inside functions (a lazy import still needs its module, and
only postpones the cycle to the first call), and those under ``if TYPE_CHECKING:`` (a
cycle the type checker walks is one a reader has to untangle too). Importing a module
of a subpackage first runs that subpackage's ``__init__``, so ``a.b.c`` also depends on
``a.b``; the root package is left out of that rule, because every module is imported
through it and it imports the public names of all of them.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import sqla_graphile

PACKAGE_DIR = Path(sqla_graphile.__file__).resolve().parent
MAX_LINES = 600


@dataclass(frozen=True)
class Edge:
    """``source`` needs ``target``, because of the import at ``path``:``line``."""

    source: str
    target: str
    path: Path
    line: int
    why: str  # the submodule imported, when the target is its package, run first

    def describe(self, root: Path) -> str:
        where = f"{self.path.relative_to(root.parent)}:{self.line}"
        via = f" ({self.why})" if self.why else ""
        return f"{self.source} -> {self.target}{via} at {where}"


def modules_of(package_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name, with its file and whether a package."""
    found: dict[str, tuple[Path, bool]] = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts.pop()
        found[".".join(parts)] = (path, is_package)
    return found


def _module_of(dotted: str, modules: dict[str, tuple[Path, bool]]) -> str | None:
    """The package module ``dotted`` names, or the one holding it (``None``: not ours)."""
    while dotted and dotted not in modules:
        dotted = dotted.rpartition(".")[0]
    return dotted or None


def _targets(
    node: ast.Import | ast.ImportFrom, package: str, modules: dict[str, tuple[Path, bool]]
) -> set[str]:
    """The package modules an import statement needs (written in package ``package``)."""
    if isinstance(node, ast.Import):
        found = {_module_of(alias.name, modules) for alias in node.names}
    else:
        if node.level:
            parts = package.split(".")
            base = parts[: len(parts) - (node.level - 1)]
            module = ".".join([*base, node.module] if node.module else base)
        else:
            module = node.module or ""
        asked = [f"{module}.{alias.name}" for alias in node.names]
        found = {dotted for dotted in asked if dotted in modules}
        if len(found) < len(asked):  # names defined in ``module`` itself
            found.add(_module_of(module, modules))
    return {target for target in found if target is not None}


def import_edges(package_dir: Path) -> list[Edge]:
    """Each import between modules of the package, wherever it is written."""
    modules = modules_of(package_dir)
    root = package_dir.name
    edges: list[Edge] = []
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            for target in sorted(_targets(node, package, modules)):
                if target != name:
                    edges.append(Edge(name, target, path, node.lineno, ""))
                # Importing ``a.b.c`` runs ``a.b`` first, unless the importer is inside it.
                parts = target.split(".")
                for cut in range(2, len(parts)):
                    parent = ".".join(parts[:cut])
                    if parent != root and name != parent and not name.startswith(parent + "."):
                        edges.append(Edge(name, parent, path, node.lineno, f"to import {target}"))
    return edges


def import_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """One cycle of each strongly connected group of modules (Tarjan's algorithm)."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {}).setdefault(edge.target, edge)
        graph.setdefault(edge.target, {})
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
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
        if node not in index:
            visit(node)
    return [_one_cycle(graph, group) for group in groups]


def _one_cycle(graph: dict[str, dict[str, Edge]], group: list[str]) -> list[Edge]:
    """The shortest way from the group's first module back to it, inside the group."""
    start, members = group[0], set(group)
    paths: dict[str, list[Edge]] = {start: []}
    queue = [start]
    for node in queue:
        for target, edge in sorted(graph[node].items()):
            if target == start:
                return [*paths[node], edge]
            if target in members and target not in paths:
                paths[target] = [*paths[node], edge]
                queue.append(target)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected group has one


def describe_cycles(cycles: list[list[Edge]], root: Path) -> str:
    return "\n".join(
        f"cycle {n}:\n" + "\n".join(f"  {edge.describe(root)}" for edge in cycle)
        for n, cycle in enumerate(cycles, 1)
    )


def test_no_import_cycle_between_the_package_modules() -> None:
    cycles = import_cycles(import_edges(PACKAGE_DIR))
    if cycles:
        pytest.fail(f"{len(cycles)} import cycle(s):\n" + describe_cycles(cycles, PACKAGE_DIR))


def test_no_module_is_over_600_lines() -> None:
    sizes = [
        (len(path.read_text(encoding="utf-8").splitlines()), path.relative_to(PACKAGE_DIR.parent))
        for path, _ in modules_of(PACKAGE_DIR).values()
    ]
    over = sorted((size for size in sizes if size[0] > MAX_LINES), reverse=True)
    if over:
        pytest.fail(
            f"{len(over)} module(s) over {MAX_LINES} lines:\n"
            + "\n".join(f"  {path}: {lines} lines" for lines, path in over)
        )


def test_the_cycle_check_sees_lazy_type_checking_and_package_imports(tmp_path: Path) -> None:
    """The check above finds the cycles it promises to, on a package made for it."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from .a import A\n",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "b.py": "def f():\n    from pkg import a\n",
        "c.py": "from .sub.leaf import x\n",
        "sub/__init__.py": "from .leaf import x\nfrom ..c import y\n",
        "sub/leaf.py": "x = 1\n",
        "d.py": "import pkg.e\n",
        "e.py": "from . import d\n",
        "free.py": "from .sub import leaf\nfrom . import a\n",
    }
    for relative, text in files.items():
        (package / relative).write_text(text)
    cycles = import_cycles(import_edges(package))
    found = sorted(sorted(edge.source for edge in cycle) for cycle in cycles)
    assert found == [
        ["pkg.a", "pkg.b"],  # under TYPE_CHECKING one way, inside a function the other
        ["pkg.c", "pkg.sub"],  # pkg.sub.leaf runs pkg.sub, which imports pkg.c
        ["pkg.d", "pkg.e"],  # ``import pkg.e`` and ``from . import d``
    ]
    text = describe_cycles(cycles, package)
    assert "pkg.c -> pkg.sub (to import pkg.sub.leaf) at pkg/c.py:1" in text
    assert "pkg.a -> pkg.b at pkg/a.py:3" in text
