"""The CI rule: a skipped test (an engine not installed, say) fails the run when CI=true."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


@pytest.mark.parametrize(("ci", "status"), [("true", 1), ("", 0)])
def test_a_skipped_module_fails_only_in_ci(tmp_path, ci, status):
    (tmp_path / "test_engine.py").write_text(
        'import pytest\n\nnot_there = pytest.importorskip("no_such_engine")\n\n'
        "def test_engine():\n    pass\n"
    )
    (tmp_path / "test_fine.py").write_text("def test_fine():\n    pass\n")
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(TESTS)}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "ci_no_skips", "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == status, result.stdout
    if ci:
        assert "skipped in CI" in result.stdout and "no_such_engine" in result.stdout


def test_every_engine_the_app_can_pick_is_installed_in_ci():
    """The engines of `SUPPORTLM_BACKEND` whose tests need a package: importable in CI."""
    import importlib.util

    if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        pytest.skip("only CI promises every engine")
    assert importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python is not installed"
