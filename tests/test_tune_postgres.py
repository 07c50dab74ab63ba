"""``fieldid tune`` with two processes on one study in a real PostgreSQL server started by the test.

One process is killed with -9 in the middle of a trial; the other, started once the killed one's
heartbeat is stale, finishes the study: the killed trial is marked failed and retried (continued
from its checkpoint), and no trial counts twice.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

import pytest

from fieldid.serve.config import free_port
from fixtures_scaleout import wait_for

SPACE = """\
lr: {type: float, low: 1.0e-4, high: 2.0e-3, log: true}
label_smoothing: {type: float, low: 0.0, high: 0.2}
"""
TRIALS = 3
HEARTBEAT = 2  # seconds (--heartbeat)


def pg_bin() -> Path | None:
    """The PostgreSQL server binaries: ``FIELDID_PG_BIN``, else Debian's newest ``/usr/lib/postgresql/<v>/bin``
    (any version: the Makefile's system-deps accepts any), else the folder of an ``initdb`` on PATH."""
    if os.environ.get("FIELDID_PG_BIN"):
        return Path(os.environ["FIELDID_PG_BIN"])

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.parent.name)) or (0,)

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=version)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


def test_pg_bin_takes_any_installed_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PostgreSQL 16 or 17 install is found as well as 15 (the old path was hard-coded)."""
    made = []
    for v in ("9.6", "15", "17"):
        b = tmp_path / "usr/lib/postgresql" / v / "bin"
        b.mkdir(parents=True)
        (b / "initdb").write_text("")
        made.append(b)
    real_glob = glob.glob
    monkeypatch.setattr(glob, "glob", lambda pattern: real_glob(str(tmp_path) + pattern))
    monkeypatch.delenv("FIELDID_PG_BIN", raising=False)
    assert pg_bin() == made[-1]  # the newest, 17, not the lexically last
    monkeypatch.setenv("FIELDID_PG_BIN", str(made[1]))
    assert pg_bin() == made[1]


def _as_user() -> tuple[list[str], int, int]:
    """Command prefix that runs PostgreSQL as a non-root user (initdb refuses root), and its ids."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    for name in ("postgres", "nobody"):
        try:
            pw = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], pw.pw_uid, pw.pw_gid
    pytest.skip("running as root and no postgres/nobody user with runuser to run PostgreSQL as")


