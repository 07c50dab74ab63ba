"""Fixtures for the scale-out tests (tune, DDP, kill -9 / resume)."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest

__all__ = ["one_thread", "fieldid_proc"]  # fixtures; tests import the helpers directly

ROOT = Path(__file__).resolve().parents[1]


def scaleout_env() -> dict[str, str]:
    """One intra-op thread per process: on a shared 2-core box more threads spin 10x slower."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture
def one_thread() -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fieldid_proc(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen]]:
    """Start ``fieldid ARGS`` in the background; every process still alive at teardown is killed."""
    procs: list[subprocess.Popen] = []

    def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = open(tmp_path / f"proc{len(procs)}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", "fieldid", *map(str, args)], cwd=ROOT,
                             env={**scaleout_env(), **(env or {})},
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        p.log_path = tmp_path / f"proc{len(procs)}.log"  # type: ignore[attr-defined]
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, 9)  # its own session: DDP children go too
            p.wait()


def log_rows(run: Path) -> list[dict[str, str]]:
    """Complete rows of RUN/logs/metrics.csv (tolerates a line being written right now)."""
    path = run / "logs" / "metrics.csv"
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if (r.get("epoch") or "").isdigit() and None not in r.values()]


def wait_for(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float, what: str) -> None:
    """Poll ``cond`` until true; fail with the process log if it exits or time runs out."""
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None or time.monotonic() > end:
            tail = Path(proc.log_path).read_text()[-3000:]  # type: ignore[attr-defined]
            pytest.fail(f"gave up waiting for {what} (rc={proc.poll()}):\n{tail}")
        time.sleep(0.2)
