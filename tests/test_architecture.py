"""The house's dependency rules, checked on the source: arrows point one way."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cakep2p"
NETWORKING = ("cakep2p.mesh", "cakep2p.stage", "cakep2p.wire", "cakep2p.discovery", "cakep2p.node",
              "cakep2p.cluster", "cakep2p.security", "zmq", "zeroconf")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, relative imports resolved against the cakep2p package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def imports_any(path: Path, prefixes: tuple[str, ...]) -> list[str]:
    return sorted(name for name in imported_modules(path) if name.startswith(prefixes))


@pytest.mark.parametrize("module", ["planner.py", "wire.py"])
def test_pure_modules_import_nothing_from_cakep2p(module):
    assert imports_any(PACKAGE / module, ("cakep2p",)) == []


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").glob("*.py")), ids=lambda path: path.name)
def test_engine_knows_nothing_of_networking_or_qt(path):
    assert imports_any(path, NETWORKING + ("PySide6", "cakep2p.gui")) == []


@pytest.mark.parametrize("module", ["mesh.py", "stage.py", "stage_parts.py", "discovery.py", "discovery_records.py", "node.py", "cluster.py", "weights.py"])
def test_core_modules_never_import_qt(module):
    assert imports_any(PACKAGE / module, ("PySide6", "cakep2p.gui")) == []


def test_headless_node_loads_no_qt():
    code = ("import sys, cakep2p.cli, cakep2p.commands.serve, cakep2p.node, cakep2p.cluster; "
            "cakep2p.cli.build_parser(); cakep2p.cli.build_serve_parser(); "
            "print(sorted(name for name in sys.modules if name.startswith(('PySide6', 'cakep2p.gui'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
