"""The runtime's import graph: development tools stay outside it."""

from __future__ import annotations

import ast
from pathlib import Path

import onlinemodel_runtime

PACKAGE = Path(onlinemodel_runtime.__file__).parent


def _imported_modules(tree: ast.AST) -> list[tuple[str, ast.AST]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module if node.level == 0 else "." * node.level + node.module, node))
    return found


def _enclosing_functions(tree: ast.AST) -> dict[ast.AST, str]:
    owner = {}
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(fn):
                owner.setdefault(node, fn.name)
    return owner


def test_no_runtime_module_imports_the_devtools():
    offenders = []
    modules = [p for p in PACKAGE.rglob("*.py") if "devtools" not in p.relative_to(PACKAGE).parts]
    assert len(modules) > 20, modules
    for path in modules:
        tree = ast.parse(path.read_text(), str(path))
        owner = _enclosing_functions(tree)
        for name, node in _imported_modules(tree):
            if "devtools" not in name:
                continue
            # The one exception: `onlinemodel prepare-model` runs the SmolLM2 conversion when asked.
            if path.name == "cli.py" and owner.get(node) == "prepare_model_cmd":
                continue
            offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {name}")
    assert not offenders, offenders
