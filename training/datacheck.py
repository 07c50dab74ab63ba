"""Dataset health check: counts, skipped files, duplicates, split leakage, tiny images, photo quality
and — from backbone features — label issues, feature near-duplicates and outliers.

Two depths. ``--fast`` (``check_dataset(deep=False)``, the Python default) is torch-free: it must
be fast to start and run where only the data lives. The full check (the CLI default) adds one
feature pass of the training backbone (:mod:`fieldid.training.features`, cached beside the photos
in ``.fieldid-cache/`` so ``fieldid train`` does not pay it again), a cross-validated linear probe
and the confident-learning rule (:mod:`fieldid.training.labelissues`), cosine near-duplicates and
k-NN outliers (:mod:`fieldid.training.neighbours`). The check never moves, rewrites or deletes a
photo; the full check writes only into the hidden cache folder (or ``--cache-dir``).

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

import csv
import datetime as _dt
import hashlib
import io
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence, TextIO

import imagehash
import numpy as np

from fieldid.intake import ACCEPTED_NAMES

from .datareport import QUALITY_VALUE as _QUALITY_VALUE, UNTRUSTED as _UNTRUSTED, folder_label as _folder_label
from .images import DataError, ImageError, load_rgb, scan_image_folder
from .quality import QUALITY_KINDS, flag_quality, measure
from .records import atomic_write_json, atomic_write_text

__all__ = [
    "DEFAULT_NEAR_THRESHOLD",
    "DEFAULT_MIN_SIDE",
    "EXCLUDE_KINDS",
    "DataReport",
    "DeepOptions",
    "check_dataset",
    "check_notice",
    "exclusions",
    "format_report",
    "hamming_pairs",
    "write_relabel_csv",
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
# The summary of the last full check, read by `fieldid train` (in the feature cache folder).
SUMMARY_FILE = "check-summary.json"
# `fieldid train` mentions the last check when suspected issues reach this share of the photos.
NOTICE_SHARE = 0.01
# What --write-exclude leaves out by default; "quality" (blurry, dark, ...) is opt-in: field photos
# are often soft or dark and a model should still learn from them.
EXCLUDE_KINDS = ("label", "duplicate", "conflict", "outlier", "quality")
DEFAULT_EXCLUDE_KINDS = ("label", "duplicate", "conflict", "outlier")

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
            <= ``near_threshold``, linked transitively; in the full check only pairs whose fine
            detail agrees, ``deep["phash_not_confirmed"]`` counts the rest). Byte-identical copies
            are collapsed to the first file of their exact group, so a group is never just exact copies.
        leakage: one dict per duplicate or near-duplicate pair whose members sit in different
            splits (``"cross-split"``) and/or carry different class labels
            (``"conflicting-labels"``); see :func:`check_dataset` for the keys.
        tiny_images: files whose shorter side (after EXIF rotation) is < ``min_side``.
        quality: kind (``blurry``, ``dark``, ``bright``, ``low_information``, ``odd_size``,
            ``odd_aspect``) -> ``[{"file", "split", "label", "value", "z"}]``, photos unusual for
            this dataset (:mod:`fieldid.training.quality`).
        label_issues: (full check) ``[{"file", "split", "given", "suggested", "score",
            "self_confidence", "boundary"}]``, most suspicious first (:mod:`fieldid.training.labelissues`).
        confused_pairs: (full check) ``[{"classes", "counts", "expected", "p_value"}]``: class pairs
            flagged towards each other both ways more than chance (an unclear boundary).
        duplicate_pairs: (full check) ``[{"a", "b", "similarity", "cosine", "kinds", "splits",
            "labels"}]``: the same photo up to resizing, re-encoding, a slight crop or a mirror
            (candidates by backbone features, verified on aligned thumbnails:
            :func:`fieldid.training.neighbours.near_duplicate_pairs`); ``kinds`` holds
            ``"same-class"`` (redundant) or ``"conflicting-labels"``, plus ``"cross-split"``.
            Cross-split and conflicting pairs also appear in ``leakage`` (``match: "aligned"``,
            ``distance``: 1 - similarity).
        outliers: (full check) ``[{"file", "split", "label", "score", "nearest_class"}]``: far from
            every class in feature space (robust z-score ``score``).
        deep: (full check) backbone, image size, probe folds/L2/accuracy, cache hits, timings;
            ``splits`` says where the split names come from. None after ``--fast``.
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
    quality: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    label_issues: list[dict[str, Any]] = field(default_factory=list)
    confused_pairs: list[dict[str, Any]] = field(default_factory=list)
    duplicate_pairs: list[dict[str, Any]] = field(default_factory=list)
    outliers: list[dict[str, Any]] = field(default_factory=list)
    deep: dict[str, Any] | None = None
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


@dataclass
class DeepOptions:
    """Settings of the full (feature) check; defaults are what ``fieldid train`` uses.

    Attributes:
        model: backbone (``fieldid train --model``).
        image_size: crop size; None = the size ``fieldid train`` would pick for these photos.
        folds: cross-validation folds of the probe.
        seed: fold seed, and the split seed for a flat folder (``fieldid train --seed``).
        dup_similarity: least aligned-thumbnail similarity of two near-duplicates (a photo whose messenger
            copy keeps more is held to that, less a margin: :func:`fieldid.training.neighbours.near_duplicate_pairs`).
        outlier_z: robust z-score above which a photo is far from every class.
        rank_by: ``self_confidence`` or ``normalized_margin``.
        cache_dir: feature cache folder (default ``DIR/.fieldid-cache``).
        pretrained: ImageNet weights (False only for tests of the plumbing).
    """

    model: str = "mobilenet_v2"
    image_size: int | None = None
    folds: int = 5
    seed: int = 0
    dup_similarity: float = 0.95
    outlier_z: float = 5.0
    rank_by: str = "self_confidence"
    cache_dir: str | Path | None = None
    pretrained: bool = True


def _run_split(root: Path, seed: int) -> tuple[Any, dict[str, str], str]:
    """The split ``fieldid train`` makes with its defaults (and ``seed``), without exclusions."""
    from .config import TrainConfig
    from .data import make_split

    cfg = TrainConfig()
    split = make_split(root, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction, seed=seed, exclude={})
    where = {p: k for k, v in split.files.items() for p, _ in v}
    rule = (f"splits as `fieldid train` makes them (seed {seed}, val {cfg.val_fraction}"
            + ("" if split.presplit else f", test {cfg.test_fraction}") + ")")
    return split, where, rule


class _Deep:
    """The feature side of the check: set up before the read pass, which feeds it decoded photos."""

    def __init__(self, root: Path, options: DeepOptions) -> None:
        from .config import TrainConfig
        from .features import FeatureCache, FeatureCollector, FeatureExtractor, cache_file, default_cache_dir
        from .image_size import choose_image_size

        self.options = options
        self.t0 = time.perf_counter()
        self.split, self.where, self.split_rule = _run_split(root, options.seed)
        size, self.size_rule = choose_image_size(self.split, TrainConfig(model=options.model,
                                                                          image_size=options.image_size))
        self.extractor = FeatureExtractor(options.model, size, pretrained=options.pretrained)
        self.cache_dir = Path(options.cache_dir) if options.cache_dir is not None else default_cache_dir(root)
        cache = FeatureCache(cache_file(self.cache_dir, options.model, self.extractor.spec.crop_size), root,
                             self.extractor.meta)
        self.collector = FeatureCollector(self.extractor, cache)
        self.thumbs: list[np.ndarray] = []
        self.copies: list[np.ndarray] = []

    def add(self, index: int, path: Path, image: Any) -> None:
        from .neighbours import copy_thumbnail, thumbnail

        self.collector.add(index, path, image)
        self.thumbs.append(thumbnail(image))
        self.copies.append(copy_thumbnail(image))


def _pair_record(entries: list[_Entry], i: int, j: int, similarity: float, cosine: float | None) -> dict[str, Any]:
    a, b = entries[min(i, j)], entries[max(i, j)]
    kinds = ["same-class" if a.label == b.label else "conflicting-labels"]
    if a.split != b.split:
        kinds.append("cross-split")
    return {"a": a.rel, "b": b.rel, "similarity": similarity, "cosine": cosine, "kinds": kinds,
            "splits": [a.split, b.split], "labels": [a.label, b.label]}


def _confirm_phash(deep: _Deep, reps: list[int], pairs: list[tuple[int, int, int]]
                   ) -> tuple[list[tuple[int, int, int]], int]:
    """The full check keeps a pHash match only when the two photos' fine detail agrees
    (:func:`fieldid.training.neighbours.detail_similarity` >= :data:`~fieldid.training.neighbours.PHASH_DETAIL`).

    A 64-bit pHash sees the layout: on the solar cells, different cells of one module (the same busbars,
    different cracks) were within 4 bits of each other, and a pair of them labelled "functional" and
    "defective" would be reported as a label conflict and excluded by ``--write-exclude``. The aligned
    detail tells them apart (docs/data-check.md). Returns the kept pairs and how many were dropped.
    """
    from .neighbours import PHASH_DETAIL, detail_similarity

    thumbs = np.stack(deep.thumbs)[reps]
    sims = detail_similarity(thumbs, [(a, b) for a, b, _ in pairs])
    kept = [p for p, sim in zip(pairs, sims) if sim >= PHASH_DETAIL]
    return kept, len(pairs) - len(kept)


def _deep_findings(deep: _Deep, entries: list[_Entry], labels: list[str], reps: list[int],
                   members: dict[int, list[int]], known_pairs: set[tuple[str, str]],
                   progress: bool) -> dict[str, Any]:
    """Label issues, confused pairs, feature duplicates (+ their leakage records) and outliers."""
    from .labelissues import find_label_issues
    from .neighbours import knn_outliers, near_duplicate_pairs

    opts = deep.options
    feats = deep.collector.result(range(len(entries)))
    t_feat = time.perf_counter() - deep.t0
    if progress:
        print(f"datacheck: features of {len(entries)} photos ({deep.collector.hits} from the cache, "
              f"{deep.collector.computed} computed) in {t_feat:.1f} s", file=sys.stderr, flush=True)
    index = {name: k for k, name in enumerate(labels)}
    y = np.array([index[e.label] for e in entries], dtype=np.int64)
    t = time.perf_counter()
    check = find_label_issues(feats, y, labels, folds=opts.folds, seed=opts.seed, rank_by=opts.rank_by)
    t_probe = time.perf_counter() - t
    issues = [{"file": entries[r["index"]].rel, "split": entries[r["index"]].split, "given": labels[r["given"]],
               "suggested": labels[r["suggested"]], "score": r["score"], "self_confidence": r["self_confidence"],
               "boundary": r["boundary"]} for r in check.issues]

    t = time.perf_counter()
    dup_pairs: list[dict[str, Any]] = []
    leaks: list[dict[str, Any]] = []
    thumbs, copies = np.stack(deep.thumbs), np.stack(deep.copies)
    for a, b, sim, cos in near_duplicate_pairs(thumbs[reps], feats[reps], threshold=opts.dup_similarity,
                                               copies=copies[reps]):
        dup_pairs.append(_pair_record(entries, reps[a], reps[b], sim, cos))
        for ia in members[reps[a]]:  # a pair stands for every byte-identical copy on either side
            for ib in members[reps[b]]:
                rec = _leak(entries, ia, ib, "aligned", round(1.0 - sim, 4))
                if rec and (rec["a"], rec["b"]) not in known_pairs:
                    leaks.append(rec)
    outliers = [{"file": entries[r["index"]].rel, "split": entries[r["index"]].split,
                 "label": entries[r["index"]].label, "score": r["score"], "nearest_class": labels[r["nearest_class"]]}
                for r in knn_outliers(feats, y, z_limit=opts.outlier_z)]
    t_neigh = time.perf_counter() - t
    info = {"model": opts.model, "image_size": deep.extractor.spec.crop_size, "image_size_rule": deep.size_rule,
            "splits": deep.split_rule, "feature_dim": int(feats.shape[1]) if feats.size else 0,
            "cache_file": str(deep.collector.cache.file) if deep.collector.cache else None,
            "features_from_cache": deep.collector.hits, "features_computed": deep.collector.computed,
            "probe": {k: v for k, v in check.info.items() if k != "thresholds"},
            "thresholds": check.info.get("thresholds", {}),
            "dup_similarity": opts.dup_similarity, "outlier_z": opts.outlier_z,
            "seconds": {"features": round(t_feat, 2), "probe": round(t_probe, 2), "neighbours": round(t_neigh, 2)}}
    return {"label_issues": issues, "confused_pairs": check.pairs, "duplicate_pairs": dup_pairs,
            "feature_leaks": leaks, "outliers": outliers, "deep": info}


def check_dataset(root: str | Path, *, near_threshold: int = DEFAULT_NEAR_THRESHOLD,
                  min_side: int = DEFAULT_MIN_SIDE, progress: bool = True, deep: bool | DeepOptions = False) -> DataReport:
    """Check an ImageFolder tree (flat or pre-split) without modifying it.

    Leakage dicts have keys ``kinds`` (``["cross-split"]``, ``["conflicting-labels"]`` or
    both), ``match`` (``"exact"``, ``"near"`` or, in the full check, ``"aligned"``),
    ``distance`` (phash Hamming distance, 0 for exact, 1 - similarity for aligned), ``a``/``b``
    (relative paths), ``splits`` and ``labels`` (``[a's, b's]``).

    Args:
        root: the dataset folder.
        near_threshold: max phash Hamming distance of near duplicates.
        min_side: photos with a shorter side below this are tiny.
        progress: progress lines on stderr.
        deep: True or :class:`DeepOptions` for the full check (features, label issues, feature
            near-duplicates, outliers). Split names are then the split ``fieldid train`` makes
            (a flat folder's photos get train/val/test; a pre-split tree without ``val/`` has
            val carved out of ``train/``), so leakage is judged on what training will see.

    Raises:
        DataError: from :func:`scan_image_folder` (missing or empty folder, < 2 classes, ...);
            in the full check also a class without 2 readable photos.

    Example:
        >>> report = check_dataset("data/reef", deep=True)  # doctest: +SKIP
        >>> report.label_issues[0]["suggested"]  # doctest: +SKIP
        'lionfish'
    """
    root_path = Path(root)
    listing = scan_image_folder(root_path)
    options = (deep if isinstance(deep, DeepOptions) else DeepOptions()) if deep else None
    feature_side = _Deep(root_path, options) if options is not None else None

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
    measures: list[dict[str, float]] = []

    bar = _Progress("read" if feature_side is None else "read + features", len(files), enabled=progress)
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
            # Leakage is judged on the split training will make (full check) or the folders.
            where = feature_side.where.get(rel, split) if feature_side is not None else split
            entries.append(_Entry(rel, where, label, sha, _phash64(image)))
            measures.append(measure(image))
            if feature_side is not None:
                feature_side.add(len(entries) - 1, path, image)
            image.close()
        bar.step(i)
    for path in listing.others:
        if not path.is_file():  # a broken link, a FIFO: not a photo file whatever its name
            skipped.append({"file": path.relative_to(root_path).as_posix(), "reason": "unreadable",
                            "detail": "not a regular file (a broken link, a pipe or a device)"})
            continue
        kind = path.suffix.lower() or "a file without extension"
        skipped.append({"file": path.relative_to(root_path).as_posix(), "reason": "unsupported format",
                        "detail": f"{kind} files are not read; accepted: {ACCEPTED_NAMES}"})
    order_of = {p.relative_to(root_path).as_posix(): k for k, p in
                enumerate(sorted([f for f, _, _ in files] + listing.others))}
    skipped.sort(key=lambda r: order_of[r["file"]])

    if feature_side is not None:
        readable: dict[str, int] = {}
        for e in entries:
            readable[e.label] = readable.get(e.label, 0) + 1
        short = [f"{c} ({readable.get(c, 0)})" for c in listing.labels if readable.get(c, 0) < 2]
        if short:
            raise DataError(f"{root}: the full check needs at least 2 readable photos per class; "
                            f"too few in {', '.join(short)} (unreadable files are listed by --fast)")

    # Exact duplicates: group by content hash; the first file of a group represents it below.
    by_sha: dict[str, list[int]] = {}
    for idx, e in enumerate(entries):
        by_sha.setdefault(e.sha256, []).append(idx)
    exact_groups = [g for g in by_sha.values() if len(g) > 1]
    reps = [g[0] for g in by_sha.values()]
    members = {g[0]: g for g in by_sha.values()}

    # Near duplicates among representatives only, so byte-identical copies never count twice.
    near_pairs = hamming_pairs([entries[r].phash for r in reps], near_threshold)
    phash_rejected = 0
    if feature_side is not None and near_pairs:
        near_pairs, phash_rejected = _confirm_phash(feature_side, reps, near_pairs)
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
    found: dict[str, Any] = {}
    if feature_side is not None:
        found = _deep_findings(feature_side, entries, listing.labels, reps, members,
                               {(r["a"], r["b"]) for r in leakage}, progress)
        leakage += found.pop("feature_leaks")
        found["deep"]["phash_not_confirmed"] = phash_rejected
    # Listing order (split, class, file name) everywhere, so train-side files come first.
    order = {e.rel: k for k, e in enumerate(entries)}
    leakage.sort(key=lambda r: (order[r["a"]], order[r["b"]]))

    main = counts["train" if listing.presplit else "all"]
    smallest, largest = min(main.values()), max(main.values())
    imbalance = largest / smallest if smallest else math.inf

    def paths(groups: list[list[int]]) -> list[list[str]]:
        return [[entries[i].rel for i in sorted(g)] for g in sorted(groups, key=min)]

    quality = {kind: [{"file": entries[r["index"]].rel, "split": entries[r["index"]].split,
                       "label": entries[r["index"]].label, "value": r["value"], "z": r["z"]} for r in rows]
               for kind, rows in flag_quality(measures).items()}
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
        quality=quality,
        near_threshold=near_threshold,
        min_side=min_side,
        **found,
    )
    report.ok = not (report.unreadable or report.skipped or report.exact_duplicates or report.near_duplicates
                     or report.leakage or report.tiny_images or any(report.quality.values())
                     or report.label_issues or report.duplicate_pairs or report.outliers)
    if feature_side is not None and report.deep is not None:
        report.deep["seconds"]["total"] = round(time.perf_counter() - feature_side.t0, 2)
        _write_summary(feature_side.cache_dir, report, len(entries))
    return report


def _suspected(report: DataReport) -> dict[str, int]:
    """Counts behind ``fieldid train``'s one-line notice."""
    conflicts = {f for r in report.leakage if "conflicting-labels" in r["kinds"] for f in (r["a"], r["b"])}
    trusted = bool(((report.deep or {}).get("probe") or {}).get("better_than_majority", True))
    return {"label issues": len(report.label_issues) if trusted else 0,
            "cross-split duplicate pairs": sum(1 for r in report.leakage if "cross-split" in r["kinds"]),
            "photos with conflicting labels": len(conflicts), "outliers": len(report.outliers)}


