"""A pytest plugin: in CI (``CI=true``) a skipped test fails the run.

CI installs every engine the app can pick (llama.cpp included), Chromium and the Bitext sample,
so a skip there means something the tests should have checked was not checked, e.g. the
llama.cpp tests skipped because llama-cpp-python failed to install. Locally, skips stay skips.
"""

from __future__ import annotations

import os

import pytest

_skipped: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:  # a whole module, e.g. pytest.importorskip("llama_cpp")
        _skipped.append(f"{report.nodeid}: {report.longrepr[-1] if report.longrepr else ''}")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
        _skipped.append(f"{report.nodeid}: {reason}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _in_ci() and _skipped and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _in_ci() and _skipped:
        terminalreporter.section("skipped in CI (every test must run there)", red=True)
        for line in _skipped:
            terminalreporter.line(line)
