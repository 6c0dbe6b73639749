"""supportlm's commands: ``python -m supportlm <command> [flags]``, one module per command.

    python -m supportlm train      # fine-tune a LoRA adapter (finetune/configs/default.yaml)
    python -m supportlm evaluate   # base against tuned on held-out data; --against OLD
    python -m supportlm merge      # the adapter merged into a standalone model folder
    python -m supportlm feedback   # export, review, loop, erase, purge, handovers
    python -m supportlm align      # a KTO/DPO stage from exported feedback
    python -m supportlm promote    # serve a candidate only if it is better; --rollback
    python -m supportlm ship       # make a run the adapter shipped in the repository

The ``finetune/*.py`` scripts are the same commands under their documented names. Each module
has a ``main(argv) -> int`` and is imported only when its command runs (training imports are
slow; ``--help`` of one command does not pay for the others).
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

SOURCE_ROOT = Path(__file__).resolve().parents[2]  # the folder that holds the package

COMMANDS = {
    "train": "fine-tune a LoRA adapter",
    "evaluate": "score the base model and an adapter on held-out data",
    "merge": "merge an adapter into its base model",
    "feedback": "the feedback store: export, review, loop, erase, purge, handovers",
    "align": "a preference stage (KTO or DPO) from exported feedback",
    "promote": "serve a candidate adapter only if it is better, or roll back",
    "ship": "make a run the adapter shipped in the repository",
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [f"  {name:<{width}}  {job}" for name, job in COMMANDS.items()]
    return "usage: python -m supportlm <command> [flags]\n\ncommands:\n" + "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command with the remaining arguments; its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    sys.argv[0] = f"python -m supportlm {command}"  # what argparse's usage line names
    return importlib.import_module(f"supportlm.cli.{command}").main(rest)


def subprocess_command(command: str, *args: str) -> list[str]:
    """The argv that runs `command` in a new Python process (the loop's stages, Insights)."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}")
    return [sys.executable, "-m", "supportlm", command, *args]


def subprocess_env() -> dict[str, str]:
    """This environment, with the package importable where it is not installed (a Space runs
    the source tree: app.py puts ``src`` on ``sys.path``, which a child does not inherit)."""
    path = os.pathsep.join(p for p in (str(SOURCE_ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}
