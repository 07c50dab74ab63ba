"""``fieldid bench cascade``: does asking the server earn its keep?

On the device run's held-out test split, with the thresholds the runs recorded:

* **device alone** — the device bundle's int8 ONNX model (what the phone runs);
* **server alone** — the server bundle's fp32 ONNX model (what ``fieldid serve`` runs);
* **cascade** — the device answers unless its answer ``needs_fallback`` (unknown, or
  confidence below the device's fallback threshold); then the server's answer counts.

Reported: accuracy of each, the share of photos sent to the server, and the mean latency per
answer (device latency + server latency for the sent share; both are model calls in ONNX
Runtime with one thread here, no network). Goal: cascade accuracy within 0.5 point of the
server's while sending <= 25% of photos.

The two models must have identical labels (same classes, same order) and the same held-out
split; anything else is refused with one clear line.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from fieldid.records import atomic_write_json, atomic_write_text

from .manifest import CascadeError, Manifest, check_pair, load_manifest
from .ood_bench import onnx_session, score_images
from .phone import softmax

__all__ = ["CASCADE_GOALS", "CascadeError", "check_pair", "cascade_bench"]

log = logging.getLogger("fieldid.bench")
CASCADE_GOALS = {"max_gap_to_server": 0.005, "max_sent": 0.25}


def _bundle(run: Path, bundle: str | Path | None) -> tuple[Path, Manifest]:
    path = Path(bundle) if bundle else run / "export"
    return path, load_manifest(path)


def _test_split(run: Path) -> tuple[list[Path], list[int], str]:
    from fieldid.training.data import load_split
    from fieldid.training.records import load_record

    split = load_split(run / load_record(run).split)
    which = "test" if split.paths("test") else "val"
    return split.paths(which), split.targets(which), which


def cascade_bench(device_run: str | Path, server_run: str | Path, *, device_bundle: str | Path | None = None,
                  server_bundle: str | Path | None = None, out: str | Path | None = None,
                  limit: int | None = None) -> dict[str, Any]:
    """Measure device alone / server alone / cascade; write ``cascade.json`` and ``cascade.md``.

    Args:
        device_run: the device model's run (its bundle's int8 ONNX model answers first).
        server_run: the server model's run (its bundle's fp32 ONNX model answers the rest).
        device_bundle / server_bundle: bundles (default ``RUN/export``).
        out: output folder (default ``DEVICE_RUN/bench``).
        limit: use at most this many held-out images (quick runs).

    Returns:
        ``{"rows": [...], "sent": ..., "goals": {...}, "table": str, ...}``.

    Raises:
        CascadeError: labels differ, the held-out splits differ, or a bundle lacks the artifact.
    """
    device_run, server_run = Path(device_run), Path(server_run)
    d_path, d_man = _bundle(device_run, device_bundle)
    s_path, s_man = _bundle(server_run, server_bundle)
    check_pair(d_man, s_man)
    paths, targets, which = _test_split(device_run)
    s_paths, _, _ = _test_split(server_run)
    if sorted(map(str, paths)) != sorted(map(str, s_paths)):
        raise CascadeError(f"{device_run} and {server_run} hold out different images; train both on the same "
                           f"dataset with the same seed (or the server may have trained on the device's test photos)")
    if limit:
        paths, targets = paths[:limit], targets[:limit]
    d_art, s_art = d_man.find("onnx", "int8"), s_man.find("onnx", "fp32")
    dev = score_images(onnx_session(d_path / d_art.file), paths, d_man.preprocess_spec, f"device {d_art.file}")
    srv = score_images(onnx_session(s_path / s_art.file), paths, s_man.preprocess_spec, f"server {s_art.file}")
    if dev["kept"] != srv["kept"]:
        raise CascadeError("device and server could not read the same images")
    y = np.asarray(targets)[dev["kept"]]
    d_pred, s_pred = dev["logits"].argmax(1), srv["logits"].argmax(1)
    conf = softmax(dev["logits"], d_man.temperature).max(1)
    unknown = (dev["unknown_score"] > float(d_man.unknown["threshold"])) if (
        dev["unknown_score"] is not None and d_man.unknown) else np.zeros(len(y), bool)
    sent = unknown | (conf < d_man.fallback_threshold)
    c_pred = np.where(sent, s_pred, d_pred)
    d_lat, s_lat = float(dev["latency_ms"].mean()), float(srv["latency_ms"].mean())
    acc = {k: float((p == y).mean()) for k, p in (("device", d_pred), ("server", s_pred), ("cascade", c_pred))}
    rows = [
        {"answer": f"device alone ({d_man.backbone}, {d_art.file})", "accuracy": acc["device"], "sent": 0.0,
         "latency_ms": d_lat},
        {"answer": f"server alone ({s_man.backbone}, {s_art.file})", "accuracy": acc["server"], "sent": 1.0,
         "latency_ms": s_lat},
        {"answer": "cascade (device, server when needs_fallback)", "accuracy": acc["cascade"],
         "sent": float(sent.mean()), "latency_ms": d_lat + float(sent.mean()) * s_lat},
    ]
    gap = acc["server"] - acc["cascade"]
    goals = {"cascade_within_0.5pt_of_server": bool(gap <= CASCADE_GOALS["max_gap_to_server"] + 1e-12),
             "sent_at_most_25pct": bool(sent.mean() <= CASCADE_GOALS["max_sent"])}
    table = _table(rows, goals, gap, len(y), which, d_man, int(unknown.sum()))
    report = {"device_run": str(device_run.resolve()), "server_run": str(server_run.resolve()), "split": which,
              "images": int(len(y)), "rows": rows, "sent_unknown": int(unknown.sum()),
              "sent_low_confidence": int((sent & ~unknown).sum()), "fallback_threshold": d_man.fallback_threshold,
              "unknown_threshold": d_man.unknown.get("threshold"), "gap_to_server": gap, "goals": goals,
              "distillation": _distillation(device_run), "table": table}
    out = Path(out) if out else device_run / "bench"
    atomic_write_json(out / "cascade.json", report)
    atomic_write_text(out / "cascade.md", "```\n" + table + "\n```\n")
    return report


def _distillation(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "run.json").read_text()).get("distillation", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _table(rows: list[dict[str, Any]], goals: dict[str, bool], gap: float, n: int, which: str, d_man: Manifest,
           unknown: int) -> str:
    lines = [f"cascade on the {which} split ({n} images): device answers unless unknown or confidence < "
             f"{d_man.fallback_threshold:.2f}",
             f"{'answer':<58} {'accuracy':>8} {'sent':>6} {'mean ms/answer':>15}"]
    for r in rows:
        lines.append(f"{r['answer']:<58} {r['accuracy']:>8.2%} {r['sent']:>6.1%} {r['latency_ms']:>15.2f}")
    lines += [f"sent as unknown: {unknown}; cascade is {gap * 100:+.2f} pt below the server",
              "goals: " + "; ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items())]
    return "\n".join(lines)
