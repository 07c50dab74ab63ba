"""`fieldid export` (`fieldid bench` is fieldid/bench_cli.py). Torch-free at import time."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fieldid.cli_common import HelpFormatter, UsageError

__all__ = ["register"]


# `fieldid export` exit codes (also in its --help).
EXPORT_EXIT_CODES = {
    0: "bundle written; every artifact passed, or only compressed ones (int8, int8 weights) missed their bar "
       "(one 'partial:' line each on stderr; the bundle marks them failed and nothing picks them by default)",
    1: "internal error (a bug): one line, rerun with -v for the traceback",
    2: "bad input, or --strict and an artifact missed its bar: nothing written, the previous bundle untouched",
    3: "bundle written, but a full-precision artifact (fp32, fp16) missed its bar: an exporter or runtime is "
       "wrong; the artifacts that passed are usable, the 'partial:' lines name the others",
}


def _cmd_export(args: argparse.Namespace) -> int:
    from fieldid.api import export_bundle
    from fieldid.export.bundle import FULL_PRECISIONS, missed_artifacts

    if args.allow_drop and args.strict:
        raise UsageError("--allow-drop and --strict contradict each other (--allow-drop is the default now)")
    if args.allow_drop:
        print("note: --allow-drop is the default now (the bundle keeps what passed) and will be removed in the "
              "next release; --strict gives the old all-or-nothing export", file=sys.stderr)
    m = export_bundle(args.run, formats=args.formats, out=args.out, strict=args.strict,
               calibration_size=args.calibration_size, data=args.data, int8=not args.no_int8).manifest
    for a in m.artifact_list():
        v = a.verification
        detail = ""
        if "top1_agreement" in v:
            detail = (f"agreement {v['top1_agreement']:.2%}  acc {v['accuracy']:.2%}  "
                      f"max|diff| {v['max_abs_logit_diff']:.1e}")
        print(f"{a.file:<24} {a.format:<17} {a.precision:<13} {a.size_bytes / 1e6:>7.2f} MB  "
              f"{v.get('status', '?'):<15} {detail}")
    st = m.export_stats
    print("time / peak RSS: " + ", ".join(f"{k} {v['seconds']:.0f} s {v['peak_rss_mb']:.0f} MB" for k, v in st.items())
          + " (manifest.json export_stats)")
    missed = missed_artifacts(m)
    for a in missed:
        print(f"partial: {a['file']} missed its bar ({a['why']})", file=sys.stderr)
    print(json.dumps({"bundle": str(args.out or Path(args.run) / "export"), "artifacts": len(m.artifacts),
                      "verification": m.verification_summary.get("status"), "missed": [a["file"] for a in missed]}))
    return 3 if any(a["precision"] in FULL_PRECISIONS for a in missed) else 0


def register(sub: argparse._SubParsersAction) -> None:
    from fieldid.export.formats import FORMAT_NAMES

    p = sub.add_parser(
        "export", help="verified phone artifacts (ONNX, ExecuTorch, TorchScript, Core ML)",
        formatter_class=HelpFormatter,
        description="Write RUN/export (or --out): model.onnx + model.int8.onnx, model.pte + model.int8.pte, "
                    "model.pt + model.ptl, model.mlpackage + model.int8.mlpackage and manifest.json. Every "
                    "artifact with a runtime here is reloaded and checked on the held-out split against PyTorch "
                    "(fp32: max |logit diff| <= 1e-3 and 100% top-1 agreement; int8: >= 99% agreement and <= 1 "
                    "point accuracy drop), each bar decided on at least 300 images (the held-out split, topped up "
                    "with val photos, then augmented views of held-out photos; the manifest records how many). "
                    "An artifact that misses its bar is kept but marked failed, the rest of the bundle is "
                    "written, and one 'partial:' line per miss says why; --strict fails the whole export instead.",
                    epilog="exit codes: " + "; ".join(f"{k} = {v}" for k, v in EXPORT_EXIT_CODES.items()))
    p.add_argument("--run", type=Path, required=True, help="finished run directory")
    p.add_argument("--formats", default=None,
                   help=f"comma-separated subset of: {', '.join(FORMAT_NAMES)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default: RUN/export)")
    p.add_argument("--strict", action="store_true",
                   help="any artifact that misses its bar fails the export (exit 2, nothing written); default: "
                        "keep the artifacts that passed, mark the others failed")
    p.add_argument("--allow-drop", action="store_true",
                   help="deprecated: the default now; accepted for one release")
    p.add_argument("--calibration-size", type=int, default=200,
                   help="training images used to calibrate the int8 models (streamed; the run keeps 400)")
    p.add_argument("--data", type=Path, default=None,
                   help="read images from this dataset folder instead of the run's stored samples (RUN/samples)")
    p.add_argument("--no-int8", action="store_true",
                   help="fp32 artifacts only (fp16 for Core ML): for a server model, which runs fp32 -- skips "
                        "the int8 calibration and recipe search")
    p.set_defaults(func=_cmd_export)
