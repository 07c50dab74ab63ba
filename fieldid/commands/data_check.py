"""`fieldid data check`: its flags, their checks, and the run (the check itself is
:func:`fieldid.training.datacheck.check_dataset`). Torch-free at import time."""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
from pathlib import Path

from fieldid.cli_common import HelpFormatter, Parser, check_output_file, first_line, not_a_folder, refuse_output_inside
from fieldid.intake import is_image_path
from fieldid.training.datacheck import (DEFAULT_EXCLUDE_KINDS, DEFAULT_MIN_SIDE, DEFAULT_NEAR_THRESHOLD, EXCLUDE_KINDS,
                                        DeepOptions, check_dataset, exclusions, format_report, write_relabel_csv)
from fieldid.training.datareport import write_html_report
from fieldid.training.exclusions import write_exclude_file
from fieldid.training.images import DataError
from fieldid.training.records import atomic_write_json

__all__ = ["add_check_args", "run_check", "main_check"]


def add_check_args(p: argparse.ArgumentParser) -> None:
    """The ``fieldid data check`` flags (one definition for ``fieldid data check`` and ``python -m``)."""
    p.add_argument("dir", metavar="DIR", type=Path, help="dataset root folder")
    p.add_argument("--json", metavar="PATH", type=Path, default=None,
                   help="write the JSON report to PATH, atomically (default: no file; the JSON is "
                        "printed as the last line of stdout)")
    p.add_argument("--report", metavar="FILE.html", type=Path, default=None,
                   help="write a self-contained HTML report (thumbnails, class chart, leakage table) "
                        "(default: none)")
    p.add_argument("--write-exclude", metavar="FILE", type=Path, default=None,
                   help="write the photos to leave out of training, one per line with the reason, for "
                        "`fieldid train --exclude FILE` (default: none)")
    p.add_argument("--exclude-kinds", default=",".join(DEFAULT_EXCLUDE_KINDS), metavar="KINDS",
                   help=f"what --write-exclude lists, comma-separated from {', '.join(EXCLUDE_KINDS)}")
    p.add_argument("--write-relabel", metavar="FILE.csv", type=Path, default=None,
                   help="write the label issues (given and suggested label, score) as CSV (default: none)")
    p.add_argument("--fast", action="store_true",
                   help="hashes, files and photo quality only: no backbone features, so no label issues, "
                        "feature near-duplicates or outliers (default: the full check)")
    p.add_argument("--model", default="mobilenet_v2",
                   help="backbone of the feature pass, as `fieldid train --model`")
    p.add_argument("--image-size", type=int, default=None,
                   help="crop size of the feature pass (default: the size `fieldid train` picks for these photos)")
    p.add_argument("--seed", type=int, default=0,
                   help="split seed of a flat folder (as `fieldid train --seed`) and the probe's fold seed "
                        "(default: 0)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the linear probe")
    p.add_argument("--dup-similarity", type=float, default=DeepOptions.dup_similarity, metavar="X",
                   help="least aligned-thumbnail similarity (0..1) of two near-duplicate photos (a large photo "
                        "is held to more: what a messenger copy of it keeps); candidates are each photo's "
                        "nearest by backbone features and by thumbnail")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="feature cache folder (default: DIR/.fieldid-cache, shared with `fieldid train`)")
    p.add_argument("--near-threshold", type=int, default=DEFAULT_NEAR_THRESHOLD, metavar="N",
                   help="max perceptual-hash (phash) Hamming distance for near duplicates")
    p.add_argument("--min-side", type=int, default=DEFAULT_MIN_SIDE, metavar="N",
                   help="flag images whose shorter side is below N pixels")


def _build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="fieldid data check", formatter_class=HelpFormatter,
        description="Check an image folder (flat <class>/ or pre-split train|val|test/<class>/) for "
                    "files training would skip (unsupported format, unreadable, too large), "
                    "duplicates, split leakage, tiny and unusual photos and - from backbone features - "
                    "photos whose label is probably wrong, near-duplicates and outliers. Never changes a photo.",
    )
    add_check_args(p)
    return p


