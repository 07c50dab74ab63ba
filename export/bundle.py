"""``fieldid export``: run directory -> verified bundle of phone artifacts + ``manifest.json``.

Each format is one exporter function registered in ``EXPORTERS``. An exporter writes its
files into a staging folder and returns :class:`Artifact` records; verification against the
PyTorch model on the held-out split is part of every export. The staging folder replaces the
old bundle only when everything succeeded, so a failed export never destroys a good one.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import importlib.metadata
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from training.data import load_split
from training.images import ImageError, load_rgb
from training.records import RecordError, RunRecord, atomic_write_bytes, load_record
from training.train import load_run_model

from .manifest import Artifact, Manifest, ManifestError
from .phone import preprocess

__all__ = [
    "ExportError",
    "ExportContext",
    "EXPORTERS",
    "ALL_FORMATS",
    "register_exporter",
    "export_run",
    "verify_logits",
    "file_sha256",
    "FP32_MAX_ABS_DIFF",
    "INT8_MIN_AGREEMENT",
    "INT8_MAX_ACCURACY_DROP",
]

log = logging.getLogger("fieldid.export")

# Verification bars (issue: fp32 <= 1e-3 max |logit diff| and 100% top-1; int8 >= 99% / <= 1 pt).
FP32_MAX_ABS_DIFF = 1e-3
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_ACCURACY_DROP = 0.01


class ExportError(ValueError):
    """An export that cannot be done as asked (bad run, unknown format, missed bar, ...)."""


class LogitsModel(nn.Module):
    """Fixes the forward argument name to ``input`` for every exporter and runtime."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002 - the ONNX input name
        return self.model(input)


@dataclass
class ExportContext:
    """What every exporter gets: the fp32 model, data already preprocessed the phone's way."""

    run_dir: Path
    record: RunRecord
    model: nn.Module  # fp32, eval, wrapped in LogitsModel
    stage: Path  # staging folder; final bundle after success
    heldout: np.ndarray  # (N, 3, H, W) float32, phone preprocessing
    heldout_targets: np.ndarray  # (N,)
    heldout_split: str
    calibration: np.ndarray  # (M, 3, H, W) training images, eval preprocessing
    reference_logits: np.ndarray  # fp32 PyTorch logits on ``heldout``
    allow_drop: bool = False
    failures: list[str] = field(default_factory=list)

    @property
    def example(self) -> torch.Tensor:
        return torch.from_numpy(self.heldout[:1].copy())

    @property
    def reference_accuracy(self) -> float:
        return float((self.reference_logits.argmax(1) == self.heldout_targets).mean())


Exporter = Callable[[ExportContext], list[Artifact]]
EXPORTERS: dict[str, Exporter] = {}


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    def deco(fn: Exporter) -> Exporter:
        EXPORTERS[name] = fn
        return fn
    return deco


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    paths = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in paths:  # a directory artifact (.mlpackage) hashes its files in a stable order
        if path.is_dir():
            h.update(p.relative_to(path).as_posix().encode())
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def make_artifact(ctx: ExportContext, file: str, format: str, precision: str, **kw: Any) -> Artifact:
    path = ctx.stage / file
    return Artifact(file=file, format=format, precision=precision, sha256=file_sha256(path),
                    size_bytes=_size(path), **kw)


def verify_logits(ctx: ExportContext, logits: np.ndarray, *, precision: str, name: str) -> dict[str, Any]:
    """Compare an artifact's held-out logits with PyTorch's; record pass/fail against the bars."""
    ref = ctx.reference_logits
    y = ctx.heldout_targets
    logits = np.asarray(logits, dtype=np.float32).reshape(ref.shape)
    agree = float((logits.argmax(1) == ref.argmax(1)).mean())
    acc = float((logits.argmax(1) == y).mean())
    diff = float(np.abs(logits - ref).max())
    if precision == "fp32":
        passed = diff <= FP32_MAX_ABS_DIFF and agree == 1.0
        bar = f"max|diff| <= {FP32_MAX_ABS_DIFF:g} and 100% top-1 agreement"
    else:
        drop = ctx.reference_accuracy - acc
        passed = agree >= INT8_MIN_AGREEMENT and drop <= INT8_MAX_ACCURACY_DROP + 1e-9
        bar = f"top-1 agreement >= {INT8_MIN_AGREEMENT:.0%} and accuracy drop <= {INT8_MAX_ACCURACY_DROP * 100:.0f} pt"
    result = {
        "status": "passed" if passed else "failed", "bar": bar, "split": ctx.heldout_split,
        "num_images": int(len(y)), "max_abs_logit_diff": diff, "top1_agreement": agree,
        "accuracy": acc, "reference_accuracy": ctx.reference_accuracy,
    }
    if not passed:
        ctx.failures.append(f"{name}: agreement {agree:.4f}, accuracy {acc:.4f} vs {ctx.reference_accuracy:.4f}, "
                            f"max|diff| {diff:.2e} (bar: {bar})")
    log.info("verified %-22s agreement %.4f  acc %.4f (ref %.4f)  max|diff| %.2e  %s", name, agree, acc,
             ctx.reference_accuracy, diff, result["status"])
    return result


# --------------------------------------------------------------------------- data for verification
def _load_arrays(paths: list[Path], spec: Any) -> tuple[np.ndarray, list[int]]:
    arrays, kept = [], []
    for i, p in enumerate(paths):
        try:
            arrays.append(preprocess(load_rgb(p), spec)[0])
            kept.append(i)
        except ImageError as e:
            log.warning("skipping unreadable image %s", e)
    if not arrays:
        return np.zeros((0, 3, spec.crop_size, spec.crop_size), np.float32), kept
    return np.stack(arrays).astype(np.float32), kept


