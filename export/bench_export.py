"""``make bench-export``: time and peak memory of ``fieldid export``, per format, for several runs side by side.

Each run is exported in its own process (``fieldid export``), so one export's peak cannot hide in
another's; the numbers are the ones the export measured itself and wrote into its manifest's
``export_stats``. Next to them: the run's own training time (``metrics.json``), because the goal
is an export that takes no longer than the training did, and peak RSS <= 3 GB.

Usage::

    fieldid bench export --run runs/reef224 --run runs/reef [--formats ...]
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from fieldid.machine import describe_machine

__all__ = ["export_stats_table", "run_bench_export", "PEAK_RSS_GOAL_MB"]

PEAK_RSS_GOAL_MB = 3000  # issue 9: fits beside other work on a 16 GB laptop
_STEPS = ("inputs", "pytorch", "onnx", "executorch", "torchscript", "coreml", "total")


def _run_info(run: Path) -> dict[str, Any]:
    rec = json.loads((run / "run.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    split = json.loads((run / "split.json").read_text()) if (run / "split.json").is_file() else {}
    return {"name": run.name, "backbone": rec.get("backbone"), "px": rec.get("preprocess", {}).get("crop_size"),
            "train_images": len(split.get("files", {}).get("train", [])),
            "train_s": metrics.get("training", {}).get("seconds")}


def _failed_artifacts(manifest: dict[str, Any]) -> list[str]:
    """One line per verification miss of a bundle's artifacts (the export's own failure lines).

    ``structure_only`` (Core ML on Linux) is not a failure: nothing here can run those files.
    """
    lines = (manifest.get("verification_summary") or {}).get("failures") or []
    out = []
    for a in manifest.get("artifacts", []):  # the manifest lists its artifacts in order
        if (a.get("verification") or {}).get("status") == "failed":
            mine = [ln for ln in lines if ln.startswith(f"{a.get('file')} ")]
            out += mine or [f"{a.get('file')} failed verification"]
    return out


def export_stats_table(results: list[dict[str, Any]]) -> str:
    """Rows = steps, two columns (seconds, peak RSS MB) per run; goals under the table."""
    head = ["step"] + [f"{r['info']['name']} ({r['info']['px']} px) {c}" for r in results for c in ("s", "peak MB")]
    rows = []
    for step in _STEPS:
        cells = [step]
        for r in results:
            st = r["stats"].get(step)
            cells += [f"{st['seconds']:.1f}", f"{st['peak_rss_mb']:.0f}"] if st else ["-", "-"]
        if any(c != "-" for c in cells[1:]):
            rows.append(cells)
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    lines = [fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    lines.append("peak MB = the step's own peak resident memory (VmHWM reset before each step); "
                 "total peak = the largest of them")
    for r in results:
        info, tot = r["info"], r["stats"].get("total", {})
        train_s = info.get("train_s")
        ratio = f"{tot['seconds'] / train_s:.2f}x the training time ({train_s:.0f} s)" if train_s else "no training time"
        ok_t = "met" if train_s and tot["seconds"] <= train_s else "NOT met"
        ok_m = "met" if tot.get("peak_rss_mb", 1e9) <= PEAK_RSS_GOAL_MB else "NOT met"
        lines.append(f"{info['name']}: {info['backbone']} {info['px']} px, {info['train_images']} training images, "
                     f"{tot.get('calibration_images', '?')} calibration images: export {tot.get('seconds', 0):.0f} s = "
                     f"{ratio} -> {ok_t}; peak RSS {tot.get('peak_rss_mb', 0):.0f} MB (goal <= "
                     f"{PEAK_RSS_GOAL_MB} MB) -> {ok_m}")
        for why in r.get("failed", []):
            lines.append(f"  {info['name']}: kept but failed verification: {why}")
    return "\n".join(lines)


def run_bench_export(runs: list[Path], *, formats: str | None = None, out: Path | None = None,
                     reuse: bool = False) -> int:
    """``fieldid bench export``: export each run in its own process (or, with ``reuse``, read an existing
    bundle's ``export_stats``), print the table and the machine line; the exit code (2 for a folder that
    is not a run, an export's own code when it fails)."""
    results = []
    for run in map(Path, runs):
        if not (run / "run.json").is_file():
            print(f"bench-export: error: {run}: not a run directory (no run.json)", file=sys.stderr)
            return 2
        bundle = (Path(out) / run.name) if out else run / "export"
        if not reuse or not (bundle / "manifest.json").is_file():
            # Export keeps an artifact that misses a verification bar, marked failed (the default; not
            # --strict), so the time and memory table is printed anyway; the failures are listed under it.
            cmd = [sys.executable, "-m", "fieldid", "export", "--run", str(run), "--out", str(bundle)]
            if formats:
                cmd += ["--formats", formats]
            print(f"bench-export: {' '.join(cmd[2:])}", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, env=os.environ.copy())
            if proc.returncode:
                return proc.returncode
        manifest = json.loads((bundle / "manifest.json").read_text())
        results.append({"info": _run_info(run), "stats": manifest.get("export_stats", {}),
                        "failed": _failed_artifacts(manifest)})
    print(export_stats_table(results))
    print(describe_machine())
    return 0
