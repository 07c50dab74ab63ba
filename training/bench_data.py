"""``make bench-data`` / ``fieldid bench data``: does ``fieldid data check`` find planted problems?

    fieldid bench data [--work runs/bench-data] [--sets elpv,digits,...] [--page FILE]

Per set (the real sets of :mod:`fieldid.training.bench_sets` and the two demo sets, the demo sets
laid out pre-split the way ``fieldid train`` splits them so a planted copy stays in its split):

1. **Time.** One plain feature pass over every photo (:func:`load_or_compute_features`, training's
   backbone and image size, cold), then the full check on the cache that pass left. A cold check
   decodes each photo once for hashes *and* features, so it costs at most the feature pass plus
   the warm check; the table shows both.
2. **Label flips.** A copy of the set (hard links) with 5 % of *all* photos (seeded) moved into
   another, random class folder. Precision and recall of the first k flagged photos, k = the
   number planted (fewer when fewer are flagged), and of everything flagged. The goal is >= 0.6
   both on every real set (about half of what the published audit flagged was confirmed wrong by
   people). Photos whose original label was already wrong count as false here.
3. **Near-duplicates across splits.** A copy of the set with, for 5 % of the test photos (at least
   10), a copy in ``train/`` of the same class: each side trimmed by up to 5 %, resized to
   60-95 % (photos under 64 px to 110-160 %: a halved 25-px photo is no longer the same photo),
   re-encoded as JPEG at quality 50-90. Found: the pair is reported as cross-split leakage. False:
   every other reported cross-split pair, counted twice. *All*: among all reported pairs. *Not
   the set's own*: leaving out the pairs the check already linked on the unplanted set, in any
   split and by any rule (a planted copy stands for its original there) — the set's own
   duplicates: digits at 8x8 px have many pixel-identical scans, and the solar-cell set holds the
   same cell photographed more than once. Any split, because ``fieldid train`` carves val out of
   ``train/`` by a seeded draw over its files: the planted copies change that draw, so a pair both
   in ``train/`` on the unplanted set can be a train/val pair on the planted one (comparing only
   cross-split pairs counted those as new). Whether the set's own pairs are true is a judgement
   no count makes: the benchmark draws a seeded sample of them into ``WORK/own-pairs-SET.jpg``,
   and of the false pairs that are not the set's own into ``WORK/false-pairs-SET.jpg`` (both
   beside the page with ``--page``), for a person to look at. A third count: among the reported
   cross-split pairs that hold a planted copy, those that pair it with a photo other than its
   original (unless the check linked that photo and the original on the unplanted set).
   The goal column judges found and the second count.

It prints a markdown table and, with ``--page`` (``make bench-data``: ``docs/measured/bench-data.md``),
writes it to a page with the date, commit and machine; the rows also go to ``WORK/bench-data.json``.
Not part of the tests.
"""
from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .bench_sets import REAL_SETS, RealSetError, build_real_set, check_set_names, link_files
from .records import atomic_write_json, atomic_write_text

__all__ = ["BENCH_SETS", "bench_data", "count_dups", "format_table", "linked_pairs", "pairs_sheet",
           "run_bench_data"]

BENCH_SETS = (*REAL_SETS, "reef", "salmon")
FLIP_FRACTION = 0.05
DUP_FRACTION = 0.05
MIN_DUPS = 10
LABEL_GOAL = 0.6
FOUND_GOAL = 0.95
FALSE_GOAL = 0.01


def _log(msg: str) -> None:
    print(f"bench-data: {msg}", file=sys.stderr, flush=True)


def _presplit_demo(name: str, work: Path) -> Path:
    """The demo set laid out as ``train/val/test`` the way ``fieldid train`` splits the flat folder."""
    from .data import make_split
    from .demo_data import make_demo_dataset

    flat = work / "data" / f"{name}-flat"
    make_demo_dataset(name, flat, progress=False)
    out = work / "data" / name
    if (out / ".complete").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    split = make_split(flat, exclude={})
    files = {Path(split.root) / rel: out / part / split.labels[y] / Path(rel).name
             for part, rows in split.files.items() for rel, y in rows}
    link_files(files)
    (out / ".complete").touch()
    return out


def _dataset(name: str, work: Path) -> Path:
    if name in ("reef", "salmon"):
        return _presplit_demo(name, work)
    return build_real_set(name, work / "data")


def _photos(root: Path) -> list[Path]:
    from .images import scan_image_folder

    listing = scan_image_folder(root)
    return [p for classes in listing.splits.values() for paths in classes.values() for p in paths]


