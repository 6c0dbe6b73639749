"""Reference text generated from what the code declares, so the docs cannot drift from it.

A Markdown file marks each generated part with ``<!-- generated:NAME -->`` and
``<!-- /generated:NAME -->``; `GENERATORS` maps NAME to the function that writes it (today the
settings table, from `supportlm.serve.settings`). ``python -m supportlm.reference`` rewrites the
parts in place; ``--check`` only reports the ones that differ (and a test runs it).

Generated today: the settings tables (``docs/settings.md``, from `supportlm.serve.settings`) and
the module map (``docs/ARCHITECTURE.md``: each module's lines, its one job as the first
paragraph of its docstring says it, and what it imports from supportlm, read with `ast`), and the
README's speed and quality tables, from the bench reports in ``docs/results/`` (`figures`).
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from collections.abc import Callable
from dataclasses import MISSING, Field, fields
from pathlib import Path

from supportlm import figures
from supportlm.serve.settings import GROUPS

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = Path(__file__).resolve().parent


def _default(spec: Field) -> str:
    if spec.metadata["shown"] is not None:
        return spec.metadata["shown"]
    value = spec.default if spec.default is not MISSING else spec.default_factory()  # type: ignore[misc]
    if value is None or value == "":
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    return f"`{value}`" if isinstance(value, str) else str(value)


def _bounds(spec: Field) -> str:
    if spec.metadata["choices"]:
        return ", ".join(f"`{choice}`" for choice in spec.metadata["choices"])
    return f"≥ {spec.metadata['ge']:g}" if spec.metadata["ge"] is not None else ""


def settings_table() -> str:
    """One table per settings group: variable, default, bounds, what it does."""
    parts = []
    for group in GROUPS:
        rows = [
            f"| `{spec.metadata['env']}` | {_default(spec)} | {_bounds(spec)} | "
            f"{spec.metadata['help'].replace('|', '/')} |"
            for spec in fields(group)
        ]
        header = ["| Variable | Default | Bounds | What it does |", "|---|---|---|---|"]
        parts.append("\n".join([f"### {group.title}", "", *header, *rows]))
    return "\n\n".join(parts)


def module_name(path: Path) -> str:
    """``supportlm.serve.settings`` for ``src/supportlm/serve/settings.py``."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imported(node: ast.AST, known: dict[str, Path]) -> set[str]:
    """The supportlm modules one import statement names (``from a import b``: ``a.b`` if a
    module)."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names if alias.name in known}
    if not isinstance(node, ast.ImportFrom) or node.module is None:
        return set()
    named = {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in named if name in known} | ({node.module} & known.keys())


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING")


def imports(path: Path, known: dict[str, Path]) -> tuple[set[str], set[str]]:
    """(module-level, function-level) supportlm imports of `path`; ``if TYPE_CHECKING:`` blocks
    are left out (they never run)."""
    tree = ast.parse(path.read_text())
    top: set[str] = set()
    for node in tree.body:
        top |= _imported(node, known)
    lazy: set[str] = set()
    checking = {id(n) for block in tree.body if _type_checking(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) not in checking:
            lazy |= _imported(node, known)
    return top, lazy - top


def _short(names: set[str]) -> str:
    return ", ".join(sorted(name.removeprefix("supportlm.") for name in names))


def module_table() -> str:
    """Every module: lines, its one job (its docstring's first paragraph), its imports."""
    known = modules()
    rows = ["| module | lines | job | imports |", "|---|---:|---|---|"]
    for name, path in known.items():
        doc = (ast.get_docstring(ast.parse(path.read_text())) or "").split("\n\n")[0]
        top, lazy = imports(path, known)
        used = _short(top - {name}) + (f" (lazily: {_short(lazy)})" if lazy else "")
        lines = len(path.read_text().splitlines())
        job = " ".join(doc.split()).replace("|", "/")
        rows.append(f"| `{name.removeprefix('supportlm.') or 'supportlm'}` | {lines} | {job} | "
                    f"{used or '-'} |")  # fmt: skip
    return "\n".join(rows)


GENERATORS: dict[str, Callable[[], str]] = {
    "settings": settings_table,
    "modules": module_table,
    "speed": figures.speed_table,
    "quality": figures.quality_table,
}
BLOCK = re.compile(r"(<!-- generated:(\w+) -->\n)(.*?)(<!-- /generated:\2 -->)", re.DOTALL)


def render(text: str) -> str:
    """`text` with every generated block written anew."""
    return BLOCK.sub(lambda m: f"{m[1]}{GENERATORS[m[2]]()}\n{m[4]}", text)


def stale(paths: list[Path]) -> list[Path]:
    """The files whose generated blocks differ from what the code declares."""
    return [path for path in paths if render(path.read_text()) != path.read_text()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args(argv)
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for path in stale(paths):
        print(f"{path}: generated blocks are stale", file=sys.stderr)
        if not args.check:
            path.write_text(render(path.read_text()))
    return 1 if args.check and stale(paths) else 0


if __name__ == "__main__":
    raise SystemExit(main())
