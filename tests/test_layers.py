"""The layers' one-way dependencies, checked on the source: core <- platform <- devices <- tools.

Owns: the rule that a lower layer never imports a higher one, and that the core does no I/O
(no socket, subprocess, selectors, mmap or file opening modules).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "xentools"
ORDER = ["core", "platform", "devices", "tools"]
# Modules whose presence in the core would mean I/O.
IO_MODULES = {"socket", "subprocess", "selectors", "mmap", "asyncio", "select", "ctypes", "cffi",
              "threading", "signal"}


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _layer_files(layer: str) -> list[Path]:
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files, f"layer {layer} has no modules"
    return files


@pytest.mark.parametrize("layer", ORDER)
def test_no_import_of_a_higher_layer(layer):
    higher = {f"xentools.{name}" for name in ORDER[ORDER.index(layer) + 1:]}
    bad = []
    for path in _layer_files(layer):
        for name in _imports(path):
            if any(name == h or name.startswith(h + ".") for h in higher):
                bad.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert not bad, "\n".join(bad)


def test_core_does_no_io():
    bad = [f"{path.relative_to(PACKAGE.parent)} imports {name}"
           for path in _layer_files("core") for name in _imports(path)
           if name.split(".")[0] in IO_MODULES]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_module_says_what_it_owns(path):
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{path} has no module docstring"
