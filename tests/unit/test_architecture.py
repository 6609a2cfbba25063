"""The package boundaries of DESIGN.md, checked on the source: pure core, I/O at the edges.

Only direct imports are read (from the AST, `TYPE_CHECKING` blocks and function bodies
included); nothing is imported, so a broken module cannot hide a violation.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OURS = frozenset({"config", "connectors", "routing", "reconciliation", "gateway"})
IO_LIBRARIES = frozenset({"aiohttp", "httpx", "asyncpg"})

# package -> top-level modules it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "routing": IO_LIBRARIES | (OURS - {"routing", "config"}),
    "reconciliation": IO_LIBRARIES | {"gateway", "routing"},
    "connectors": frozenset({"asyncpg", "gateway", "routing", "reconciliation"}),
    "config": OURS - {"config"},
}


def imported_top_levels(source: str, package: str) -> Iterator[tuple[int, str]]:
    """(line, top-level module) for every import in `source`, a module of `package`."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level > 0:  # relative: stays inside the package (or climbs out of it)
                yield node.lineno, package if node.level == 1 else "<parent package>"
            elif node.module is not None:
                yield node.lineno, node.module.partition(".")[0]


def violations(package: str) -> list[str]:
    forbidden = FORBIDDEN[package] | {"<parent package>"}
    found = []
    for path in sorted((ROOT / package).rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        for line, module in imported_top_levels(source, package):
            if module in forbidden:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_stay_inside_its_boundary(package: str) -> None:
    assert (ROOT / package / "__init__.py").is_file()
    assert violations(package) == []


def test_the_check_reads_the_modules_it_guards() -> None:
    routing_imports = {
        module
        for path in (ROOT / "routing").rglob("*.py")
        for _, module in imported_top_levels(path.read_text(encoding="utf-8"), "routing")
    }
    assert "config" in routing_imports


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("import aiohttp", "aiohttp"),
        ("import httpx.transports", "httpx"),
        ("from asyncpg import Pool", "asyncpg"),
        ("from gateway.store import db", "gateway"),
        ("def f():\n    import gateway.app\n", "gateway"),
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import asyncpg\n", "asyncpg"),
        ("from . import rules", "routing"),
        ("from .. import gateway", "<parent package>"),
    ],
)
def test_the_check_sees_every_form_of_import(source: str, module: str) -> None:
    assert module in {m for _, m in imported_top_levels(source, "routing")}
