"""Writing a bundle safely: staging folder, atomic swap, cleanup of what dead exports left.

The finished staging folder replaces the old bundle only when the export writes one (something
passed its bar; with ``--strict`` everything did), and only a folder that *is* a fieldid bundle (its ``manifest.json`` reads as a fieldid manifest) is ever
replaced; the pid in staging names lets a later export tell a dead process's leftovers from a
running one's.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from fieldid.records import replace_dir

from .registry import ExportError

__all__ = ["check_writable", "make_stage", "swap_in", "clean_leftovers", "is_fieldid_bundle"]

log = logging.getLogger("fieldid.export")


def swap_in(stage: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``stage`` folder; the old bundle survives any failure.

    Raises:
        ExportError: the new bundle could not be moved into place (the old one is put back).
    """
    try:
        replace_dir(stage, out)
    except OSError as e:
        raise ExportError(f"{out}: could not move the new bundle into place ({e.strerror or e}); "
                          f"the previous bundle is unchanged") from None


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)(?:-.*)?")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def clean_leftovers(out: Path) -> None:
    """Remove ``.NAME.staging-PID-*`` / ``.NAME.old-PID`` folders left by exports that died (killed, power cut).

    An ``old`` folder whose bundle is missing means the process died between moving the old
    bundle aside and moving the new one in: the old bundle is put back instead of deleted.
    Folders of a process that is still running (a concurrent export) are left alone.
    """
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m or m["name"] != out.name or not p.is_dir() or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists():
            log.warning("restoring the bundle %s left aside by a dead export (pid %s)", out, m["pid"])
            os.replace(p, out)
        else:
            log.info("removing %s, left by a dead export (pid %s)", p, m["pid"])
            shutil.rmtree(p, ignore_errors=True)


# Keys every fieldid manifest has had since schema 1 (newer ones only add keys).
_MANIFEST_KEYS = ("schema_version", "name", "labels", "preprocess", "backbone", "source_run", "artifacts")


def is_fieldid_bundle(folder: Path) -> bool:
    """True when ``folder/manifest.json`` is a fieldid manifest (JSON object with its keys), not any file of that name."""
    try:
        d = json.loads((folder / "manifest.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(d, dict) and all(k in d for k in _MANIFEST_KEYS) and isinstance(d["artifacts"], list)
            and isinstance(d["labels"], list) and isinstance(d["schema_version"], int))


def check_writable(out: Path) -> None:
    """Bad ``--out`` fails here, before anything is created (the parent is made only after validation)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not is_fieldid_bundle(out):
        # The finished bundle *replaces* the folder: never do that to a folder of someone's files
        # (a folder holding some other tool's manifest.json included).
        raise ExportError(f"{out}: exists, is not empty and is not a fieldid bundle (no fieldid manifest.json); "
                          f"nothing was changed; choose another --out")
    existing = out.parent.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder mkdir(parents=True) would create the rest in
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: output location is not writable")


def make_stage(out: Path) -> Path:
    """A new, empty staging folder next to ``out`` (same filesystem, so the final rename is atomic)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # The pid in the name lets a later export tell a dead process's leftovers from a running one's.
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"{out}: output location is not writable ({e.strerror or e})") from None
    os.chmod(stage, 0o755)  # mkdtemp's 0700 would hide the bundle from a server running as another user
    return stage
