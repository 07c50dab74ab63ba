"""CLI for export/: ``fieldid export`` and ``fieldid bench``. Torch-free at import time."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from fieldid.cli_common import HelpFormatter

__all__ = ["register"]


def _cmd_export(args: argparse.Namespace) -> int:
    from fieldid.api import export_bundle

    m = export_bundle(args.run, formats=args.formats, out=args.out, allow_drop=args.allow_drop,
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
    print(json.dumps({"bundle": str(args.out or Path(args.run) / "export"), "artifacts": len(m.artifacts),
                      "verification": m.verification_summary.get("status")}))
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "cascade":
        from .cascade import cascade_bench

        if args.server_run is None:
            raise ValueError("bench cascade needs --server-run SERVER_RUN")
        r = cascade_bench(args.run, args.server_run, device_bundle=args.bundle, server_bundle=args.server_bundle,
                          alone_run=args.alone_run, out=args.out, limit=args.limit)
        print(r["table"])
        print(json.dumps({"bench": str(args.out or Path(args.run) / "bench"), "files": ["cascade.json", "cascade.md"],
                          "goals": r["goals"]}))
        return 0
    if args.ood is not None:
        from .ood_bench import ood_bench

        r = ood_bench(args.run, args.ood, bundle=args.bundle, out=args.out)
        print(r["table"])
        print(json.dumps({"bench": str(args.out or Path(args.run) / "bench"), "files": ["ood.json", "ood.md"],
                          "goals_met": r["goals_met"]}))
        return 0
    from . import bench_run

    r = bench_run(args.run, data=args.data, bundle=args.bundle, out=args.out, iters=args.iters,
                  batch=args.batch, batches=args.batches, limit=args.limit, settle_s=args.settle)
    print(r["table"])
    out = args.out or Path(args.run) / "bench"
    print(json.dumps({"bench": str(out), "files": ["bench.json", "bench.md", "bench.png"],
                      "images": r["meta"]["images"]}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .formats import BENCH_SETTLE_S, FORMAT_NAMES

    p = sub.add_parser(
        "export", help="verified phone artifacts (ONNX, ExecuTorch, TorchScript, Core ML)",
        formatter_class=HelpFormatter,
        description="Write RUN/export (or --out): model.onnx + model.int8.onnx, model.pte + model.int8.pte, "
                    "model.pt + model.ptl, model.mlpackage + model.int8.mlpackage and manifest.json. Every "
                    "artifact with a runtime here is reloaded and checked on the held-out split against PyTorch "
                    "(fp32: max |logit diff| <= 1e-3 and 100% top-1 agreement; int8: >= 99% agreement and <= 1 "
                    "point accuracy drop); a miss exits 2 and leaves the previous bundle untouched.")
    p.add_argument("--run", type=Path, required=True, help="finished run directory")
    p.add_argument("--formats", default=None,
                   help=f"comma-separated subset of: {', '.join(FORMAT_NAMES)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default: RUN/export)")
    p.add_argument("--allow-drop", action="store_true",
                   help="keep artifacts that miss a verification bar (recorded as failed in the manifest)")
    p.add_argument("--calibration-size", type=int, default=200,
                   help="training images used to calibrate the int8 models (streamed; the run keeps 400)")
    p.add_argument("--data", type=Path, default=None,
                   help="read images from this dataset folder instead of the run's stored samples (RUN/samples)")
    p.add_argument("--no-int8", action="store_true",
                   help="fp32 artifacts only (fp16 for Core ML): for a server model, which runs fp32 -- skips "
                        "the int8 calibration and recipe search")
    p.set_defaults(func=_cmd_export)

    b = sub.add_parser(
        "bench", help="size, accuracy, latency and throughput of every exported artifact",
        formatter_class=HelpFormatter,
        description="One row per artifact, eager PyTorch fp32 first: size, accuracy, agreement with eager, "
                    "batch-1 latency p50/p95 with 1 thread and all threads, batch-32 throughput, load time. "
                    "Prints the table and, under it, the goals (best on-device batch-1 speedup over eager fp32 "
                    ">= 10x at 1 and all threads; each int8 file <= 30% of its format's fp32 file, met or not), "
                    "and writes bench.json, bench.md and bench.png.")
    b.add_argument("what", nargs="?", choices=["cascade"], default=None,
                   help="'cascade': device alone vs server alone vs device-then-server on the held-out split "
                        "(needs --server-run); omit for the per-artifact table")
    b.add_argument("--run", type=Path, required=True, help="run directory whose bundle is benchmarked")
    b.add_argument("--server-run", type=Path, default=None, help="cascade: the server model's run directory")
    b.add_argument("--server-bundle", type=Path, default=None, help="cascade: server bundle (default: SERVER_RUN/export)")
    b.add_argument("--alone-run", type=Path, default=None,
                   help="cascade: the same device model trained without --teacher; adds its rows, so the table "
                        "shows what distillation buys")
    b.add_argument("--data", type=Path, default=None,
                   help="ImageFolder to measure accuracy on (default: the run's held-out split)")
    b.add_argument("--bundle", type=Path, default=None, help="export bundle (default: RUN/export)")
    b.add_argument("--out", type=Path, default=None, help="folder for bench.json/.md/.png (default: RUN/bench)")
    b.add_argument("--iters", type=int, default=50, help="timed batch-1 runs per thread setting")
    b.add_argument("--batch", type=int, default=32, help="batch size for the throughput column")
    b.add_argument("--batches", type=int, default=3, help="timed batches for the throughput column")
    b.add_argument("--limit", type=int, default=None, help="use at most this many images for accuracy")
    b.add_argument("--settle", type=float, default=BENCH_SETTLE_S,
                   help="seconds to pause before each timed block so one runtime's spinning threads "
                        "do not slow the next (0 for a quick smoke run)")
    b.add_argument("--ood", type=Path, default=None,
                   help="instead: the unknown answer of the int8 ONNX artifact on DIR/other/ (other kinds of "
                        "things, goal >= 95%% flagged) and DIR/unseen/ (same kind, not trained on, >= 80%%) vs the "
                        "held-out split (>= 95%% answered, >= 99%% accurate); writes ood.json and ood.md")
    b.set_defaults(func=_cmd_bench)
