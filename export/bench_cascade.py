"""``fieldid bench cascade``: does asking the server earn its keep?

On the device run's held-out test split, with the thresholds the runs recorded:

* **device alone** — the ONNX model the phone runs from the device bundle
  (:func:`fieldid.export.phone.select_artifact`: its verified int8 file, else fp32 -- the file the
  demo, the app build and ``fieldid predict`` run);
* **server alone** — the server bundle's fp32 ONNX model (what ``fieldid serve`` runs);
* **cascade** — the device answers unless the phone contract's fallback decision says so
  (:func:`fieldid.export.phone.needs_fallback`: unknown, or calibrated confidence below the
  device's fallback threshold); then the server's answer counts.

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
from .bench_ood import score_images
from .phone import PhoneError, is_unknown, needs_fallback, onnx_session, select_artifact, softmax

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
                  server_bundle: str | Path | None = None, alone_run: str | Path | None = None,
                  out: str | Path | None = None, limit: int | None = None) -> dict[str, Any]:
    """Measure device alone / server alone / cascade; write ``cascade.json`` and ``cascade.md``.

    Args:
        device_run: the device model's run (the ONNX model its phone runs answers first).
        server_run: the server model's run (its bundle's fp32 ONNX model answers the rest).
        device_bundle / server_bundle: bundles (default ``RUN/export``).
        alone_run: the same device model trained *without* the teacher (its ``export/`` bundle):
            adds its rows, alone and in the cascade, so the table shows what distillation buys.
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
    heldout = list(paths)
    _check_same_heldout(device_run, heldout, server_run)
    if limit:
        paths, targets = paths[:limit], targets[:limit]
    s_art = s_man.find("onnx", "fp32")
    srv = score_images(onnx_session(s_path / s_art.file), paths, s_man.preprocess_spec, f"server {s_art.file}")
    y = np.asarray(targets)[srv["kept"]]
    s_pred, s_lat = srv["logits"].argmax(1), float(srv["latency_ms"].mean())
    dev = _device_side(d_path, d_man, paths, srv["kept"], s_pred, s_lat, y)
    rows = [
        {"answer": f"device alone ({d_man.backbone}, {dev['file']})", "accuracy": dev["accuracy"], "sent": 0.0,
         "latency_ms": dev["latency_ms"]},
        {"answer": f"server alone ({s_man.backbone}, {s_art.file})", "accuracy": float((s_pred == y).mean()),
         "sent": 1.0, "latency_ms": s_lat},
        {"answer": "cascade (device, server when needs_fallback)", "accuracy": dev["cascade_accuracy"],
         "sent": dev["sent"], "latency_ms": dev["cascade_latency_ms"]},
    ]
    alone = None
    if alone_run is not None:
        alone_run = Path(alone_run)
        a_path, a_man = _bundle(alone_run, None)
        check_pair(a_man, s_man)
        _check_same_heldout(device_run, heldout, alone_run)
        alone = _device_side(a_path, a_man, paths, srv["kept"], s_pred, s_lat, y)
        rows += [
            {"answer": f"device trained without the teacher ({alone['file']})", "accuracy": alone["accuracy"],
             "sent": 0.0, "latency_ms": alone["latency_ms"]},
            {"answer": "cascade with it", "accuracy": alone["cascade_accuracy"], "sent": alone["sent"],
             "latency_ms": alone["cascade_latency_ms"]},
        ]
    gap = rows[1]["accuracy"] - dev["cascade_accuracy"]
    goals = {"cascade_within_0.5pt_of_server": bool(gap <= CASCADE_GOALS["max_gap_to_server"] + 1e-12),
             "sent_at_most_25pct": bool(dev["sent"] <= CASCADE_GOALS["max_sent"])}
    distillation = _distillation(device_run)
    if alone is not None:
        distillation = {**distillation, "alone_run": str(alone_run.resolve()),
                        "device_accuracy_gain": dev["accuracy"] - alone["accuracy"],
                        "cascade_accuracy_gain": dev["cascade_accuracy"] - alone["cascade_accuracy"],
                        "sent_change": dev["sent"] - alone["sent"]}
    table = _table(rows, goals, gap, len(y), which, d_man, dev["unknown"], distillation if alone else None)
    report = {"device_run": str(device_run.resolve()), "server_run": str(server_run.resolve()), "split": which,
              "images": int(len(y)), "rows": rows, "sent_unknown": dev["unknown"],
              "sent_low_confidence": dev["low_confidence"], "fallback_threshold": d_man.fallback_threshold,
              "unknown_threshold": d_man.unknown.get("threshold"), "gap_to_server": gap, "goals": goals,
              "distillation": distillation, "table": table}
    out = Path(out) if out else device_run / "bench"
    atomic_write_json(out / "cascade.json", report)
    atomic_write_text(out / "cascade.md", "```\n" + table + "\n```\n")
    return report


