"""Dataset health check: counts, skipped files, duplicates, split leakage, tiny images.

Torch-free on purpose: ``fieldid data check`` must be fast to start and must run where only
the data lives. The check only *reads* the dataset; it never moves, rewrites or deletes a file.

Every image is read once (bytes for a SHA-256, then a full decode via :func:`load_rgb`, which
is what training does too, so "readable here" means "readable in training"). Every file in a
class folder that training will not use is listed in ``skipped`` with its reason, in the words
of :mod:`fieldid.intake`: unsupported format, unreadable, too large. Perceptual hashes
(``imagehash.phash``, 64 bits) are packed into ``uint64`` and compared all-pairs with numpy in
row blocks, so a few thousand images take well under a second for that step.

Paths in a :class:`DataReport` are POSIX paths relative to the dataset root, so a JSON report
is the same wherever the dataset is mounted.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import imagehash
import numpy as np

from fieldid.intake import ACCEPTED_NAMES

from .images import DataError, ImageError, load_rgb, scan_image_folder
from .records import atomic_write_json

__all__ = [
    "DEFAULT_NEAR_THRESHOLD",
    "DEFAULT_MIN_SIDE",
    "DataReport",
    "check_dataset",
    "format_report",
    "hamming_pairs",
    "main_check",
]

DEFAULT_NEAR_THRESHOLD = 4
DEFAULT_MIN_SIDE = 32
# Print a progress line every this many files (only datasets at least this big print anything).
PROGRESS_EVERY = 200
# Upper bound on the elements of one (rows x n) distance block: ~4M uint64 = 32 MB per temp
# array, so memory stays flat however many images there are.
_BLOCK_ELEMENTS = 1 << 22
# How many paths format_report lists per finding before summarising the rest.
_SHOW_MAX = 10

# SWAR popcount constants (Hacker's Delight 5-2), used when numpy lacks bitwise_count (< 2.0).
_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@dataclass
class DataReport:
    """Result of :func:`check_dataset`; ``to_dict()`` gives the JSON form.

    Attributes:
        root: the dataset folder as given.
        presplit: True for a ``train/`` [``val/``, ``test/``] tree, False for a flat one.
        counts: split (``"all"`` when flat) -> class -> number of *readable* images.
        imbalance_ratio: largest / smallest class count in ``train`` (or ``all``);
            ``inf`` when some class has no readable image (``None`` in JSON).
        unreadable: ``"path: reason"`` for every photo file that fails :func:`load_rgb`.
        skipped: one ``{"file", "reason", "detail"}`` per file of a class folder that training
            will not use: every unreadable one, and files that are not photos by name (``.gif``,
            ``.txt``, RAW, ...). ``reason`` is ``"unsupported format"``, ``"unreadable"`` or
            ``"too large"`` (over the pixel limit); hidden files are ignored.
        exact_duplicates: groups (>= 2) of byte-identical files.
        near_duplicates: groups (>= 2) of perceptually similar files (phash Hamming distance
            <= ``near_threshold``, linked transitively). Byte-identical copies are collapsed
            to the first file of their exact group, so a group is never just exact copies.
        leakage: one dict per duplicate or near-duplicate pair whose members sit in different
            splits (``"cross-split"``) and/or carry different class labels
            (``"conflicting-labels"``); see :func:`check_dataset` for the keys.
        tiny_images: files whose shorter side (after EXIF rotation) is < ``min_side``.
        ok: True when every finding list above is empty (the imbalance ratio is information,
            not a failure: class weights handle it).
        near_threshold: the Hamming threshold used.
        min_side: the minimum side used.
    """

    root: str
    presplit: bool
    counts: dict[str, dict[str, int]]
    imbalance_ratio: float
    unreadable: list[str] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    exact_duplicates: list[list[str]] = field(default_factory=list)
    near_duplicates: list[list[str]] = field(default_factory=list)
    leakage: list[dict[str, Any]] = field(default_factory=list)
    tiny_images: list[str] = field(default_factory=list)
    ok: bool = True
    near_threshold: int = DEFAULT_NEAR_THRESHOLD
    min_side: int = DEFAULT_MIN_SIDE

    def to_dict(self) -> dict[str, Any]:
        """A strict-JSON-able dict (``inf`` imbalance becomes ``None``: JSON has no infinity)."""
        d = asdict(self)
        if not math.isfinite(self.imbalance_ratio):
            d["imbalance_ratio"] = None
        return d


@dataclass
class _Entry:
    """One readable image, as the duplicate search sees it."""

    rel: str
    split: str
    label: str
    sha256: str
    phash: int


class _Progress:
    """Counter that prints ``label i/total`` on stderr every ``every`` items when enabled."""

    def __init__(self, label: str, total: int, *, enabled: bool, every: int | None = None,
                 stream: TextIO | None = None) -> None:
        every = every or PROGRESS_EVERY  # looked up per call so callers/tests can tune it
        # Small datasets finish instantly; progress lines there would only be noise.
        self.enabled = enabled and total >= every
        self.label, self.total, self.every = label, total, every
        self.stream = stream if stream is not None else sys.stderr

    def step(self, i: int) -> None:
        """Report that ``i`` items (1-based) are done."""
        if self.enabled and (i % self.every == 0 or i == self.total):
            print(f"datacheck: {self.label} {i}/{self.total}", file=self.stream, flush=True)


def _popcount64_swar(x: np.ndarray) -> np.ndarray:
    """Set bits per element of a ``uint64`` array by bit tricks (for numpy < 2.0)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)  # uint64 multiply wraps, which is what SWAR wants


