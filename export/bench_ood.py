"""``fieldid bench ood --run RUN --dir DIR``: does the phone's artifact know when it doesn't know?

On the ONNX model a phone runs (:func:`fieldid.export.phone.select_artifact`: the verified int8
file, else fp32), with the manifest's recorded threshold and the phone contract's unknown rule:

* ``DIR/other/**``  — photos of other kinds of things (other datasets, scikit-image photos,
  generated gradients / noise): goal flagged unknown >= 95%;
* ``DIR/unseen/**`` — classes of the same kind the model was not trained on: goal >= 80%;
* the run's held-out test split (in-distribution): goal answered on device (not flagged)
  >= 95%, with >= 99% accuracy among the answered ones.

Also compared, from the same artifact's logits: energy, max-logit and softmax-confidence
scores (AUROC, and the share flagged when each is set to answer as many in-distribution test
photos as the detector does) — the measurement behind the choice of method. And for every
method the share flagged at the goal's acceptance (a cut that answers 95% of the in-distribution
photos, :func:`flagged_at`): what the score's ranking could reach with the threshold moved there,
apart from where training put it (with 66 val photos or fewer, training's 98.5 % quantile is
their highest score).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from fieldid.cli_common import not_a_folder
from fieldid.training.records import atomic_write_json, atomic_write_text

from .manifest import ManifestError, load_manifest
from .phone import is_unknown, onnx_session, prepare, select_artifact, softmax

__all__ = ["OOD_GOALS", "ood_bench", "auroc", "flagged_at", "ood_table", "score_images", "OodBenchError"]

log = logging.getLogger("fieldid.bench")

OOD_GOALS = {"other_flagged": 0.95, "unseen_flagged": 0.80, "in_answered": 0.95, "answered_accuracy": 0.99}
_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}


class OodBenchError(ValueError):
    """Bad ``--ood`` folder or a bundle without an unknown detector."""


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve of "out scores higher than in scores" (ties count half).

    Example:
        >>> auroc(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
        1.0
    """
    a, b = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    if not len(a) or not len(b):
        return float("nan")
    allv = np.concatenate([a, b])
    order = allv.argsort(kind="mergesort")
    ranks = np.empty(len(allv))
    sorted_v = allv[order]
    i = 0
    while i < len(allv):  # average ranks of ties
        j = i
        while j + 1 < len(allv) and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    r_out = ranks[len(a):].sum()
    return float((r_out - len(b) * (len(b) + 1) / 2) / (len(a) * len(b)))


def flagged_at(in_scores: np.ndarray, out_scores: np.ndarray, accept: float) -> float:
    """Share of ``out_scores`` flagged by the lowest cut that still answers ``accept`` of ``in_scores``.

    The cut is an observed in-distribution score (the ``ceil(accept * n)``-th smallest), answered when
    ``score <= cut`` as on the phone; an out score equal to it is answered too. Threshold-free
    comparisons of two detectors (or of one detector and its recorded threshold) use it at the
    goal's acceptance.

    Example:
        >>> flagged_at(np.arange(20.0), np.array([5.0, 18.0, 18.5, 30.0]), 0.95)
        0.5
    """
    a, b = np.sort(np.asarray(in_scores, np.float64)), np.asarray(out_scores, np.float64)
    if not len(a) or not len(b):
        return float("nan")
    k = min(len(a), max(1, int(np.ceil(accept * len(a) - 1e-9))))
    return float((b > a[k - 1]).mean())


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _EXTS)


