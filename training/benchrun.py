"""Running a benchmark's training commands in child processes, timed, each with its own log.

Shared by ``fieldid bench train`` (:mod:`fieldid.training.bench`) and ``fieldid bench real``
(:mod:`fieldid.training.bench_real`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["timed_run", "fieldid_train"]


def timed_run(cmd: list[str], log_path: Path) -> tuple[float, str]:
    t0 = time.perf_counter()
    with open(log_path, "w") as fh:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=fh, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed (exit {r.returncode}); see {log_path}")
    return time.perf_counter() - t0, r.stdout


def fieldid_train(folder: Path, run: Path, flags: list[str], log_path: Path) -> tuple[float, dict, dict]:
    """A fresh ``fieldid train`` run (an old ``run`` is removed first): seconds, metrics.json, run.json."""
    if run.exists():
        import shutil

        shutil.rmtree(run)
    secs, _ = timed_run([sys.executable, "-m", "fieldid", "train", "--data", str(folder), "--out", str(run), *flags],
                     log_path)
    return secs, json.loads((run / "metrics.json").read_text()), json.loads((run / "run.json").read_text())