def _fresh_copy(root: Path, dst: Path, cache_from: Path, cache_to: Path) -> dict[Path, Path]:
    """A hard-linked copy of the photos of ``root`` at ``dst`` with the feature cache copied along."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.rmtree(cache_to, ignore_errors=True)
    files = {p: dst / p.relative_to(root) for p in _photos(root)}
    link_files(files)
    shutil.copytree(cache_from, cache_to, ignore=shutil.ignore_patterns("check-summary.json"))
    return files


def _deep(cache_dir: Path) -> Any:
    from .datacheck import DeepOptions

    return DeepOptions(cache_dir=cache_dir)


def _time_row(root: Path, work: Path, name: str) -> tuple[dict[str, Any], Any]:
    from .datacheck import check_dataset
    from .features import load_or_compute_features

    cache = work / "cache" / name
    shutil.rmtree(cache, ignore_errors=True)
    # The size the check (and `fieldid train`) picks: one warm-up call of the check's own rule.
    from .config import TrainConfig
    from .data import make_split
    from .image_size import choose_image_size

    size, _ = choose_image_size(make_split(root, exclude={}), TrainConfig())
    photos = _photos(root)
    t = time.perf_counter()
    feats = load_or_compute_features(photos, "mobilenet_v2", size, root=root, cache_dir=cache)
    t_feat = time.perf_counter() - t
    t = time.perf_counter()
    report = check_dataset(root, deep=_deep(cache), progress=False)
    t_check = time.perf_counter() - t
    assert report.deep is not None
    return {"photos": len(photos), "image_size": report.deep["image_size"], "feature_dim": int(feats.shape[1]),
            "feature_pass_s": round(t_feat, 1), "warm_check_s": round(t_check, 1),
            "warm_from_cache": report.deep["features_from_cache"],
            "probe_accuracy": report.deep["probe"]["accuracy"], "clean_label_issues": len(report.label_issues),
            "clean_cross_split_pairs": sum(1 for r in report.leakage if "cross-split" in r["kinds"]),
            "phash_not_confirmed": report.deep.get("phash_not_confirmed", 0),
            "clean_outliers": len(report.outliers)}, report


def _flip_row(root: Path, work: Path, name: str, seed: int) -> dict[str, Any]:
    from .datacheck import check_dataset
    from .images import scan_image_folder

    dst = work / "planted" / f"{name}-flips"
    files = _fresh_copy(root, dst, work / "cache" / name, work / "cache" / f"{name}-flips")
    listing = scan_image_folder(dst)
    labels = listing.labels
    rng = np.random.default_rng(seed)
    rels = sorted(q.relative_to(dst).as_posix() for q in files.values())
    m = max(1, int(round(FLIP_FRACTION * len(rels))))
    planted: dict[str, str] = {}
    for rel in sorted(rng.choice(rels, m, replace=False).tolist()):
        parts = rel.split("/")
        new = str(rng.choice([c for c in labels if c != parts[-2]]))
        target = dst.joinpath(*parts[:-2], new, parts[-1])
        target.parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).rename(target)
        planted[target.relative_to(dst).as_posix()] = parts[-2]
    report = check_dataset(dst, deep=_deep(work / "cache" / f"{name}-flips"), progress=False)
    flagged = [r["file"] for r in report.label_issues]
    top = flagged[:m]
    hits_top = sum(1 for f in top if f in planted)
    hits_all = sum(1 for f in flagged if f in planted)
    right = sum(1 for r in report.label_issues if r["file"] in planted and planted[r["file"]] == r["suggested"])
    return {"planted_flips": m, "flagged": len(flagged), "precision_at_k": round(hits_top / max(1, len(top)), 3),
            "recall_at_k": round(hits_top / m, 3), "flagged_precision": round(hits_all / max(1, len(flagged)), 3),
            "flagged_recall": round(hits_all / m, 3),
            "suggested_right": round(right / max(1, hits_all), 3),
            "confused_pairs": [f"{p['classes'][0]}<->{p['classes'][1]}" for p in report.confused_pairs]}


def _copy_image(path: Path, rng: np.random.Generator) -> bytes:
    """A resized, slightly cropped, re-encoded copy of one photo (JPEG bytes)."""
    from PIL import Image

    from .images import load_rgb

    img = load_rgb(path)
    w, h = img.size
    left, top, right, bottom = rng.uniform(0.0, 0.05, 4)
    img = img.crop((round(w * left), round(h * top), w - round(w * right), h - round(h * bottom)))
    scale = rng.uniform(0.6, 0.95) if min(w, h) >= 64 else rng.uniform(1.1, 1.6)
    img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=int(rng.integers(50, 91)))
    return buf.getvalue()


def linked_pairs(report: Any) -> set[frozenset[str]]:
    """Every photo pair a check linked as the same photo: exact and pHash groups, aligned pairs, leakage (any split)."""
    out = {frozenset((r["a"], r["b"])) for r in [*report.leakage, *report.duplicate_pairs]}
    for group in [*report.exact_duplicates, *report.near_duplicates]:
        out.update(frozenset((a, b)) for k, a in enumerate(group) for b in group[k + 1:])
    return out


def _dup_row(root: Path, work: Path, name: str, seed: int, set_pairs: set[frozenset[str]]) -> dict[str, Any]:
    from .datacheck import check_dataset

    dst = work / "planted" / f"{name}-dups"
    files = _fresh_copy(root, dst, work / "cache" / name, work / "cache" / f"{name}-dups")
    tests = sorted(q.relative_to(dst).as_posix() for q in files.values() if q.relative_to(dst).parts[0] == "test")
    rng = np.random.default_rng(seed + 1)
    d = min(len(tests), max(MIN_DUPS, int(round(DUP_FRACTION * len(tests)))))
    planted: set[frozenset[str]] = set()
    origin: dict[str, str] = {}
    for k, rel in enumerate(sorted(rng.choice(tests, d, replace=False).tolist())):
        parts = rel.split("/")
        copy = dst / "train" / parts[-2] / f"planted-copy-{k:03d}.jpg"
        copy.parent.mkdir(parents=True, exist_ok=True)
        copy.write_bytes(_copy_image(dst / rel, rng))
        origin[copy.relative_to(dst).as_posix()] = rel
        planted.add(frozenset((rel, copy.relative_to(dst).as_posix())))
    report = check_dataset(dst, deep=_deep(work / "cache" / f"{name}-dups"), progress=False)
    cross = [r for r in report.leakage if "cross-split" in r["kinds"]]
    reported = {frozenset((r["a"], r["b"])) for r in cross}
    row = {"planted_dups": d, **count_dups(reported, planted, origin, set_pairs)}
    # The pairs the goal counts as false, for a person to judge (the set's own are on their own sheet).
    false_new = [r for r in cross if frozenset((r["a"], r["b"])) not in planted
                 and not _the_sets_own(frozenset((r["a"], r["b"])), origin, set_pairs)]
    sheet = pairs_sheet(dst, false_new, work / f"false-pairs-{name}.jpg", seed=seed)
    row["false_pairs_sheet"] = sheet.name if sheet else None
    return row


def _the_sets_own(pair: frozenset[str], origin: dict[str, str], set_pairs: set[frozenset[str]]) -> bool:
    """The unplanted check linked this pair, a planted copy standing for its original."""
    a, b = tuple(pair)
    return frozenset((origin.get(a, a), origin.get(b, b))) in set_pairs


def count_dups(reported: set[frozenset[str]], planted: set[frozenset[str]], origin: dict[str, str],
               set_pairs: set[frozenset[str]]) -> dict[str, Any]:
    """The near-duplicate row's counts from the reported cross-split pairs of the planted set.

    ``origin`` maps each planted copy to its original; ``set_pairs`` is :func:`linked_pairs` of the
    unplanted set. A reported pair is the set's own when the unplanted check linked it, its copy
    standing for its original (a copy of a photo with a duplicate matches that duplicate too).

    Example:
        >>> fs = frozenset
        >>> c = count_dups({fs(("t/x", "c0")), fs(("c0", "t/y")), fs(("t/p", "v/q"))}, {fs(("t/x", "c0"))},
        ...                {"c0": "t/x"}, {fs(("t/x", "t/y"))})
        >>> c["found"], c["own_pairs"], c["false_pairs_new"], c["copy_false"]
        (1.0, 1, 0.5, 0.0)
    """
    found = len(planted & reported)
    false = reported - planted
    own = {p for p in false if _the_sets_own(p, origin, set_pairs)}
    copy_matches = [p for p in reported if any(x in origin for x in p)]
    copy_false = [p for p in copy_matches if p not in planted and not _the_sets_own(p, origin, set_pairs)]
    return {"found": round(found / max(1, len(planted)), 3), "reported_cross_split": len(reported),
            "false_pairs": round(len(false) / max(1, len(reported)), 3),
            "own_pairs": len(own),
            "false_pairs_new": round(len(false - own) / max(1, len(reported) - len(own)), 3),
            "copy_matches": len(copy_matches), "copy_false": round(len(copy_false) / max(1, len(copy_matches)), 3)}


SHEET_PAIRS = 8
SHEET_SIDE = 160
SHEET_PREFIX = "bench-data-"  # the sheets' names beside the page


def pairs_sheet(root: Path, records: list[dict[str, Any]], out: Path, *, seed: int = 0) -> Path | None:
    """A seeded sample of leakage records (at most :data:`SHEET_PAIRS`), each pair side by side with its
    split, label, file and match (JPEG at ``out``). None when there are none.

    The benchmark cannot tell whether the pairs it does not plant are true duplicates; this is what a
    person looks at to judge.
    """
    from PIL import Image, ImageDraw

    from .images import load_rgb

    pairs = sorted((r["a"], r["b"], r["match"], r["splits"], r["labels"]) for r in records)
    if not pairs:
        return None
    rng = np.random.default_rng(seed)
    pick = [pairs[i] for i in sorted(rng.choice(len(pairs), min(SHEET_PAIRS, len(pairs)), replace=False))]
    row_h = SHEET_SIDE + 26
    sheet = Image.new("RGB", (2 * SHEET_SIDE + 8, len(pick) * row_h), "white")
    draw = ImageDraw.Draw(sheet)
    width = SHEET_SIDE // 6  # characters of the default font on one image's width
    for k, (a, b, match, splits, labels) in enumerate(pick):
        for m, (rel, note) in enumerate(((a, ""), (b, f" ({match})"))):
            x, y = m * (SHEET_SIDE + 8), k * row_h
            name = rel.rsplit("/", 1)[-1]
            # The check's split (val is drawn out of train/), not the folder.
            draw.text((x + 1, y), f"{splits[m]}: {labels[m]}"[:width], fill="black")
            draw.text((x + 1, y + 11), (name + note)[-width:], fill="black")
            sheet.paste(load_rgb(root / rel).resize((SHEET_SIDE, SHEET_SIDE)), (x, y + 24))
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    sheet.save(buf, "JPEG", quality=80)
    out.write_bytes(buf.getvalue())
    return out


def bench_data(work: str | Path, names: tuple[str, ...] = BENCH_SETS, *, seed: int = 0) -> list[dict[str, Any]]:
    """Run the benchmark on ``names``; one row per set (also written to ``WORK/bench-data.json``)."""
    from fieldid.machine import git_commit

    work = Path(work)
    check_set_names(names, BENCH_SETS)
    rows = []
    for name in names:
        root = _dataset(name, work)
        _log(f"{name}: feature pass and warm check")
        row: dict[str, Any] = {"dataset": name, "real": name in REAL_SETS, "date": time.strftime("%Y-%m-%d"),
                               "commit": git_commit()}
        timing, report = _time_row(root, work, name)
        row.update(timing)
        sheet = pairs_sheet(root, [r for r in report.leakage if "cross-split" in r["kinds"]],
                            work / f"own-pairs-{name}.jpg", seed=seed)
        row["own_pairs_sheet"] = sheet.name if sheet else None
        _log(f"{name}: planted label flips")
        row.update(_flip_row(root, work, name, seed))
        _log(f"{name}: planted near-duplicates")
        row.update(_dup_row(root, work, name, seed, linked_pairs(report)))
        rows.append(row)
        _log(f"{name}: " + json.dumps(row))
        atomic_write_json(work / "bench-data.json", rows)
    return rows


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f} %"


def _ok(v: bool) -> str:
    return "met" if v else "NOT met"


def format_table(rows: list[dict[str, Any]]) -> str:
    """The markdown tables: label flips, near-duplicates, time."""
    lines = ["| set | photos | probe acc. (out of sample) | flips planted | flagged | precision@k | recall@k | "
             "precision (all flagged) | recall (all flagged) | suggested label right | confused both ways | goal |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        goal = (_ok(r["precision_at_k"] >= LABEL_GOAL and r["recall_at_k"] >= LABEL_GOAL) if r["real"]
                else "(synthetic)")
        lines.append(f"| {r['dataset']} | {r['photos']} | {r['probe_accuracy']:.3f} | {r['planted_flips']} | "
                     f"{r['flagged']} | {r['precision_at_k']:.2f} | {r['recall_at_k']:.2f} | "
                     f"{r['flagged_precision']:.2f} | {r['flagged_recall']:.2f} | {r['suggested_right']:.2f} | "
                     f"{', '.join(r['confused_pairs']) or '-'} | {goal} |")
    lines += ["", "| set | copies planted | found | cross-split pairs reported | of them the set's own | "
                  "pHash matches left out (unplanted set) | false pairs "
                  "(all) | false pairs (not the set's own) | copies' matches | false among them | "
                  "goal (>= 95 % found, <= 1 % false not the set's own) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        goal = _ok(r["found"] >= FOUND_GOAL and r["false_pairs_new"] <= FALSE_GOAL)
        lines.append(f"| {r['dataset']} | {r['planted_dups']} | {100 * r['found']:.0f} % | "
                     f"{r['reported_cross_split']} | {r.get('own_pairs', '-')} | {r.get('phash_not_confirmed', '-')} | "
                     f"{100 * r['false_pairs']:.1f} % | "
                     f"{100 * r['false_pairs_new']:.1f} % | {r.get('copy_matches', '-')} | "
                     f"{_pct(r.get('copy_false'))} | {goal} |")
    sheets = [r for r in rows if r.get("own_pairs_sheet")]
    if sheets:
        lines += ["", "The set's own cross-split pairs on the unplanted set (what the check reports before anything "
                      f"is planted), {SHEET_PAIRS} drawn at random per set for a person to judge: "
                  + ", ".join(f"[{r['dataset']}]({SHEET_PREFIX}{r['own_pairs_sheet']}) "
                              f"({r['clean_cross_split_pairs']} pairs)" for r in sheets) + "."]
    sheets = [r for r in rows if r.get("false_pairs_sheet")]
    if sheets:
        lines += ["", "The false pairs that are not the set's own (what the goal counts), at most "
                      f"{SHEET_PAIRS} per set: "
                  + ", ".join(f"[{r['dataset']}]({SHEET_PREFIX}{r['false_pairs_sheet']})" for r in sheets) + "."]
    lines += ["", "| set | image size | one feature pass (s) | full check on its cache (s) | cold check at most |",
              "|---|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | {r['image_size']} | {r['feature_pass_s']:.1f} | {r['warm_check_s']:.1f} | "
                     f"feature pass + {r['warm_check_s']:.0f} s |")
    return "\n".join(lines)


def write_page(rows: list[dict[str, Any]], path: str | Path, *, command: str, work: str | Path | None = None) -> Path:
    """``docs/measured/bench-data.md``: the tables with date, commit and machine; the sample sheets of
    ``work`` go beside it (``bench-data-own-pairs-SET.jpg``, ``bench-data-false-pairs-SET.jpg``)."""
    from fieldid.machine import measured_header

    path = Path(path)
    # The header first: it reads the commit, and the sheets copied below may replace tracked files (+dirty).
    text = (measured_header("Data check: planted label flips and near-duplicates", command)
            + "MobileNetV2 (ImageNet) features at the size `fieldid train` picks, "
            f"{int(100 * FLIP_FRACTION)} % of each set's photos moved to another class; near-duplicate copies of "
            f"{int(100 * DUP_FRACTION)} % of the test photos (at least {MIN_DUPS}) put into train/. How the rows are "
            f"made: `fieldid bench data --help` and docs/data-check.md.\n\n{format_table(rows)}\n")
    for r in rows:
        for sheet in (r.get("own_pairs_sheet"), r.get("false_pairs_sheet")):
            if work is not None and sheet:
                shutil.copyfile(Path(work) / sheet, path.parent / f"{SHEET_PREFIX}{sheet}")
    return atomic_write_text(path, text)


def run_bench_data(work: str | Path, sets: tuple[str, ...] = BENCH_SETS, *, seed: int = 0, page: Path | None = None,
                   command: str = "fieldid bench data") -> int:
    """``fieldid bench data``: :func:`bench_data`, its table, and the page at ``page`` (written only for the
    default sets and seed) naming ``command``; 2 for bad input (one line)."""
    try:
        rows = bench_data(work, sets, seed=seed)
    except (ValueError, RealSetError) as e:
        print(f"bench-data: error: {e}", file=sys.stderr)
        return 2
    print(format_table(rows))
    if page and tuple(sets) == BENCH_SETS and seed == 0:
        print(f"written: {write_page(rows, page, command=command, work=work)}")
    return 0