def score_images(sess: Any, paths: list[Path], spec: Any, what: str) -> dict[str, Any]:
    """Run every readable image through ``sess`` one at a time, as a phone would (the phone
    contract's :func:`~fieldid.export.phone.prepare`: its decode, draft size, pixel limit and preprocessing).

    Returns:
        ``{"logits" (N, C), "unknown_score" (N,) or None, "kept" [indices of paths], "latency_ms" (N,)}``;
        latency is the model call alone (decode and preprocessing excluded). Unreadable files are
        logged and skipped.
    """
    import time

    outputs = [o.name for o in sess.get_outputs()]
    want = ["logits"] + (["unknown_score"] if "unknown_score" in outputs else [])
    name = sess.get_inputs()[0].name
    logits, scores, kept, lat = [], [], [], []
    for i, p in enumerate(paths):
        try:
            x = prepare(p.read_bytes(), spec)
        except (ValueError, OSError) as e:  # ImageInputError is a ValueError
            log.warning("skipping unreadable %s (%s)", p, e)
            continue
        t0 = time.perf_counter()
        res = sess.run(want, {name: x})
        lat.append((time.perf_counter() - t0) * 1e3)
        logits.append(res[0][0])
        if len(res) > 1:
            scores.append(float(np.asarray(res[1]).reshape(-1)[0]))
        kept.append(i)
        if (i + 1) % 50 == 0 or i + 1 == len(paths):
            log.info("bench: %s %d/%d images", what, i + 1, len(paths))
    return {"logits": np.asarray(logits, np.float32).reshape(len(kept), -1),
            "unknown_score": np.asarray(scores, np.float64) if len(want) > 1 else None,
            "kept": kept, "latency_ms": np.asarray(lat, np.float64)}


def _run(sess: Any, paths: list[Path], spec: Any, what: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    r = score_images(sess, paths, spec, what)
    return r["logits"], r["unknown_score"], r["kept"]


def _baselines(logits: np.ndarray, temperature: float) -> dict[str, np.ndarray]:
    """Logit-only unknown scores, higher = more unknown (the numpy twin of training.ood.baseline_scores)."""
    z = logits.astype(np.float64)
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0] if len(z) else np.zeros(0)
    return {"energy": -lse, "max_logit": -z.max(1) if len(z) else np.zeros(0),
            "softmax": -softmax(z, temperature).max(1) if len(z) else np.zeros(0)}