def _context(run_dir: Path, record: RunRecord, stage: Path, *, calibration_size: int, allow_drop: bool) -> ExportContext:
    split_path = run_dir / record.split
    if not split_path.is_file():
        raise ExportError(f"{run_dir}: {record.split} missing; cannot verify without the held-out split")
    split = load_split(split_path)
    which = "test" if split.files.get("test") else "val"
    spec = record.preprocess_spec
    heldout, kept = _load_arrays(split.paths(which), spec)
    if len(heldout) == 0:
        raise ExportError(f"{run_dir}: no readable held-out images under {split.root} to verify against")
    targets = np.asarray(split.targets(which), dtype=np.int64)[kept]
    train_paths = split.paths("train")
    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(train_paths), size=min(calibration_size, len(train_paths)), replace=False))
    calib, _ = _load_arrays([train_paths[i] for i in pick], spec)
    model = LogitsModel(load_run_model(run_dir, record)).eval()
    with torch.no_grad():
        ref = torch.cat([model(torch.from_numpy(heldout[i:i + 64])) for i in range(0, len(heldout), 64)]).numpy()
    return ExportContext(run_dir=run_dir, record=record, model=model, stage=stage, heldout=heldout,
                         heldout_targets=targets, heldout_split=which, calibration=calib,
                         reference_logits=ref, allow_drop=allow_drop)


# --------------------------------------------------------------------------- built-in exporters
@register_exporter("pytorch")
def export_pytorch(ctx: ExportContext) -> list[Artifact]:
    """The fp32 state dict that the TorchServe handler loads (``weights_only=True``)."""
    shutil.copyfile(ctx.run_dir / ctx.record.weights, ctx.stage / "model.pth")
    model = load_run_model(ctx.run_dir, ctx.record)
    model.load_state_dict(torch.load(ctx.stage / "model.pth", map_location="cpu", weights_only=True))
    with torch.no_grad():
        logits = model(torch.from_numpy(ctx.heldout)).numpy()
    ver = verify_logits(ctx, logits, precision="fp32", name="model.pth")
    return [make_artifact(ctx, "model.pth", "pytorch", "fp32", method="state dict of the best checkpoint",
                          verification=ver)]


def _tool_versions() -> dict[str, str]:
    out = {}
    for dist in ("fieldid", "torch", "torchvision", "timm", "onnx", "onnxruntime", "executorch", "torchao",
                 "coremltools", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


ALL_FORMATS = ("pytorch", "onnx", "executorch", "torchscript", "coreml")


def _swap_in(stage: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``stage`` folder; the old bundle survives any failure before."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def export_run(run_dir: str | Path, *, formats: list[str] | None = None, out: str | Path | None = None,
               allow_drop: bool = False, calibration_size: int = 200) -> Manifest:
    """Export a finished run to every requested format, verify each, write ``manifest.json``.

    Args:
        run_dir: a finished ``fieldid train`` run directory.
        formats: subset of ``ALL_FORMATS`` (default: all). ``pytorch`` is always included.
        out: bundle folder (default ``RUN/export``); replaced only when the export succeeds.
        allow_drop: keep artifacts that miss a verification bar instead of failing.
        calibration_size: training images used to calibrate int8 quantization.

    Returns:
        The written :class:`Manifest`.

    Example:
        >>> m = export_run("runs/salmon", formats=["onnx"])  # doctest: +SKIP
        >>> [a["file"] for a in m.artifacts]
        ['model.pth', 'model.onnx', 'model.int8.onnx']
    """
    run_dir = Path(run_dir)
    try:
        record = load_record(run_dir)
    except RecordError as e:
        raise ExportError(str(e)) from None
    wanted = list(dict.fromkeys(["pytorch"] + list(formats or ALL_FORMATS)))
    unknown = [f for f in wanted if f not in EXPORTERS]
    if unknown:
        raise ExportError(f"unknown format(s) {', '.join(unknown)}; valid: {', '.join(EXPORTERS)}")
    out = Path(out) if out else run_dir / "export"
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ExportError(f"{out}: output location is not writable")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-", dir=parent))
    os.chmod(stage, 0o755)  # mkdtemp's 0700 would hide the bundle from a server running as another user
    try:
        ctx = _context(run_dir, record, stage, calibration_size=calibration_size, allow_drop=allow_drop)
        artifacts: list[Artifact] = []
        timings = {}
        for fmt in wanted:
            t0 = time.time()
            log.info("exporting %s ...", fmt)
            artifacts += EXPORTERS[fmt](ctx)
            timings[fmt] = round(time.time() - t0, 1)
        metrics_path = run_dir / record.metrics
        metrics = {}
        if metrics_path.is_file():
            import json

            m = json.loads(metrics_path.read_text())
            metrics = {k: m.get(k) for k in ("split", "accuracy", "macro_f1", "num_images")}
        manifest = Manifest(
            name=record.name, labels=record.labels, preprocess=record.preprocess, temperature=record.temperature,
            fallback_threshold=record.fallback_threshold, fallback_rule=record.fallback_rule,
            backbone=record.backbone, num_classes=record.num_classes, source_run=str(run_dir.resolve()),
            source_checkpoint=record.best_checkpoint, artifacts=[],
            tool_versions=_tool_versions(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            metrics=metrics, notes=[f"export seconds per format: {timings}"],
        )
        for a in artifacts:
            manifest.set_artifact(a)
        manifest.validate()
        manifest.to_json(stage / "manifest.json")
        if ctx.failures and not allow_drop:
            raise ExportError("verification failed: " + "; ".join(ctx.failures) + " (use --allow-drop to keep them)")
        _swap_in(stage, out)
        return manifest
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
