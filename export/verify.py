"""Verification of written artifacts against the PyTorch model, and the context every exporter gets.

Bars (issue: fp32 <= 1e-3 max |logit diff| and 100% top-1; int8 >= 99% agreement and <= 1 point
accuracy drop) are applied on the held-out split by :func:`verify_logits`; :func:`verify_artifact`
reloads a file with its runtime first; :func:`check_labels` reads the label order back out of it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fieldid.training.records import RunRecord

from .inputs import PhoneImages
from .manifest import Artifact, file_sha256
from .registry import LABEL_READERS, converting, load_runtime, runtime_name

__all__ = ["ExportContext", "LogitsModel", "verify_logits", "verify_artifact", "check_labels", "input_spec",
           "make_artifact", "EVAL_BATCH", "FP32_MAX_ABS_DIFF", "INT8_MIN_AGREEMENT", "INT8_MAX_ACCURACY_DROP"]

log = logging.getLogger("fieldid.export")

# Images per eager / TorchScript forward pass when verifying: a 224-px MobileNetV2 batch holds about
# 25 MB of layer outputs per image, so 64 at once alone took ~1.6 GB; 32 keeps bench's batch-32
# throughput a single call.
EVAL_BATCH = 32

# Verification bars (issue: fp32 <= 1e-3 max |logit diff| and 100% top-1; int8 >= 99% / <= 1 pt).
FP32_MAX_ABS_DIFF = 1e-3
INT8_MIN_AGREEMENT = 0.99
INT8_MAX_ACCURACY_DROP = 0.01


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
    calibration: PhoneImages  # (M, 3, H, W) training images, phone preprocessing, read lazily
    reference_logits: np.ndarray  # fp32 PyTorch logits on ``heldout``
    allow_drop: bool = False
    # False: fp32 (fp16 for Core ML) artifacts only -- a server model runs fp32, and the int8
    # recipe search is most of an ONNX export's time.
    int8: bool = True
    failures: list[str] = field(default_factory=list)
    # Images int8 recipes are *chosen* on (agreement with fp32 needs no labels): the val split
    # when the held-out split is test, else unused training images; topped up with calibration
    # images when there are few. Never the held-out split, so its verification stays unbiased.
    selection: PhoneImages | None = None  # lazy, like ``calibration``
    selection_source: str = ""
    # fp32 PyTorch unknown_score on ``heldout`` (None: the run has no detector); see export/unknown.py.
    reference_unknown: np.ndarray | None = None
    unknown_probe: dict[str, np.ndarray] = field(default_factory=dict)  # generated probes, cached
    activation_mb: float = 0.0  # MB of all layer outputs for one image (memory estimates)
    images_source: str = ""  # "run samples (...)" or the dataset folder the images were read from

    @property
    def example(self) -> torch.Tensor:
        return torch.from_numpy(self.heldout[:1].copy())

    def example_batch(self, n: int = 2) -> torch.Tensor:
        """``n`` real inputs; ``torch.export`` needs batch > 1 to keep the batch dimension dynamic."""
        idx = np.arange(n) % len(self.heldout)
        return torch.from_numpy(self.heldout[idx].copy())

    @property
    def labels(self) -> list[str]:
        return list(self.record.labels)

    @property
    def reference_accuracy(self) -> float:
        return float((self.reference_logits.argmax(1) == self.heldout_targets).mean())


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def input_spec(ctx: ExportContext, *, batch: int | None = None, normalization: str = "caller",
               name: str = "input") -> dict[str, Any]:
    """The artifact's input, spelled out for an app developer.

    Args:
        ctx: export context (preprocessing comes from the run).
        batch: fixed batch size, or ``None`` for a dynamic batch dimension (-1).
        normalization: ``"caller"`` (float tensor, the app applies mean/std) or ``"in_model"``
            (RGB image with 0-255 pixels; the exact mean/std is inside the model).
        name: input name in the file.
    """
    spec = ctx.record.preprocess_spec
    size = spec.crop_size
    d: dict[str, Any] = {
        "name": name, "shape": [batch if batch else -1, 3, size, size], "layout": spec.layout, "color": spec.color,
        "resize_size": spec.resize_size, "crop_size": size, "resize": "shorter side", "crop": "center",
        "interpolation": spec.interpolation, "mean": list(spec.mean), "std": list(spec.std),
    }
    if normalization == "caller":
        d.update(dtype="float32", value="(pixel / 255 - mean) / std, computed by the app")
    else:
        d.update(dtype="image", value="RGB pixels 0-255; (pixel / 255 - mean) / std is inside the model")
    return d


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
    drop = ctx.reference_accuracy - acc
    if precision == "fp32":
        passed = diff <= FP32_MAX_ABS_DIFF and agree == 1.0
        bar = f"max|diff| <= {FP32_MAX_ABS_DIFF:g} and 100% top-1 agreement"
        miss = f"max|diff| {diff:.2e} (bar {FP32_MAX_ABS_DIFF:g}), agreement {agree:.2%} (bar 100%)"
    else:
        passed = agree >= INT8_MIN_AGREEMENT and drop <= INT8_MAX_ACCURACY_DROP + 1e-9
        bar = f"top-1 agreement >= {INT8_MIN_AGREEMENT:.0%} and accuracy drop <= {INT8_MAX_ACCURACY_DROP * 100:.0f} pt"
        miss = (f"agreement {agree:.2%} (bar {INT8_MIN_AGREEMENT:.0%}), accuracy drop {drop * 100:.2f} pt "
                f"(bar {INT8_MAX_ACCURACY_DROP * 100:.0f} pt)")
    result = {
        "status": "passed" if passed else "failed", "bar": bar, "split": ctx.heldout_split,
        "num_images": int(len(y)), "max_abs_logit_diff": diff, "top1_agreement": agree,
        "accuracy": acc, "reference_accuracy": ctx.reference_accuracy, "accuracy_drop": drop,
    }
    if not passed:
        ctx.failures.append(f"{name} missed its bar: {miss}")
    log.info("verified %-22s agreement %.4f  acc %.4f (ref %.4f)  max|diff| %.2e  %s", name, agree, acc,
             ctx.reference_accuracy, diff, result["status"])
    return result


def check_labels(ctx: ExportContext, file: str, format: str, labels: list[str] | None = None) -> dict[str, Any]:
    """Read the labels back out of the written file and compare them (and their order) with the run's.

    Args:
        ctx: export context.
        file: artifact file name inside the staging folder.
        format: manifest format; its ``LABEL_READERS`` entry reads the file.
        labels: labels already read by the caller (skips the reader).

    Returns:
        ``{"status": "passed"|"failed", "labels": [...], ...}``; a mismatch is an export failure.
    """
    if labels is None:
        with converting(format, doing=f"reading the labels back out of {file}"):
            labels = LABEL_READERS[format](ctx.stage / file)
    ok = list(labels) == ctx.labels
    res: dict[str, Any] = {"status": "passed" if ok else "failed", "read_from_file": True}
    if not ok:
        res["found"] = list(labels)
        ctx.failures.append(f"{file}: label order {labels} differs from the run's {ctx.labels}")
    return res


def verify_artifact(ctx: ExportContext, file: str, format: str, precision: str, *,
                    check_label_order: bool = True) -> dict[str, Any]:
    """Reload a written artifact with its runtime, run the held-out split, apply the bars.

    Returns:
        The verification dict for the manifest (``verify_logits`` + ``labels`` + timings).
    """
    t0 = time.perf_counter()
    with converting(format, doing=f"loading {file} with {runtime_name(format)}"):
        runner = load_runtime(ctx.stage / file, format)
    load_s = time.perf_counter() - t0
    with converting(format, doing=f"running {file} with {runtime_name(format)}"):
        logits = runner(ctx.heldout)
    ver = verify_logits(ctx, logits, precision=precision, name=file)
    ver["runtime"] = runtime_name(format)
    ver["reloaded_from_file"] = True
    ver["load_seconds"] = round(load_s, 3)
    if check_label_order:
        ver["labels"] = check_labels(ctx, file, format)
    if ctx.reference_unknown is not None:
        from .unknown import verify_unknown

        ver["unknown_score"] = verify_unknown(ctx, file, format, precision)
        if ver["unknown_score"]["status"] == "failed":
            # The unknown answer is part of what the phone ships: a file whose score misses its bar
            # is a failed artifact (the demo and the app then pick another), not a passed one.
            ver["status"] = "failed"
    return ver


