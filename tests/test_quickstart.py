"""The newcomer's path, as a test: a fresh clone, a fresh virtual environment, the README's
quick-start commands as written, and `python app.py` serving the shipped fine-tuned adapter.

Marked slow (two installs into a new venv from pip's cache, two app starts: minutes); CI runs it.
The clone is of the committed HEAD, so what is tested is what a user would clone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from gradio_client import Client
from helpers import free_port

from supportlm.run_folder import SHIPPED_ADAPTER, RunFolder

pytestmark = pytest.mark.slow

APP = " && python app.py"


def readme_command(readme: str, name: str) -> str:
    """The shell command between ``<!-- NAME -->`` and ``<!-- /NAME -->`` in the README."""
    block = re.search(rf"<!-- {re.escape(name)} -->\n```bash\n(.+?)\n```\n<!-- /", readme, re.S)
    assert block, f"README.md has no {name} block"
    return block.group(1).strip()


def run(command: str, cwd: Path, env: dict[str, str], timeout_s: float) -> None:
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", command], cwd=cwd, env=env,
        capture_output=True, text=True, timeout=timeout_s,
    )  # fmt: skip
    output = f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert done.returncode == 0, f"{command!r} failed:\n{output}"


def serve(command: str, cwd: Path, env: dict[str, str], log: Path, timeout_s: float = 600):
    """Start `command` (the README's ``python app.py``) on a free port; the process and its URL
    once it answers."""
    port = free_port()
    env = {**env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port)}
    with log.open("w") as out:
        process = subprocess.Popen(
            ["bash", "-c", f"exec {command}"], cwd=cwd, env=env, stdout=out, stderr=out
        )
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"{command} exited:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{command} not up in {timeout_s} s:\n{log.read_text()}"
        try:
            with urllib.request.urlopen(url, timeout=2):
                return process, url
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.5)


def start_and_ask(clone: Path, env: dict[str, str], log: Path) -> tuple[dict, str]:
    """`python app.py` as the README writes it: what `/info` says, and a reply from `/chat`."""
    process, url = serve("python app.py", clone, env, log)
    try:
        client = Client(url, verbose=False)
        info = client.predict(api_name="/info")
        reply = client.predict("How do I cancel my order?", api_name="/chat", max_new_tokens=48)
    finally:
        process.terminate()
        process.wait(60)
    return info, reply


@pytest.fixture(scope="module")
def newcomer(tmp_path_factory, repo_root: Path):
    """A clone of HEAD and the environment of a fresh venv (pip's cache shared, as on a machine
    that installed before)."""
    folder = tmp_path_factory.mktemp("newcomer")
    clone = folder / "supportlm"
    subprocess.run(["git", "clone", "-q", str(repo_root), str(clone)], check=True)
    venv = folder / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("SUPPORTLM_", "GRADIO_"))}
    keep.pop("PYTHONPATH", None)
    env = {**keep, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{keep['PATH']}"}
    readme = (clone / "README.md").read_text()
    yield clone, env, readme
    shutil.rmtree(folder, ignore_errors=True)


def test_the_quick_start_serves_the_shipped_adapter_then_the_fast_engine(newcomer) -> None:
    clone, env, readme = newcomer
    command = readme_command(readme, "quickstart:app-command")
    assert command.endswith(APP), "the quick start must end by starting the app"
    run(command.removesuffix(APP), clone, env, timeout_s=1200)
    shipped = RunFolder(SHIPPED_ADAPTER).adapter_version()

    # As written: no llama.cpp in this venv, so the shipped adapter on the compile-free
    # CTranslate2 engine, and why.
    info, reply = start_and_ask(clone, env, clone / "app-plain.log")
    assert info["engine"] == "ctranslate2", info
    assert "llama-cpp-python is not installed" in info["why"] and "no compiler" in info["why"]
    assert (info["adapter"], info["adapter_version"]) == (SHIPPED_ADAPTER.name, shipped)
    assert info["adapter_shipped"] and info["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "/" not in info["adapter"]  # a name, never a server path
    assert sum(c.isalpha() for c in reply) >= 20

    # The README's optional fast engine (pip's cached wheel), then the same start.
    run(readme_command(readme, "quickstart:fast-engine"), clone, env, timeout_s=1500)
    info, reply = start_and_ask(clone, env, clone / "app-fast.log")
    assert info["engine"] == "llama.cpp", info
    assert info["adapter_version"] == shipped and info["adapter_shipped"]
    assert sum(c.isalpha() for c in reply) >= 20
