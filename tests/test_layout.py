"""The shape of the code base: no import cycles, one-way dependencies between the packages, small
modules and functions, no private name used across modules.

Imports are read from the AST of every module, wherever they stand: at the top, inside a function
(a lazy import), or under ``if TYPE_CHECKING:``. Importing ``a.b.c`` from outside the package
``a.b`` also runs ``a/__init__.py`` and ``a/b/__init__.py`` first, so it counts as importing them
too: that is how a re-export in a package's ``__init__`` turns into a cycle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("space", "search", "reform", "evaluators")
MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 60
# Longer than the limits, and why.
EXCEPTIONS: dict[str, str] = {}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imported(name: str, source: str | None = None) -> list[tuple[str, int]]:
    """(project module, line) of every import in module ``name`` (or in ``source``, as if it were
    that module), resolved to modules."""
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8") if source is None else source)
    package = name if is_package(name) else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.append((target if target in MODULES else base, node.lineno))
    return [(target, line) for target, line in found if target.split(".")[0] in PACKAGES]


def edges(name: str, source: str | None = None) -> set[str]:
    """Modules that importing ``name`` runs: each import's target and the ancestor packages of
    the target that ``name`` is not inside of."""
    out = set()
    for target, _ in imported(name, source):
        parts = target.split(".")
        for i in range(1, len(parts) + 1):
            ancestor = ".".join(parts[:i])
            inside = name == ancestor or name.startswith(ancestor + ".")
            if ancestor in MODULES and (ancestor == target or not inside):
                out.add(ancestor)
    out.discard(name)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return result


def test_the_cycle_finder_sees_lazy_and_package_cycles():
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


def test_lazy_type_checking_and_package_imports_are_edges():
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from search.config import SearchConfig
def later():
    from reform.rectify import rectify
    import evaluators.data
"""
    assert edges("space.subnet", source) == {"search", "search.config", "reform", "reform.rectify", "evaluators",
                                             "evaluators.data"}
    # inside its own package a module does not re-run the package's __init__
    assert edges("space.views", "from space.scores.base import LayerScores") == {"space.scores", "space.scores.base"}
    graph = {name: edges(name) for name in MODULES}
    graph["space.subnet"] = graph["space.subnet"] | edges("space.subnet", source)
    assert cycles(graph)  # the same lazy import in the real tree would be a cycle


def test_no_import_cycles():
    graph = {name: edges(name) for name in MODULES}
    assert cycles(graph) == []


ALLOWED = {
    # package: what it may import from the other packages (prefixes of module names)
    "space": (),
    "evaluators": ("space.errors",),
    "reform": ("space", "evaluators.data"),
    "search": ("space", "reform", "evaluators"),
}


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    wrong = []
    for name in MODULES:
        if name.split(".")[0] != package:
            continue
        for target, line in imported(name):
            if target.split(".")[0] == package:
                continue
            if not any(target == p or target.startswith(p + ".") for p in ALLOWED[package]):
                wrong.append(f"{name}:{line} imports {target}")
    assert wrong == []


def test_modules_and_functions_are_short():
    long = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES and name not in EXCEPTIONS:
            long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in EXCEPTIONS:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert long == []


def test_no_private_name_crosses_a_module():
    crossing = []
    for name in MODULES:
        tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PACKAGES:
                crossing += [f"{name} imports {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert crossing == []