def ood_bench(run_dir: str | Path, ood_dir: str | Path, *, bundle: str | Path | None = None,
              out: str | Path | None = None) -> dict[str, Any]:
    """Measure the unknown answer of the ONNX file a phone runs; write ``ood.json`` and ``ood.md``.

    Args:
        run_dir: the run (its held-out test split is the in-distribution set).
        ood_dir: folder with ``other/`` and/or ``unseen/`` sub-folders of images (any depth).
        bundle: export bundle (default ``RUN/export``).
        out: output folder (default ``RUN/bench``).

    Returns:
        ``{"rows": [...], "goals": {...}, "methods": {...}, "table": str}``.

    Raises:
        OodBenchError: no such folder, no images in it, or a bundle without ``unknown_score``.
    """
    from fieldid.training.data import load_split
    from fieldid.training.records import load_record

    run_dir, ood_dir = Path(run_dir), Path(ood_dir)
    if not ood_dir.is_dir():
        raise OodBenchError(f"{ood_dir}: {not_a_folder(ood_dir)}")
    groups = {g: _images(ood_dir / g) for g in ("other", "unseen") if (ood_dir / g).is_dir()}
    if not any(groups.values()):
        raise OodBenchError(f"{ood_dir}: needs images under other/ and/or unseen/")
    try:
        manifest = load_manifest(Path(bundle) if bundle else run_dir / "export")
        art, _ = select_artifact(manifest)
    except ManifestError as e:  # incl. PhoneError: no ONNX model a phone could run
        raise OodBenchError(str(e)) from None
    if not art.unknown_output or not manifest.unknown:
        raise OodBenchError(f"{art.file}: has no unknown_score output (exported from a run without a detector); "
                            f"retrain and re-export")
    threshold = float(manifest.unknown["threshold"])
    record = load_record(run_dir)
    split = load_split(run_dir / record.split)
    which = "test" if split.paths("test") else "val"
    sess = onnx_session((Path(bundle) if bundle else run_dir / "export") / art.file)
    spec = manifest.preprocess_spec
    in_logits, in_scores, kept = _run(sess, split.paths(which), spec, f"in-distribution ({which})")
    in_y = np.asarray(split.targets(which))[kept]
    results: dict[str, Any] = {}
    answered = ~is_unknown(in_scores, threshold)
    acc_answered = float((in_logits.argmax(1)[answered] == in_y[answered]).mean()) if answered.any() else 0.0
    rows = [{"set": f"in-distribution ({which} split)", "images": int(len(in_scores)),
             "measure": "answered on device", "value": float(answered.mean()), "goal": OOD_GOALS["in_answered"]},
            {"set": "in-distribution, answered", "images": int(answered.sum()), "measure": "accuracy",
             "value": acc_answered, "goal": OOD_GOALS["answered_accuracy"]}]
    methods: dict[str, dict[str, Any]] = {"mahalanobis (in the artifact)": {}}
    base_in = _baselines(in_logits, manifest.temperature)
    accept = float(answered.mean())
    at_goal = OOD_GOALS["in_answered"]  # the acceptance the goal asks for, whatever the threshold answers
    for g, paths in groups.items():
        lo, sc, _ = _run(sess, paths, spec, g)
        goal = OOD_GOALS[f"{g}_flagged"]
        rows.append({"set": f"{g} ({'other kinds of things' if g == 'other' else 'same kind, not trained on'})",
                     "images": int(len(sc)), "measure": "flagged unknown", "value": float(is_unknown(sc, threshold).mean()),
                     "goal": goal})
        results[g] = {"scores": sc.tolist()}
        methods["mahalanobis (in the artifact)"][g] = {"auroc": auroc(in_scores, sc),
                                                        "flagged": float(is_unknown(sc, threshold).mean()),
                                                        "flagged_at_goal": flagged_at(in_scores, sc, at_goal)}
        for name, s in _baselines(lo, manifest.temperature).items():
            # The same in-distribution acceptance as the detector, so the flagged shares compare fairly.
            cut = float(np.quantile(base_in[name], accept)) if len(base_in[name]) else 0.0
            methods.setdefault(name, {})[g] = {"auroc": auroc(base_in[name], s), "flagged": float((s > cut).mean()),
                                               "flagged_at_goal": flagged_at(base_in[name], s, at_goal)}
    for r in rows:
        r["met"] = bool(r["value"] >= r["goal"])
    table = ood_table(rows, methods, art.file, threshold)
    report = {"artifact": art.file, "threshold": threshold, "unknown": manifest.unknown, "rows": rows,
              "methods": methods, "goals_met": all(r["met"] for r in rows), "table": table,
              "ood_dir": str(ood_dir.resolve())}
    out = Path(out) if out else run_dir / "bench"
    atomic_write_json(out / "ood.json", report)
    atomic_write_text(out / "ood.md", "```\n" + table + "\n```\n")
    return report


def ood_table(rows: list[dict[str, Any]], methods: dict[str, dict[str, Any]], artifact: str, threshold: float) -> str:
    """The goals table and the method comparison, as fixed-width text."""
    lines = [f"unknown answer of {artifact} (threshold {threshold:.4g}, recorded at training)",
             f"{'set':<46} {'images':>6}  {'measure':<20} {'value':>7}  {'goal':>6}  met"]
    for r in rows:
        lines.append(f"{r['set']:<46} {r['images']:>6}  {r['measure']:<20} {r['value']:>7.1%}  "
                     f">={r['goal']:.0%}  {'yes' if r['met'] else 'NO'}")
    groups = sorted({g for m in methods.values() for g in m})
    at_goal = f"{OOD_GOALS['in_answered']:.0%}"
    lines += ["", "method comparison on the same artifact (AUROC; flagged at the detector's in-distribution "
                  f"acceptance; flagged at {at_goal} of in-distribution photos answered)",
              f"{'method':<32} " + " ".join(f"{g + ' AUROC':>13} {g + ' flagged':>15} {'@' + at_goal:>6}"
                                            for g in groups)]
    for name, per in methods.items():
        lines.append(f"{name:<32} " + " ".join(f"{per[g]['auroc']:>13.3f} {per[g]['flagged']:>15.1%} "
                                                f"{per[g]['flagged_at_goal']:>6.1%}" for g in groups if g in per))
    return "\n".join(lines)