@contextlib.contextmanager
def pg_cluster(bin_dir: Path) -> Iterator[str]:
    """A throw-away PostgreSQL cluster of ``bin_dir``'s server on a free port; stopped and deleted afterwards.

    A server that does not initialise or start is a test failure (``pytest.fail``), never a skip.
    """
    prefix, uid, gid = _as_user()
    root = Path(tempfile.mkdtemp(prefix="fieldid-pg-", dir="/tmp"))  # pytest's tmp dirs are root-only (0700)
    os.chmod(root, 0o755)
    os.chown(root, uid, gid)
    data, port = root / "data", free_port()

    def pg(*cmd: str, timeout: int = 120) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=timeout)

    r = pg(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "fieldid", "--no-sync", "-E", "UTF8")
    if r.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"initdb ({bin_dir}) failed with {r.returncode}: {(r.stderr or r.stdout).strip()[-1000:]}")
    r = pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60", "-o",
           f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
    try:
        if r.returncode != 0:
            log = root / "server.log"
            pytest.fail(f"PostgreSQL ({bin_dir}) did not start (pg_ctl {r.returncode}): "
                        f"{log.read_text()[-1000:] if log.is_file() else r.stderr.strip()[-1000:]}")
        r = pg(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "fieldid", "tune")
        assert r.returncode == 0, r.stderr
        yield f"postgresql+psycopg://fieldid@127.0.0.1:{port}/tune"
    finally:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_a_server_that_does_not_initialise_is_a_failure_not_a_skip() -> None:
    fake = Path(tempfile.mkdtemp(prefix="fieldid-fake-pg-", dir="/tmp"))  # readable by the user runuser picks
    try:
        os.chmod(fake, 0o755)
        (fake / "initdb").write_text("#!/bin/sh\necho 'initdb: error: cannot be run as root' >&2\nexit 1\n")
        os.chmod(fake / "initdb", 0o755)
        with pytest.raises(pytest.fail.Exception, match="initdb .* failed with 1: initdb: error"):
            with pg_cluster(fake):
                pass
    finally:
        shutil.rmtree(fake, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """The cluster the study runs in. Missing software skips (and fails under CI=true,
    tests/fixtures_ci.py: `make test` installs it); a server that does not start fails."""
    pytest.importorskip("psycopg", reason="the `tune` extra (psycopg) is not installed")
    bin_dir = pg_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL server binaries not found (/usr/lib/postgresql/*/bin, PATH or FIELDID_PG_BIN; "
                    "Debian package postgresql)")
    with pg_cluster(bin_dir) as url:
        yield url


def _trial_with_checkpoint(out: Path) -> bool:
    """A trial of this process is mid-training: its run has a checkpoint and is not finished."""
    for run in out.glob("trial-*"):
        rec = run / "run.json"
        if (run / "checkpoints" / "last.ckpt").is_file() and rec.is_file() and '"training"' in rec.read_text():
            return True
    return False


def test_two_processes_share_a_postgres_study_and_survive_a_kill(postgres_url: str, tmp_path: Path,
                                                                 shapes_dir: Path, fieldid_proc) -> None:
    import optuna

    space = tmp_path / "space.yaml"
    space.write_text(SPACE)

    def args(out: Path) -> list[str]:
        return ["tune", "--data", str(shapes_dir), "--trials", str(TRIALS), "--out", str(out), "--space", str(space),
                "--storage", postgres_url, "--study", "shapes-pg", "--epochs", "3", "--image-size", "48",
                "--batch-size", "16", "--accelerator", "cpu", "--heartbeat", str(HEARTBEAT), "--pruner", "none",
                "--num-workers", "0"]

    out_a, out_b = tmp_path / "a", tmp_path / "b"
    a = fieldid_proc(*args(out_a))
    wait_for(lambda: _trial_with_checkpoint(out_a), a, 600, "process A's trial to checkpoint mid-training")
    os.killpg(a.pid, signal.SIGKILL)
    a.wait()
    killed = [p for p in out_a.glob("trial-*") if '"training"' in (p / "run.json").read_text()]
    assert killed, "A was killed after its trial finished, not in the middle of it"
    # B joins once A's heartbeat is stale (tune's grace period: 2 x HEARTBEAT). Joining earlier made the outcome a
    # race: on a fast machine B reached the study's target before its next ask could fail A's trial
    # (CI: the killed trial was left RUNNING). Here B's first ask fails it, deterministically.
    time.sleep(2 * HEARTBEAT + 2)
    b = fieldid_proc(*args(out_b))

    assert b.wait(timeout=900) == 0, Path(b.log_path).read_text()[-3000:]
    summary = json.loads(Path(b.log_path).read_text().strip().splitlines()[-1])
    assert summary["storage"] == postgres_url and summary["trials"]["complete"] == TRIALS

    study = optuna.load_study(study_name="shapes-pg", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    states = [t.state.name for t in trials]
    assert "RUNNING" not in states and "WAITING" not in states, states
    failed = [t for t in trials if t.state.name == "FAIL"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    # The killed trial: failed by B once its heartbeat went stale, then retried exactly once.
    assert len(failed) == 1 and failed[0].user_attrs["run"] == str(killed[0])
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == failed[0].number]
    assert len(retries) == 1 and retries[0].state.name == "COMPLETE"
    assert retries[0].params == failed[0].params
    # ... continued from its checkpoint in its own run directory, not restarted from epoch 0.
    assert retries[0].user_attrs["run"] == str(killed[0])
    assert min(retries[0].intermediate_values) >= 1
    assert json.loads((killed[0] / "run.json").read_text())["status"] == "trained"
    # No trial counted twice: exactly the target number complete, each with its own run.
    assert len(complete) == TRIALS
    assert len({t.user_attrs["run"] for t in complete}) == TRIALS
    assert len({t.number for t in trials}) == len(trials)
    assert summary["trials"] == {"fail": 1, "complete": TRIALS}
