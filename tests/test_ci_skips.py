"""The suite's CI rule (tests/fixtures_ci.py): under CI=true a skip fails the run, except a `gpu` test's."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent

PLANTED = '''
import pytest

pytestmark = []

def test_runs():
    assert True

@pytest.mark.gpu
def test_needs_cuda():
    pytest.skip("no CUDA here")

def test_missing_tool():
    pytest.skip("chromium not installed")

@pytest.fixture
def server():
    pytest.skip("initdb failed")

def test_uses_a_server(server):
    pass

@pytest.mark.skipif(True, reason="no npm")
def test_skipif():
    pass

@pytest.mark.xfail(reason="known bug")
def test_known_bug():
    assert False
'''

MODULE_SKIP = '''
import pytest

pytest.importorskip("no_such_module_fieldid_test")

def test_never_collected():
    pass
'''


def _pytest(folder: Path, ci: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(TESTS)
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "fixtures_ci", "-p", "no:cacheprovider", "-q", "-rA",
                           "-W", "ignore::pytest.PytestUnknownMarkWarning", str(folder)],
                          capture_output=True, text=True, cwd=folder, env=env, timeout=120)


def test_unexpected_skips_fail_under_ci_and_only_there(tmp_path: Path) -> None:
    (tmp_path / "test_planted.py").write_text(PLANTED)
    local = _pytest(tmp_path, None)
    assert local.returncode == 0 and "1 passed, 4 skipped, 1 xfailed" in local.stdout, local.stdout[-2000:]
    ci = _pytest(tmp_path, "true")
    out = ci.stdout
    assert ci.returncode == 1, out[-2000:]
    # Each skip that is not the CUDA one is a failure (or a setup error) naming why it skipped.
    for name, why in (("test_missing_tool", "chromium not installed"), ("test_uses_a_server", "initdb failed"),
                      ("test_skipif", "no npm")):
        line = next((ln for ln in out.splitlines() if name in ln and ("FAILED" in ln or "ERROR" in ln)), None)
        assert line is not None, (name, out[-3000:])
        assert "unexpected skip under CI=true" in out and why in out
    assert "SKIPPED" in out and "no CUDA here" in out  # the gpu test still just skips
    assert "PASSED test_planted.py::test_runs" in out and "XFAIL" in out
    assert _pytest(tmp_path, "false").returncode == 0


def test_a_module_skipped_at_collection_fails_under_ci(tmp_path: Path) -> None:
    (tmp_path / "test_module_skip.py").write_text(MODULE_SKIP)
    (tmp_path / "test_other.py").write_text("def test_runs():\n    assert True\n")
    assert _pytest(tmp_path, None).returncode == 0
    ci = _pytest(tmp_path, "true")
    assert ci.returncode == 1 and "unexpected skips under CI=true" in ci.stdout, ci.stdout[-2000:]
    assert "no_such_module_fieldid_test" in ci.stdout
