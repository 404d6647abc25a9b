"""Layers import one way: specs <- trainers <- cluster <- orchestrator.

A module may import its own layer and the layers below it, never one above (also not inside a
function, where an upward import would hide until run time), and no two modules of one layer
import each other."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["specs", "trainers", "cluster", "orchestrator"]


def _imports(path: Path) -> set[str]:
    """Every stillhouse module `path` imports, anywhere in the file (dotted names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.split(".")[0] in LAYERS}


def _modules() -> dict[str, Path]:
    return {f"{layer}.{p.stem}": p for layer in LAYERS for p in (ROOT / layer).glob("*.py")
            if p.stem != "__init__"}


def test_no_layer_imports_a_layer_above_it():
    upward = []
    for module, path in _modules().items():
        rank = LAYERS.index(module.split(".")[0])
        for name in _imports(path):
            if LAYERS.index(name.split(".")[0]) > rank:
                upward.append(f"{module} imports {name}")
    assert not upward, upward


def test_no_import_cycle_between_modules():
    modules = _modules()
    edges = {m: {n for n in _imports(p) if n in modules and n != m} for m, p in modules.items()}
    cycles = sorted(f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and a in edges[b])
    assert not cycles, cycles


def test_the_specs_layer_is_light():
    """specs imports pydantic and yaml only (besides the standard library)."""
    allowed = {"pydantic", "yaml", "specs"}
    import sys

    for path in (ROOT / "specs").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed or top in sys.stdlib_module_names or top == "__future__", (
                    f"{path.name} imports {name}")