def _popcount64(x: np.ndarray) -> np.ndarray:
    """Number of set bits of each element of a ``uint64`` array."""
    if hasattr(np, "bitwise_count"):  # numpy >= 2.0: one hardware popcount per element
        return np.bitwise_count(x)
    return _popcount64_swar(x)


def hamming_pairs(hashes: Sequence[int] | np.ndarray, threshold: int) -> list[tuple[int, int, int]]:
    """All index pairs ``(i, j, distance)`` with ``i < j`` and Hamming distance <= ``threshold``.

    Vectorised all-pairs comparison of 64-bit hashes, done in row blocks to bound memory.
    """
    h = np.asarray(hashes, dtype=np.uint64)
    n = len(h)
    out: list[tuple[int, int, int]] = []
    if n < 2 or threshold < 0:
        return out
    rows = max(1, _BLOCK_ELEMENTS // n)
    for start in range(0, n - 1, rows):
        stop = min(start + rows, n - 1)
        # Only columns > start can pair with any row in the block (upper triangle).
        dist = _popcount64(h[start:stop, None] ^ h[None, start + 1:])
        ii, jj = np.nonzero(dist <= threshold)
        jj_abs = jj + start + 1
        keep = jj_abs > ii + start  # drop the lower triangle inside the block
        for i, j, dd in zip((ii + start)[keep], jj_abs[keep], dist[ii, jj][keep]):
            out.append((int(i), int(j), int(dd)))
    return out


def _phash64(image: Any) -> int:
    """The 64-bit ``imagehash.phash`` of a PIL image as a Python int (row-major, MSB first)."""
    bits = imagehash.phash(image).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def _components(n: int, pairs: Iterable[tuple[int, int]]) -> list[list[int]]:
    """Connected components (size >= 2) of the graph on ``range(n)`` with edges ``pairs``."""
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving keeps trees shallow
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = find(a), find(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(n):
        groups.setdefault(find(i), []).append(i)
    return sorted((sorted(g) for g in groups.values() if len(g) > 1), key=lambda g: g[0])


def _leak(entries: list[_Entry], i: int, j: int, match: str, distance: int) -> dict[str, Any] | None:
    """The leakage record for duplicate pair ``(i, j)``, or None if both share split and label.

    The file listed first in the dataset (train before val before test) is always ``a``.
    """
    a, b = entries[min(i, j)], entries[max(i, j)]
    kinds = []
    if a.split != b.split:
        kinds.append("cross-split")
    if a.label != b.label:
        kinds.append("conflicting-labels")
    if not kinds:
        return None
    return {"kinds": kinds, "match": match, "distance": distance, "a": a.rel, "b": b.rel,
            "splits": [a.split, b.split], "labels": [a.label, b.label]}


def check_dataset(root: str | Path, *, near_threshold: int = DEFAULT_NEAR_THRESHOLD,
                  min_side: int = DEFAULT_MIN_SIDE, progress: bool = True) -> DataReport:
    """Check an ImageFolder tree (flat or pre-split) without modifying it.

    Leakage dicts have keys ``kinds`` (``["cross-split"]``, ``["conflicting-labels"]`` or
    both), ``match`` (``"exact"`` or ``"near"``), ``distance`` (phash Hamming distance, 0 for
    exact), ``a``/``b`` (relative paths), ``splits`` and ``labels`` (``[a's, b's]``).

    Raises:
        DataError: from :func:`scan_image_folder` (missing or empty folder, < 2 classes, ...).
    """
    root_path = Path(root)
    listing = scan_image_folder(root_path)

    files: list[tuple[Path, str, str]] = [
        (p, split, label)
        for split, classes in listing.splits.items()
        for label, paths in classes.items()
        for p in paths
    ]
    counts: dict[str, dict[str, int]] = {s: {c: 0 for c in cls} for s, cls in listing.splits.items()}
    unreadable: list[str] = []
    skipped: list[dict[str, str]] = []
    tiny: list[str] = []
    entries: list[_Entry] = []

    bar = _Progress("read", len(files), enabled=progress)
    for i, (path, split, label) in enumerate(files, 1):
        rel = path.relative_to(root_path).as_posix()
        try:
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            image = load_rgb(path)
        except OSError as e:  # could not even read the bytes (permissions, vanished file, ...)
            detail = f"{type(e).__name__}: {e.strerror or e}"
            unreadable.append(f"{rel}: {detail}")
            skipped.append({"file": rel, "reason": "unreadable", "detail": detail})
        except ImageError as e:
            # load_rgb (and PIL inside it) put the full path in the message; keep it relative.
            detail = str(e).removeprefix(f"{path}: ").replace(str(path), rel)
            unreadable.append(f"{rel}: {detail}")
            skipped.append({"file": rel, "reason": e.reason, "detail": detail})
        else:
            counts[split][label] += 1
            if min(image.size) < min_side:
                tiny.append(rel)
            entries.append(_Entry(rel, split, label, sha, _phash64(image)))
            image.close()
        bar.step(i)
    for path in listing.others:
        kind = path.suffix.lower() or "a file without extension"
        skipped.append({"file": path.relative_to(root_path).as_posix(), "reason": "unsupported format",
                        "detail": f"{kind} files are not read; accepted: {ACCEPTED_NAMES}"})
    order_of = {p.relative_to(root_path).as_posix(): k for k, p in
                enumerate(sorted([f for f, _, _ in files] + listing.others))}
    skipped.sort(key=lambda r: order_of[r["file"]])

    # Exact duplicates: group by content hash; the first file of a group represents it below.
    by_sha: dict[str, list[int]] = {}
    for idx, e in enumerate(entries):
        by_sha.setdefault(e.sha256, []).append(idx)
    exact_groups = [g for g in by_sha.values() if len(g) > 1]
    reps = [g[0] for g in by_sha.values()]
    members = {g[0]: g for g in by_sha.values()}

    # Near duplicates among representatives only, so byte-identical copies never count twice.
    near_pairs = hamming_pairs([entries[r].phash for r in reps], near_threshold)
    near_groups = [[reps[k] for k in comp] for comp in _components(len(reps), ((a, b) for a, b, _ in near_pairs))]

    leakage: list[dict[str, Any]] = []
    for g in exact_groups:
        for x in range(len(g)):
            for y in range(x + 1, len(g)):
                rec = _leak(entries, g[x], g[y], "exact", 0)
                if rec:
                    leakage.append(rec)
    for a, b, dist in near_pairs:
        # A near pair stands for every byte-identical copy on either side.
        for ia in members[reps[a]]:
            for ib in members[reps[b]]:
                rec = _leak(entries, ia, ib, "near", dist)
                if rec:
                    leakage.append(rec)
    # Listing order (split, class, file name) everywhere, so train-side files come first.
    order = {e.rel: k for k, e in enumerate(entries)}
    leakage.sort(key=lambda r: (order[r["a"]], order[r["b"]]))

    main = counts["train" if listing.presplit else "all"]
    smallest, largest = min(main.values()), max(main.values())
    imbalance = largest / smallest if smallest else math.inf

    def paths(groups: list[list[int]]) -> list[list[str]]:
        return [[entries[i].rel for i in sorted(g)] for g in sorted(groups, key=min)]

    report = DataReport(
        root=str(root),
        presplit=listing.presplit,
        counts=counts,
        imbalance_ratio=imbalance,
        unreadable=unreadable,
        skipped=skipped,
        exact_duplicates=paths(exact_groups),
        near_duplicates=paths(near_groups),
        leakage=leakage,
        tiny_images=tiny,
        near_threshold=near_threshold,
        min_side=min_side,
    )
    report.ok = not (report.unreadable or report.skipped or report.exact_duplicates or report.near_duplicates
                     or report.leakage or report.tiny_images)
    return report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Plain-text table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return [line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)]


def _finding(title: str, items: list[str]) -> list[str]:
    """A summary line plus up to ``_SHOW_MAX`` indented items."""
    lines = [f"{title}: {len(items)}"]
    lines += [f"  {it}" for it in items[:_SHOW_MAX]]
    if len(items) > _SHOW_MAX:
        lines.append(f"  ... and {len(items) - _SHOW_MAX} more (see the JSON report)")
    return lines


def format_report(report: DataReport) -> str:
    """Human-readable report: class counts per split, imbalance ratio, then one block per finding."""
    splits = list(report.counts)
    classes = sorted({c for cls in report.counts.values() for c in cls})
    header = ["class", *splits] + (["total"] if len(splits) > 1 else [])
    rows = []
    for c in classes:
        cells = [report.counts[s].get(c, 0) for s in splits]
        rows.append([c, *map(str, cells)] + ([str(sum(cells))] if len(splits) > 1 else []))
    totals = [sum(report.counts[s].values()) for s in splits]
    rows.append(["total", *map(str, totals)] + ([str(sum(totals))] if len(splits) > 1 else []))

    layout = f"pre-split: {', '.join(splits)}" if report.presplit else "flat, split at train time"
    lines = [f"dataset: {report.root} ({layout})", "", *_table(header, rows), ""]
    basis = "train" if report.presplit else "all"
    if math.isfinite(report.imbalance_ratio):
        ratio = f"{report.imbalance_ratio:.2f}"
    else:
        ratio = "inf (a class has no readable image)"
    lines.append(f"imbalance ratio ({basis}, largest/smallest class): {ratio}")
    lines.append("")
    lines += _finding("skipped files (training will not use them)",
                      [f"{r['file']}: {r['reason']} ({r['detail']})" for r in report.skipped])
    lines += _finding("exact duplicate groups", [", ".join(g) for g in report.exact_duplicates])
    lines += _finding(f"near-duplicate groups (phash distance <= {report.near_threshold})",
                      [", ".join(g) for g in report.near_duplicates])
    lines += _finding("leaking pairs (cross-split or conflicting labels)",
                      [f"{r['a']} <-> {r['b']} [{', '.join(r['kinds'])}; {r['match']}, distance {r['distance']}]"
                       for r in report.leakage])
    lines += _finding(f"tiny images (shorter side < {report.min_side} px)", report.tiny_images)
    lines.append("")
    lines.append("OK: no problems found" if report.ok else "PROBLEMS FOUND: review the findings above")
    return "\n".join(lines)


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fieldid data check",
        description="Check an image folder (flat <class>/ or pre-split train|val|test/<class>/) for "
                    "files training would skip (unsupported format, unreadable, too large), "
                    "duplicates, split leakage and tiny images. Read-only.",
    )
    p.add_argument("dir", metavar="DIR", help="dataset root folder")
    p.add_argument("--json", metavar="PATH", default=None,
                   help="write the JSON report to PATH, atomically (default: no file; the JSON is "
                        "printed as the last line of stdout)")
    p.add_argument("--near-threshold", type=int, default=DEFAULT_NEAR_THRESHOLD, metavar="N",
                   help="max perceptual-hash (phash) Hamming distance for near duplicates "
                        "(default: %(default)s)")
    p.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE, metavar="N",
                   help="flag images whose shorter side is below N pixels (default: %(default)s)")
    return p


def main_check(argv: list[str] | None = None) -> int:
    """CLI entry: print the report table, then the JSON (or write it to ``--json``).

    Returns 0 whenever the check ran (findings included), 2 on a :class:`DataError`.
    """
    args = _build_parser().parse_args(argv)
    try:
        report = check_dataset(args.dir, near_threshold=args.near_threshold, min_side=args.min_side)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        print(f"datacheck: wrote {args.json}", file=sys.stderr)
    else:
        print(json.dumps(report.to_dict(), separators=(",", ":")))
    return 0


if __name__ == "__main__":  # pragma: no cover - exercised via main_check in tests
    sys.exit(main_check())
