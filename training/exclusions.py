"""Exclude files: photos training leaves out, with the reason, without touching the photos. Torch-free.

Format (``fieldid data check --write-exclude FILE`` writes it; people may edit it): one photo per
line, its path relative to the dataset root (POSIX ``/``; an absolute path inside the root works
too), optionally followed by ``  # reason``. Blank lines and lines starting with ``#`` are ignored.

    # fieldid data check data/reef (2026-12-06): 14 photos to leave out of training
    blue_tang/img_0042.jpg  # label issue: given blue_tang, looks like lionfish (score 0.97)
    lionfish/img_0007.jpg  # near-duplicate of lionfish/img_0003.jpg (cosine 0.991)

``fieldid train --exclude FILE`` hands the entries to :func:`fieldid.training.data.make_split`,
which drops them *after* splitting (every other photo stays in the split it would have had) and
records each one with its reason under ``excluded`` in the run's ``split.json``.
"""
from __future__ import annotations

import contextlib
import contextvars
import os
import re
from pathlib import Path
from typing import Iterator, Mapping

from .images import DataError
from .records import atomic_write_text

__all__ = ["active_exclusions", "excluding", "read_exclude_file", "resolve_entries", "write_exclude_file"]

_LINE = re.compile(r"^(?P<path>.*?)(?:\s+#\s?(?P<reason>.*))?$")
_ACTIVE: contextvars.ContextVar[tuple[str, dict[str, str]] | None] = contextvars.ContextVar(
    "fieldid_exclusions", default=None)


def read_exclude_file(path: str | os.PathLike) -> dict[str, str]:
    """``{relative or absolute path: reason}`` from an exclude file (reason ``""`` when none is given).

    Raises:
        DataError: missing or unreadable file.

    Example:
        >>> import tempfile
        >>> f = Path(tempfile.mkdtemp()) / "x.txt"
        >>> _ = f.write_text("# header\\na/1.jpg  # blurry\\nb/2.jpg\\n")
        >>> read_exclude_file(f)
        {'a/1.jpg': 'blurry', 'b/2.jpg': ''}
    """
    path = Path(path)
    try:
        # surrogateescape: a file name that is not UTF-8 was written as its own bytes, and must match them again.
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        raise DataError(f"{path}: exclude file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the exclude file ({type(e).__name__})") from None
    if "\x00" in text:
        raise DataError(f"{path}: cannot read the exclude file (binary content, not a list of paths)")
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        assert m is not None  # the pattern matches every string
        out[m.group("path").strip()] = (m.group("reason") or "").strip()
    return out


def write_exclude_file(path: str | os.PathLike, entries: Mapping[str, str], *, header: str = "") -> Path:
    """Write ``{relative path: reason}`` as an exclude file (atomically); ``header`` becomes comment lines."""
    lines = [f"# {h}" if h else "#" for h in header.splitlines()] if header else []
    for rel, reason in entries.items():
        if "\n" in rel or re.search(r"\s#", rel):
            continue  # a name the format cannot hold; the JSON report still lists it
        lines.append(f"{rel}  # {reason}" if reason else rel)
    return atomic_write_text(path, "\n".join(lines) + "\n", errors="surrogateescape")


@contextlib.contextmanager
def excluding(source: str | os.PathLike | Mapping[str, str] | None) -> Iterator[None]:
    """While active, :func:`fieldid.training.data.make_split` leaves these photos out.

    ``source`` is an exclude file or a ``{path: reason}`` mapping; None changes nothing. A
    context rather than a TrainConfig key, so the run's settings and ``fieldid tune``'s
    search space stay as they are; what was left out is recorded in ``split.json``.

    Example:
        >>> with excluding({"a/1.jpg": "blurry"}):  # doctest: +SKIP
        ...     train("data/reef", "runs/reef")
    """
    if source is None:
        yield
        return
    if isinstance(source, Mapping):
        value = ("(given)", dict(source))
    else:
        value = (str(source), read_exclude_file(source))
    token = _ACTIVE.set(value)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active_exclusions() -> tuple[str, dict[str, str]] | None:
    """``(source name, {path: reason})`` of the innermost :func:`excluding`, or None."""
    return _ACTIVE.get()


def resolve_entries(entries: Mapping[str, str], root: Path, known: set[str], source: str) -> dict[str, str]:
    """Entries as paths relative to ``root`` that are in ``known``; the rest are reported.

    Raises:
        DataError: entries were given but none names a photo of the dataset (a file written for
            another folder must not silently change nothing).
    """
    out: dict[str, str] = {}
    missing: list[str] = []
    root = root.resolve()
    for raw, reason in entries.items():
        p = Path(raw)
        if p.is_absolute():
            try:
                rel = p.resolve().relative_to(root).as_posix()
            except ValueError:
                missing.append(raw)
                continue
        else:
            rel = p.as_posix()
        if rel in known:
            out[rel] = reason
        else:
            missing.append(raw)
    if entries and not out:
        raise DataError(f"{source}: none of its {len(entries)} path(s) is a photo of {root} "
                        f"(paths are relative to the dataset root, e.g. {next(iter(sorted(known)), 'class/photo.jpg')})")
    if missing:
        import logging

        logging.getLogger(__name__).warning("%s: %d path(s) are not photos of %s and change nothing (first: %s)",
                                            source, len(missing), root, missing[0])
    return out
