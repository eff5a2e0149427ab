"""The house's rules, checked on the source of every module (globbed): arrows point one way, no file imports another
in a loop (lazy and TYPE_CHECKING imports count), and modules and functions stay small."""

from __future__ import annotations

import ast
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cakep2p"
MODULES = sorted(PACKAGE.rglob("*.py"))
NETWORKING = ("cakep2p.mesh", "cakep2p.wire", "cakep2p.discovery", "cakep2p.node", "cakep2p.cluster",
              "cakep2p.security", "cakep2p.network", "cakep2p.api", "zmq", "zeroconf")
QT = ("PySide6", "cakep2p.gui")
SHELLS = {"window": ("cakep2p.gui",), "command line": ("cakep2p.commands",)}
LAUNCHERS = ("cakep2p.cli", "cakep2p.__main__")  # `cakep2p`: opens the window, or runs a command, or --serve
MAX_TOP_LEVEL_MODULES = 13
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60
LAYOUT_FUNCTIONS = {"cakep2p/gui/window.py:_build"}  # widget layout reads better whole


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def label(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


@lru_cache(maxsize=None)
def imported_modules(path: Path) -> frozenset[str]:
    """Every module a file imports anywhere in it (top level, in functions, under TYPE_CHECKING), relative imports
    resolved; `from package import name` counts as importing both the package and package.name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return frozenset(names)


FILES = {module_name(path): path for path in MODULES}


def file_dependencies(path: Path) -> set[Path]:
    """The cakep2p files this one imports: a module name is its file (a package its __init__)."""
    return {FILES[name] for name in imported_modules(path) if name in FILES and FILES[name] != path}


def imports_any(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported_modules(path) if name == prefixes or name.startswith(prefixes))


def in_package(prefixes: tuple[str, ...]) -> list[Path]:
    return [path for path in MODULES if module_name(path).startswith(prefixes)]


def below_the_shells() -> list[Path]:
    shells = tuple(prefix for prefixes in SHELLS.values() for prefix in prefixes) + LAUNCHERS
    return [path for path in MODULES if not module_name(path).startswith(shells)]


# -- dependency rules ----------------------------------------------------------------------------------------------

def test_no_file_imports_another_in_a_loop():
    graph = {path: file_dependencies(path) for path in MODULES}
    state: dict[Path, str] = {}
    cycles: list[list[str]] = []

    def visit(path: Path, trail: list[Path]) -> None:
        state[path] = "open"
        for dependency in sorted(graph[path]):
            if state.get(dependency) == "open":
                cycles.append([label(item) for item in trail[trail.index(dependency):]] + [label(dependency)])
            elif dependency not in state:
                visit(dependency, trail + [dependency])
        state[path] = "done"

    for path in MODULES:
        if path not in state:
            visit(path, [path])
    assert cycles == []


PURE_PACKAGES = ("cakep2p.planner", "cakep2p.wire")
PURE_HELPERS = ("cakep2p.units",)   # imports only the standard library: pure packages may share it


@pytest.mark.parametrize("path", in_package(PURE_PACKAGES), ids=label)
def test_pure_modules_import_nothing_from_cakep2p(path):
    own = next(package for package in PURE_PACKAGES if module_name(path).startswith(package))
    assert [name for name in imports_any(path, ("cakep2p",))
            if not name.startswith((own, *PURE_HELPERS))] == []


def test_the_pure_helpers_import_nothing_from_cakep2p():
    for name in PURE_HELPERS:
        path = PACKAGE.parent / (name.replace(".", "/") + ".py")
        assert imports_any(path, ("cakep2p",)) == [], name


@pytest.mark.parametrize("path", in_package(("cakep2p.engine",)), ids=label)
def test_engine_knows_nothing_of_networking_or_qt(path):
    assert imports_any(path, NETWORKING + QT) == []


@pytest.mark.parametrize("path", below_the_shells(), ids=label)
def test_nothing_below_the_shells_imports_qt_or_a_shell(path):
    shells = tuple(prefix for prefixes in SHELLS.values() for prefix in prefixes) + LAUNCHERS
    assert imports_any(path, QT + shells) == []


@pytest.mark.parametrize("shell", SHELLS)
def test_no_shell_imports_another_shell(shell):
    others = tuple(prefix for name, prefixes in SHELLS.items() if name != shell for prefix in prefixes)
    found = {label(path): imports_any(path, others + LAUNCHERS) for path in in_package(SHELLS[shell])}
    assert {name: hits for name, hits in found.items() if hits} == {}


def test_headless_node_loads_no_qt():
    code = ("import sys, cakep2p.cli, cakep2p.commands.serve, cakep2p.node, cakep2p.cluster; "
            "cakep2p.cli.build_parser(); cakep2p.cli.build_serve_parser(); "
            "print(sorted(name for name in sys.modules if name.startswith(('PySide6', 'cakep2p.gui'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# -- sizes ---------------------------------------------------------------------------------------------------------

def test_the_package_root_holds_few_modules_besides_its_packages():
    top_level = sorted(path.name for path in PACKAGE.glob("*.py"))
    assert len(top_level) <= MAX_TOP_LEVEL_MODULES, top_level


@pytest.mark.parametrize("path", MODULES, ids=label)
def test_modules_and_functions_stay_small(path):
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES
    long_functions = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES and f"{label(path)}:{node.name}" not in LAYOUT_FUNCTIONS:
                long_functions.append(f"{node.name} ({length} lines)")
    assert long_functions == []
