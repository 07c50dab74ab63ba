"""The run directory one ``fieldid train`` creates: refusing an unusable ``--out``, writing the run's
first files, and taking them back when the run fails before it trained a step."""
from __future__ import annotations

import datetime as _dt
import os
import shutil
from pathlib import Path

from .config import TrainConfig
from .data import Split
from .records import PreprocessSpec, RunRecord, atomic_write_json

__all__ = ["RunError", "check_out_dir", "utc_now", "NewRun", "write_new_run"]


class RunError(ValueError):
    """The output/run directory cannot be used as asked (exists, unwritable, incomplete)."""


def check_out_dir(out: Path) -> None:
    if out.exists():
        if (out / "run.json").exists():
            raise RunError(f"{out}: a run already exists there; use --resume {out} or choose another --out")
        if not out.is_dir() or any(out.iterdir()):
            raise RunError(f"{out}: exists and is not empty; choose another --out")
    parent = out if out.exists() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise RunError(f"{out}: output location is not writable")


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class NewRun:
    """The run directory one ``train`` call creates, and how to take it back when the run fails."""

    def __init__(self, out: Path, *, existed: bool) -> None:
        self.out = out
        self.existed = existed  # an empty directory the user made: keep it, remove only what we wrote

    def remove(self) -> None:
        if not self.out.is_dir():
            return
        if not self.existed:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for child in self.out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def write_new_run(out: Path, cfg: TrainConfig, split: Split, spec: PreprocessSpec, record: RunRecord) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise RunError(f"{out}: output location is not writable ({e.strerror})") from None
    cfg.to_yaml(out / "config.yaml")
    split.to_json(out / "split.json")
    atomic_write_json(out / "labels.json", split.labels)
    spec.to_json(out / "preprocess.json")
    record.to_json(out / "run.json")
