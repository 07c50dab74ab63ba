"""Under CI (``CI=true``) a skipped test is a failed test, unless it is the expected GPU skip.

A skip hides the check it skips: on CI a missing Chromium, PostgreSQL or npm package would otherwise
turn the headline tests into a green run that checked nothing. ``make test`` installs what the suite
needs, so on CI the only expected skip is a test marked ``gpu`` on a machine without CUDA.

conftest.py imports the hooks; ``tests/test_ci_skips.py`` runs them on planted skips.
"""
from __future__ import annotations

import os
from typing import Any, Iterator

import pytest

__all__ = ["on_ci", "pytest_runtest_makereport", "pytest_collectreport", "pytest_sessionfinish",
           "pytest_terminal_summary"]

EXPECTED_SKIP_MARKER = "gpu"
_UNEXPECTED: list[str] = []  # collection-time skips (a whole module), reported at the end


def on_ci() -> bool:
    """True when the ``CI`` environment variable says so (GitHub Actions, GitLab and most others set CI=true)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


def _reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if not (on_ci() and report.skipped) or hasattr(report, "wasxfail"):
        return
    if item.get_closest_marker(EXPECTED_SKIP_MARKER) is not None:
        return  # the CUDA path on a machine without a GPU: the one expected skip
    report.outcome = "failed"
    report.longrepr = (f"unexpected skip under CI=true ({_reason(report.longrepr)}): install what the test needs "
                       f"(`make test` does) or mark it `{EXPECTED_SKIP_MARKER}` if it needs CUDA")


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if on_ci() and report.skipped:
        _UNEXPECTED.append(f"{report.nodeid}: {_reason(report.longrepr)}")


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _UNEXPECTED and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if _UNEXPECTED:
        terminalreporter.section("unexpected skips under CI=true", sep="=", red=True)
        for line in _UNEXPECTED:
            terminalreporter.line(line)
