"""``python -m supportlm <command>``: one entry point; the finetune/ scripts are wrappers of it."""

from __future__ import annotations

import ast
import os
import subprocess
from pathlib import Path

import pytest

from supportlm.cli import COMMANDS, main, subprocess_command

ROOT = Path(__file__).resolve().parents[1]
OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}


def test_without_a_command_it_lists_every_command(capsys) -> None:
    assert main([]) == 2
    listed = capsys.readouterr().out
    assert all(f"  {name} " in listed for name in COMMANDS)


def test_an_unknown_command_is_a_clear_error(capsys) -> None:
    assert main(["trian"]) == 2
    assert "error: unknown command 'trian'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown command"):
        subprocess_command("trian")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_each_command_is_a_module_with_a_main_and_a_script(command: str) -> None:
    module = ROOT / "src" / "supportlm" / "cli" / f"{command}.py"
    functions = {
        n.name for n in ast.parse(module.read_text()).body if isinstance(n, ast.FunctionDef)
    }
    assert "main" in functions
    # The documented script is a wrapper: a docstring, one import, the __main__ guard.
    script = ast.parse((ROOT / "finetune" / f"{command}.py").read_text())
    assert len(script.body) == 3
    assert ast.unparse(script.body[1]) == f"from supportlm.cli.{command} import main"


def test_the_module_entry_point_runs_a_command_in_a_new_process() -> None:
    done = subprocess.run(
        [*subprocess_command("promote"), "--help"], capture_output=True, text=True, env=OFFLINE
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: python -m supportlm promote")


def test_every_script_in_finetune_is_a_command() -> None:
    assert {p.stem for p in (ROOT / "finetune").glob("*.py")} == set(COMMANDS)
