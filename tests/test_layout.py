"""The package layout keeps its promises (docs/ARCHITECTURE.md): short modules and functions,
imports that only point down the layers, Gradio in the UI package alone."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "supportlm"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported (function-level imports are lazy, left out)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=module_name)
def test_modules_and_functions_are_short(path: Path) -> None:
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("supportlm.engines", ("supportlm.train", "supportlm.serve")),
        ("supportlm.train", ("supportlm.serve",)),
        ("supportlm.serve", ("supportlm.train",)),
    ],
)
def test_layers_do_not_import_each_other(layer: str, forbidden: tuple[str, ...]) -> None:
    offenders = {
        module_name(path): sorted(i for i in top_level_imports(path) if i.startswith(forbidden))
        for path in MODULES
        if module_name(path).startswith(layer)
    }
    assert len(offenders) >= 3  # the layer exists: the check is not vacuous
    assert {name: imports for name, imports in offenders.items() if imports} == {}


def test_only_the_ui_package_imports_gradio() -> None:
    importers = {
        module_name(path)
        for path in MODULES
        if any(name.split(".")[0] == "gradio" for name in top_level_imports(path))
    }
    assert importers and all(name.startswith("supportlm.serve.ui") for name in importers)


def test_the_architecture_map_lists_every_module(repo_root: Path) -> None:
    text = (repo_root / "docs" / "ARCHITECTURE.md").read_text()
    names = {module_name(path).removeprefix("supportlm.") for path in MODULES}
    assert sorted(name for name in names if f"| `{name}` |" not in text) == []
