"""``fieldid train --resume``: which settings a resumed run may change, and the CSV log rows a
resume must keep (Lightning's CSVLogger empties the file when it continues a run)."""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from .config import TrainConfig
from .records import atomic_write_bytes
from .rundir import RunError

__all__ = ["RESUME_SAFE", "apply_resume_overrides", "read_log_rows", "prepend_log_rows"]

log = logging.getLogger("fieldid.train")


# Settings a resumed run may change: they alter how long or on what it trains, never what the
# finished run means (data, split, model, image size, schedule shape and seed stay the run's own).
RESUME_SAFE = ("epochs", "num_workers", "cache", "accelerator", "precision")


def _flag_name(key: str) -> str:
    """The ``fieldid train`` flag that sets config ``key``."""
    return {"pretrained": "--no-pretrained", "augment.hue": "--no-hue", "cache": "--no-cache",
            "precision": "--train-precision"}.get(
        key, "--" + key.replace("_", "-"))


def apply_resume_overrides(out: Path, cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``cfg`` with the safe ``overrides`` applied (in memory; :func:`train` saves it once every check
    passed); any other key is refused."""
    given = {k: v for k, v in overrides.items() if v is not None}
    refused = sorted(k for k in given if k not in RESUME_SAFE)
    if refused:
        flags = ", ".join(_flag_name(k) for k in refused)
        safe = ", ".join(_flag_name(k) for k in RESUME_SAFE)
        raise RunError(f"--resume continues {out} with its own settings; {flags} cannot change on resume "
                       f"(can: {safe}; for other settings start a new run with --out)")
    if not given:
        return cfg
    log.info("resume: applying %s", ", ".join(f"{k}={v}" for k, v in given.items()))
    return cfg.replace(**given)


def read_log_rows(path: Path, upto_epoch: int) -> list[dict[str, str]]:
    """CSV-log rows of epochs ``<= upto_epoch`` (Lightning's CSVLogger empties the file on resume)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if (r.get("epoch") or "").isdigit() and int(r["epoch"]) <= upto_epoch]


def prepend_log_rows(path: Path, rows: list[dict[str, str]]) -> None:
    """Put the epochs logged before a resume back in front of the resumed run's CSV log."""
    new: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="") as fh:
            new = list(csv.DictReader(fh))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows + new for k in r)), restval="")
    writer.writeheader()
    writer.writerows(rows + new)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))