def _validate(args: argparse.Namespace) -> list[str]:
    """Bad flag values as a DataError before any photo is read; returns the exclude kinds."""
    kinds = [k.strip() for k in str(args.exclude_kinds).split(",") if k.strip()]
    bad = sorted(set(kinds) - set(EXCLUDE_KINDS))
    if not kinds:
        raise DataError(f"--exclude-kinds names no kind; valid: {', '.join(EXCLUDE_KINDS)}")
    if bad:
        raise DataError(f"--exclude-kinds: unknown kind(s) {', '.join(bad)}; valid: {', '.join(EXCLUDE_KINDS)}")
    if args.fast and args.write_relabel:
        raise DataError("--write-relabel needs the label check; drop --fast")
    for flag, path in (("--json", args.json), ("--report", args.report), ("--write-exclude", args.write_exclude),
                       ("--write-relabel", args.write_relabel)):
        if path is None:
            continue
        check_output_file(path, flag)
        # The check reads the photos below DIR: an output in a class folder could replace one. A file
        # beside the class folders (DIR/report.html) is never read as a photo, so it may go there.
        refuse_output_inside(path, args.dir, flag, "the dataset's class folders", allowed=lambda t: (
            t.parent == Path(os.path.realpath(args.dir)) and not is_image_path(t)))
    if not 2 <= args.folds <= 20:
        raise DataError(f"--folds must be in [2, 20] (got {args.folds})")
    if args.image_size is not None and not 32 <= args.image_size <= 1024:  # the range `fieldid train` takes
        raise DataError(f"--image-size must be in [32, 1024] (got {args.image_size}); leave it out for the size "
                        "training picks")
    if not 0 <= args.near_threshold <= 64:  # bits that differ between two 64-bit perceptual hashes
        raise DataError(f"--near-threshold must be in [0, 64] (got {args.near_threshold})")
    if args.min_side < 0:
        raise DataError(f"--min-side must be >= 0 (got {args.min_side})")
    if not 0 < args.dup_similarity <= 1:
        raise DataError(f"--dup-similarity must be in (0, 1] (got {args.dup_similarity})")
    if args.cache_dir is not None and args.cache_dir.exists() and not args.cache_dir.is_dir():
        raise DataError(f"--cache-dir {args.cache_dir}: {not_a_folder(args.cache_dir)}")  # found before the feature pass
    return kinds


def run_check(args: argparse.Namespace) -> int:
    """Run the check for parsed :func:`add_check_args` flags; 0 when it ran (findings included)."""
    kinds = _validate(args)
    deep: bool | DeepOptions = False
    if not args.fast:
        from fieldid.training.models import get_backbone

        get_backbone(args.model)  # an unknown name fails before the read pass
        deep = DeepOptions(model=args.model, image_size=args.image_size, folds=args.folds, seed=args.seed,
                           dup_similarity=args.dup_similarity, cache_dir=args.cache_dir)
    report = check_dataset(args.dir, near_threshold=args.near_threshold, min_side=args.min_side, deep=deep)
    print(format_report(report))
    written = []
    if args.report:
        write_html_report(report, args.report)
        written.append(f"report {args.report}")
    if args.write_exclude:
        entries = exclusions(report, kinds)
        header = (f"fieldid data check {report.root} ({_dt.date.today().isoformat()}): {len(entries)} photos to leave "
                  f"out of training ({', '.join(kinds)})\nuse: fieldid train --data {report.root} --exclude "
                  f"{args.write_exclude} ...   (paths relative to the dataset root; '# reason' after each)")
        write_exclude_file(args.write_exclude, entries, header=header)
        written.append(f"exclude list {args.write_exclude} ({len(entries)} photos)")
    if args.write_relabel:
        write_relabel_csv(report, args.write_relabel)
        written.append(f"relabel table {args.write_relabel} ({len(report.label_issues)} photos)")
    for w in written:
        print(f"datacheck: wrote {w}", file=sys.stderr)
    if args.json:
        atomic_write_json(args.json, report.to_dict())
        print(f"datacheck: wrote {args.json}", file=sys.stderr)
    else:
        print(json.dumps(report.to_dict(), separators=(",", ":")))
    return 0


def main_check(argv: list[str] | None = None) -> int:
    """CLI entry: print the report table, then the JSON (or write it to ``--json``).

    Returns 0 whenever the check ran (findings included), 2 on bad input (a :class:`DataError`,
    an unknown model, a file that cannot be written) with one ``error:`` line.
    """
    args = _build_parser().parse_args(argv)
    try:
        return run_check(args)
    except (DataError, OSError) as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except ValueError as e:  # ModelError and friends: bad input by contract (fieldid's errors are ValueErrors)
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2


def _one_line(e: BaseException) -> str:
    if isinstance(e, OSError) and e.filename:
        return f"{e.filename}: {e.strerror or e}"
    return first_line(e)
