"""The placement package imports only downward: each module from the ones before it in
`moirai.placement.LAYERS`, never from one after it (no import loops, lazy imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import moirai.placement
from moirai.placement import LAYERS

PACKAGE = Path(moirai.placement.__file__).parent


def _imports(path: Path) -> set[str]:
    """The placement modules a file imports, at any depth of its code."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "moirai.placement":
                out |= {alias.name for alias in node.names}
            elif node.module.startswith("moirai.placement."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out |= {
                a.name.split(".")[2] for a in node.names if a.name.startswith("moirai.placement.")
            }
    return out


def test_every_module_is_in_a_layer() -> None:
    modules = {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert modules == set(LAYERS)


def test_imports_go_only_downward() -> None:
    for n, module in enumerate(LAYERS):
        below = set(LAYERS[:n])
        for name in _imports(PACKAGE / f"{module}.py"):
            assert name in below, f"{module} imports {name}, which is not below it"
