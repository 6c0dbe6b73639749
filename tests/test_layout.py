"""The package layout keeps its promises (docs/ARCHITECTURE.md): short modules and functions,
imports that only point down the layers and never in a circle (function-level imports too),
Gradio in the UI package alone, and a module map generated from the tree."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

from supportlm import figures
from supportlm.reference import imports, module_name, module_table, modules

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "supportlm"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


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
        ("supportlm.feedback", ("supportlm.serve", "supportlm.train", "supportlm.cli")),
        ("supportlm.engines", ("supportlm.feedback", "supportlm.cli")),
        ("supportlm.train", ("supportlm.feedback",)),
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


def import_graph() -> dict[str, set[str]]:
    """Each module's supportlm imports, module- and function-level (a submodule's import of its
    own package is not an edge: the package is already being imported)."""
    known = modules()
    graph = {}
    for name, path in known.items():
        targets = set().union(*imports(path, known)) - {name}
        graph[name] = {m for m in targets if not name.startswith(f"{m}.")}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles a depth-first walk meets, each as the path that closes it."""
    state: dict[str, str] = {}
    path: list[str] = []
    found: list[list[str]] = []

    def walk(node: str) -> None:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                found.append([*path[path.index(target) :], target])
            elif target not in state:
                walk(target)
        state[node] = "done"
        path.pop()

    for node in sorted(graph):
        if node not in state:
            walk(node)
    return found


def test_no_import_circle_anywhere_function_level_imports_included() -> None:
    graph = import_graph()
    assert sum(len(targets) for targets in graph.values()) > 100  # the graph is really read
    assert circles(graph) == []


def test_the_circle_check_finds_a_circle() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_architecture_map_is_generated_from_the_tree(repo_root: Path) -> None:
    text = (repo_root / "docs" / "ARCHITECTURE.md").read_text()
    assert module_table() in text, "run: python -m supportlm.reference"
    names = {module_name(path).removeprefix("supportlm.") for path in MODULES}
    assert sorted(name for name in names if f"| `{name}` |" not in text) == []


ROOT = PACKAGE.parents[1]
MAX_README_LINES = 250  # a guide; the reference lives in docs/
LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_the_readme_is_a_guide_and_every_local_link_resolves() -> None:
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= MAX_README_LINES
    broken = [
        f"{page.relative_to(ROOT)}: {target}"
        for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]
        for target in LINK.findall(page.read_text())
        if "://" not in target and not (page.parent / target).exists()
    ]
    assert broken == []


SURFACES = ("supportlm.serve.ui", "supportlm.serve.v1")
#: What the assistant's pipeline does (capping, task calls, storing): no surface does it itself.
PIPELINE = ("supportlm.serve.tasks", "supportlm.serve.conversation", "supportlm.feedback.store")
TABS = ("about", "chat", "compare", "insights", "summarise", "translate")


def test_every_surface_is_a_thin_adapter_over_the_assistant() -> None:
    known = modules()
    surfaces = {
        name: set().union(*imports(path, known))
        for name, path in known.items()
        if name.startswith(SURFACES)
    }
    assert len(surfaces) >= 8
    reaching_in = {
        name: sorted(i for i in found if i.startswith(PIPELINE)) for name, found in surfaces.items()
    }
    assert {name: found for name, found in reaching_in.items() if found} == {}
    # The API imports no tab module, and /v1 nothing of the UI.
    tabs = {f"supportlm.serve.ui.{tab}" for tab in TABS}
    assert not surfaces["supportlm.serve.ui.api"] & tabs
    assert not any(
        i.startswith("supportlm.serve.ui")
        for name, found in surfaces.items()
        if name.startswith("supportlm.serve.v1")
        for i in found
    )


def test_the_readme_figures_are_written_from_their_bench_reports(repo_root: Path) -> None:
    readme = (repo_root / "README.md").read_text()
    speed, quality = figures.speed_table(), figures.quality_table()
    assert speed in readme and quality in readme, "run: python -m supportlm.reference"
    ct2_run = json.loads((figures.RESULTS / figures.SPEED_RUNS["ctranslate2"]).read_text())
    assert f"| {ct2_run['app_streaming']['decode_tok_s']:.1f} |" in speed
    evaluation = json.loads((figures.RESULTS / figures.QUALITY_RUNS[0]).read_text())
    assert f"| {evaluation['tuned']['chrf']:.1f} |" in quality