def _check_same_heldout(device_run: Path, paths: list[Path], other_run: Path) -> None:
    if sorted(map(str, paths)) != sorted(map(str, _test_split(other_run)[0])):
        raise CascadeError(f"{device_run} and {other_run} hold out different images; train both on the same "
                           f"dataset with the same seed (or the server may have trained on the device's test photos)")


def _device_side(path: Path, man: Manifest, paths: list[Path], kept: Any, s_pred: np.ndarray, s_lat: float,
                 y: np.ndarray) -> dict[str, Any]:
    """The ONNX model a phone runs from this bundle (the phone contract's select_artifact) alone and
    in the cascade, with the contract's unknown and fallback decisions at the thresholds the bundle records."""
    try:
        art, _ = select_artifact(man, "auto")
    except PhoneError as e:
        raise CascadeError(str(e)) from None
    dev = score_images(onnx_session(path / art.file), paths, man.preprocess_spec, f"device {art.file}")
    if list(dev["kept"]) != list(kept):
        raise CascadeError("device and server could not read the same images")
    d_pred = dev["logits"].argmax(1)
    conf = softmax(dev["logits"], man.temperature).max(1)
    scores = dev["unknown_score"]
    unknown = is_unknown(scores, (man.unknown or {}).get("threshold")) if scores is not None else np.zeros(len(y), bool)
    sent = needs_fallback(conf, unknown, man.fallback_threshold)
    d_lat = float(dev["latency_ms"].mean())
    return {"file": art.file, "accuracy": float((d_pred == y).mean()),
            "cascade_accuracy": float((np.where(sent, s_pred, d_pred) == y).mean()), "sent": float(sent.mean()),
            "latency_ms": d_lat, "cascade_latency_ms": d_lat + float(sent.mean()) * s_lat,
            "unknown": int(unknown.sum()), "low_confidence": int((sent & ~unknown).sum())}


def _distillation(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "run.json").read_text()).get("distillation", {})
    except (OSError, json.JSONDecodeError):
        return {}


def _table(rows: list[dict[str, Any]], goals: dict[str, bool], gap: float, n: int, which: str, d_man: Manifest,
           unknown: int, distillation: dict[str, Any] | None = None) -> str:
    lines = [f"cascade on the {which} split ({n} images): device answers unless unknown or confidence < "
             f"{d_man.fallback_threshold:.2f}",
             f"{'answer':<58} {'accuracy':>8} {'sent':>6} {'mean ms/answer':>15}"]
    for r in rows:
        lines.append(f"{r['answer']:<58} {r['accuracy']:>8.2%} {r['sent']:>6.1%} {r['latency_ms']:>15.2f}")
    lines.append(f"sent as unknown: {unknown}; cascade is {gap * 100:+.2f} pt below the server")
    if distillation:
        lines.append(f"distillation (weight {distillation.get('weight')}, T {distillation.get('temperature')}) "
                     f"buys: device {distillation['device_accuracy_gain'] * 100:+.2f} pt, cascade "
                     f"{distillation['cascade_accuracy_gain'] * 100:+.2f} pt, sent {distillation['sent_change'] * 100:+.1f} pt")
    lines += [
              "goals: " + "; ".join(f"{k} {'met' if v else 'NOT met'}" for k, v in goals.items())]
    return "\n".join(lines)
