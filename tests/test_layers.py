"""The packages form floors: each imports only the ones below it (and megatron_bridge never
Prefect), so the Megatron core is usable alone and nothing loops back up."""

from __future__ import annotations

import ast

import pytest

from tests.conftest import ROOT

FLOORS = ["settings", "megatron_bridge", "tasks", "flows"]


def imported_roots(package: str) -> dict[str, set[str]]:
    """Top-level module → the files of `package` importing it (lazy imports included)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0
                     else [])
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return found


@pytest.mark.parametrize("package", FLOORS)
def test_a_package_imports_only_the_floors_below_it(package):
    above = FLOORS[FLOORS.index(package) + 1:]
    roots = imported_roots(package)
    assert not {name: roots[name] for name in above if name in roots}
    if package in ("settings", "megatron_bridge"):
        assert "prefect" not in roots, roots.get("prefect")