def _write_summary(cache_dir: Path, report: DataReport, photos: int) -> None:
    """The last full check's counts, for ``fieldid train``'s notice (no feature pass at train time)."""
    summary = {"schema_version": 1, "date": _dt.datetime.now().isoformat(timespec="seconds"),
               "root": str(Path(report.root).resolve()), "photos": photos, "suspected": _suspected(report)}
    try:
        atomic_write_json(cache_dir / SUMMARY_FILE, summary)
    except OSError:
        pass  # a read-only dataset: the notice is a convenience, never a reason to fail the check


def check_notice(data_dir: str | Path, cache_dir: str | Path | None = None) -> str | None:
    """One line for ``fieldid train`` when the last full check of ``data_dir`` found many suspected issues.

    Reads only the summary the check left in the cache folder (no feature pass). None when there
    is no such summary or the suspected issues are below :data:`NOTICE_SHARE` of the photos.
    """
    folder = Path(cache_dir) if cache_dir is not None else Path(data_dir) / ".fieldid-cache"
    try:
        summary = json.loads((folder / SUMMARY_FILE).read_text())
        counts = {str(k): int(v) for k, v in summary["suspected"].items()}
        photos = int(summary["photos"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    total = sum(counts.values())
    if photos <= 0 or total == 0 or total < NOTICE_SHARE * photos:
        return None
    parts = ", ".join(f"{v} {k}" for k, v in counts.items() if v)
    return (f"data check of {summary.get('date', '?')[:10]}: {parts} among {photos} photos; "
            f"see `fieldid data check {data_dir} --report report.html`, leave them out with "
            f"--write-exclude FILE and `fieldid train --exclude FILE`")


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
    if report.deep:
        d = report.deep
        probe = d.get("probe", {})
        lines.append(f"full check: {d['model']} features at {d['image_size']} px ({d['features_from_cache']} from the "
                     f"cache, {d['features_computed']} computed); {probe.get('folds')}-fold linear probe, "
                     f"out-of-sample accuracy {probe.get('accuracy')}; {d['splits']}")
    lines.append("")
    lines += _finding("skipped files (training will not use them)",
                      [f"{r['file']}: {r['reason']} ({r['detail']})" for r in report.skipped])
    lines += _finding("exact duplicate groups", [", ".join(g) for g in report.exact_duplicates])
    lines += _finding(f"near-duplicate groups (phash distance <= {report.near_threshold}"
                      + (", fine detail confirmed" if report.deep else "") + ")",
                      [", ".join(g) for g in report.near_duplicates])
    if report.deep and report.deep.get("phash_not_confirmed"):
        lines.append(f"  ({report.deep['phash_not_confirmed']} pHash matches left out: their fine detail differs, "
                     "look-alikes rather than copies)")
    if report.deep:
        lines += _finding(f"near-duplicate pairs (aligned similarity >= {report.deep['dup_similarity']})",
                          [f"{r['a']} <-> {r['b']} [{', '.join(r['kinds'])}; similarity {r['similarity']}]"
                           for r in report.duplicate_pairs])
    lines += _finding("leaking pairs (cross-split or conflicting labels)",
                      [f"{r['a']} <-> {r['b']} [{', '.join(r['kinds'])}; {r['match']}, distance {r['distance']}]"
                       for r in report.leakage])
    if report.deep and not report.deep["probe"].get("better_than_majority", True):
        lines.append(_UNTRUSTED)
    if report.deep:
        lines += _finding("label issues (given label probably wrong; most suspicious first)",
                          [f"{r['file']}: given {r['given']}, suggested {r['suggested']} (score {r['score']:.2f})"
                           + (" [unclear boundary]" if r["boundary"] else "") for r in report.label_issues])
        lines += _finding("class pairs confused both ways more than chance (an unclear boundary, not typos)",
                          [_pair_text(p) for p in report.confused_pairs])
        lines += _finding("outliers (far from every class)",
                          [f"{r['file']} (score {r['score']:.1f}; closest: {r['nearest_class']})"
                           for r in report.outliers])
    lines += _finding(f"tiny images (shorter side < {report.min_side} px)", report.tiny_images)
    for kind in QUALITY_KINDS:
        rows_q = report.quality.get(kind, [])
        if rows_q:
            lines += _finding(f"photo quality: {kind.replace('_', ' ')} (unusual for this dataset)",
                              [f"{r['file']} ({_QUALITY_VALUE[kind]} {r['value']})" for r in rows_q])
    lines.append("")
    lines.append("OK: no problems found" if report.ok else "PROBLEMS FOUND: review the findings above")
    return "\n".join(lines)


def _pair_text(p: dict[str, Any]) -> str:
    (a, b), (ab, ba), (ea, eb) = p["classes"], p["counts"], p["expected"]
    return (f"{a} <-> {b}: {ab} photos given {a} look like {b} and {ba} the other way (chance: {ea} and {eb}); "
            f"agree where the boundary lies, or merge the classes")


def exclusions(report: DataReport, kinds: Sequence[str] = DEFAULT_EXCLUDE_KINDS) -> dict[str, str]:
    """``{relative path: reason}`` of the photos to leave out of training, for ``--write-exclude``.

    Kinds: ``label`` (label issues), ``duplicate`` (of every group of same-class copies, exact,
    phash or feature, one photo stays: the one in test, else val, else the first), ``conflict``
    (both photos of a pair filed under different classes: which label is right is for a person),
    ``outlier``, ``quality`` (blurry, dark, bright, low information, odd size or aspect).
    """
    bad = sorted(set(kinds) - set(EXCLUDE_KINDS))
    if bad:
        raise ValueError(f"unknown exclude kind(s) {', '.join(bad)}; valid: {', '.join(EXCLUDE_KINDS)}")
    out: dict[str, str] = {}

    def add(rel: str, reason: str) -> None:
        out.setdefault(rel, reason)

    trusted = bool(((report.deep or {}).get("probe") or {}).get("better_than_majority", True))
    if "label" in kinds and trusted:  # a probe at chance level: its disagreements are not evidence
        for r in report.label_issues:
            add(r["file"], f"label issue: given {r['given']}, looks like {r['suggested']} (score {r['score']:.2f})")
    pairs: list[tuple[str, str, str, list[str], list[str]]] = []  # (a, b, how, labels, splits)
    for g in report.exact_duplicates:
        pairs += [(g[0], other, "byte-identical", [], []) for other in g[1:]]
    for g in report.near_duplicates:
        pairs += [(g[0], other, "perceptual hash", [], []) for other in g[1:]]
    for r in report.duplicate_pairs:
        pairs.append((r["a"], r["b"], f"similarity {r['similarity']}", r["labels"], r["splits"]))
    label_of: dict[str, str] = {}
    split_of: dict[str, str] = {}
    for r in report.leakage + report.duplicate_pairs:
        for f, lab, sp in zip((r["a"], r["b"]), r["labels"], r["splits"]):
            label_of[f], split_of[f] = lab, sp
    same, conflict = [], []
    for a, b, how, labels, _ in pairs:
        la, lb = label_of.get(a, _folder_label(a)), label_of.get(b, _folder_label(b))
        (same if la == lb else conflict).append((a, b, how))
    if "conflict" in kinds:
        for a, b, how in conflict:
            add(a, f"label conflict: same photo as {b} ({how}), filed under another class")
            add(b, f"label conflict: same photo as {a} ({how}), filed under another class")
    if "duplicate" in kinds:
        rank = {"test": 0, "val": 1}
        for group in _groups([(a, b) for a, b, _ in same]):
            keep = min(group, key=lambda f: (rank.get(split_of.get(f, ""), 2), group.index(f)))
            how = {frozenset((a, b)): h for a, b, h in same}
            for f in group:
                if f != keep:
                    add(f, f"duplicate of {keep} ({how.get(frozenset((f, keep)), 'same group')})")
    if "outlier" in kinds:
        for r in report.outliers:
            add(r["file"], f"outlier: far from every class (score {r['score']:.1f}, closest {r['nearest_class']})")
    if "quality" in kinds:
        for kind in QUALITY_KINDS:
            for r in report.quality.get(kind, []):
                add(r["file"], f"{kind.replace('_', ' ')} ({_QUALITY_VALUE[kind]} {r['value']})")
    return out


def _groups(pairs: list[tuple[str, str]]) -> list[list[str]]:
    """Connected components of file pairs, members in first-seen order."""
    names: list[str] = []
    seen: dict[str, int] = {}
    for a, b in pairs:
        for f in (a, b):
            if f not in seen:
                seen[f] = len(names)
                names.append(f)
    comps = _components(len(names), ((seen[a], seen[b]) for a, b in pairs))
    return [[names[i] for i in c] for c in comps]


def write_relabel_csv(report: DataReport, path: str | Path) -> Path:
    """The label issues as CSV (``file, given_label, suggested_label, score, self_confidence,
    unclear_boundary``), for a person to review and move photos; training never reads it."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["file", "given_label", "suggested_label", "score", "self_confidence", "unclear_boundary"])
    for r in report.label_issues:
        w.writerow([r["file"], r["given"], r["suggested"], f"{r['score']:.4f}", f"{r['self_confidence']:.4f}",
                    "yes" if r["boundary"] else "no"])
    return atomic_write_text(path, buf.getvalue(), errors="surrogateescape")  # file names as on disk
