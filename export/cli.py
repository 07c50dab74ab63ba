"""CLI for export/: ``fieldid export`` and ``fieldid bench``. Torch-free at import time."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from training.cli import HelpFormatter

__all__ = ["register"]


def _cmd_export(args: argparse.Namespace) -> int:
    from . import export_run

    formats = [f.strip() for f in args.formats.split(",") if f.strip()] if args.formats else None
    m = export_run(args.run, formats=formats, out=args.out, allow_drop=args.allow_drop)
    rows = [{"file": a.file, "precision": a.precision, "size_mb": round(a.size_bytes / 1e6, 2),
             "verification": a.verification.get("status")} for a in m.artifact_list()]
    for r in rows:
        print(f"{r['file']:<24} {r['precision']:<14} {r['size_mb']:>8.2f} MB  {r['verification']}")
    print(json.dumps({"bundle": str(args.out or Path(args.run) / "export"), "artifacts": len(rows)}))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from .formats import FORMAT_NAMES

    p = sub.add_parser("export", help="verified phone artifacts (ONNX, ExecuTorch, TorchScript, Core ML)",
                       formatter_class=HelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="finished run directory")
    p.add_argument("--formats", default=None,
                   help=f"comma-separated subset of: {', '.join(FORMAT_NAMES)} (default: all)")
    p.add_argument("--out", type=Path, default=None, help="bundle folder (default: RUN/export)")
    p.add_argument("--allow-drop", action="store_true", help="keep artifacts that miss a verification bar")
    p.set_defaults(func=_cmd_export)
