"""``fieldid export``: run directory -> verified bundle of phone artifacts + ``manifest.json``.

Each format is one exporter function registered in ``EXPORTERS``. An exporter writes its
files into a staging folder and returns :class:`Artifact` records; verification against the
PyTorch model on the held-out split is part of every export. The staging folder replaces the
old bundle only when everything succeeded, so a failed export never destroys a good one.

Formats with a runtime on this machine also register a loader in ``RUNTIMES`` (used by the
verification here and by ``fieldid bench``) and a label reader in ``LABEL_READERS``, which
reads the class labels back out of the written file so their order can be checked.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.metadata
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from fieldid.training.data import load_split
from fieldid.training.images import ImageError, load_rgb
from fieldid.training.records import RecordError, RunRecord, load_record
from fieldid.training.train import load_run_model

from .formats import FORMAT_NAMES
from .examples import add_examples
from .manifest import Artifact, Manifest, file_sha256
from .phone import preprocess

__all__ = [
    "ExportError",
    "ExportContext",
    "EXPORTERS",
    "RUNTIMES",
    "LABEL_READERS",
    "ALL_FORMATS",
    "register_exporter",
    "register_runtime",
    "register_label_reader",
    "load_runtime",
    "run_batched",
    "export_run",
    "verify_logits",
    "verify_artifact",
    "check_labels",
    "fidelity",
    "RecipeSearch",
    "load_arrays",
    "converting",
    "input_spec",
    "make_artifact",
    "file_sha256",
    "quiet_third_party",
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
    # Images int8 recipes are *chosen* on (agreement with fp32 needs no labels): the val split
    # when the held-out split is test, else unused training images; topped up with calibration
    # images when there are few. Never the held-out split, so its verification stays unbiased.
    selection: np.ndarray = field(default_factory=lambda: np.zeros((0, 3, 1, 1), np.float32))
    selection_source: str = ""
    # fp32 PyTorch unknown_score on ``heldout`` (None: the run has no detector); see export/unknown.py.
    reference_unknown: np.ndarray | None = None
    unknown_probe: dict[str, np.ndarray] = field(default_factory=dict)  # generated probes, cached

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


Exporter = Callable[[ExportContext], list[Artifact]]
Runner = Callable[[np.ndarray], np.ndarray]
Loader = Callable[[Path, int], Runner]
LabelReader = Callable[[Path], list[str]]
EXPORTERS: dict[str, Exporter] = {}
RUNTIMES: dict[str, Loader] = {}  # artifact format -> loader(path, threads) -> runner(x) -> logits
LABEL_READERS: dict[str, LabelReader] = {}  # artifact format -> labels stored inside the file


def register_exporter(name: str) -> Callable[[Exporter], Exporter]:
    """Register ``fn(ctx) -> [Artifact, ...]`` as the exporter for the ``--formats`` name ``name``."""
    def deco(fn: Exporter) -> Exporter:
        EXPORTERS[name] = fn
        return fn
    return deco


def register_runtime(format: str) -> Callable[[Loader], Loader]:
    """Register ``loader(path, threads) -> runner`` for artifacts of ``format`` (0 threads = all)."""
    def deco(fn: Loader) -> Loader:
        RUNTIMES[format] = fn
        return fn
    return deco


def register_label_reader(format: str) -> Callable[[LabelReader], LabelReader]:
    """Register ``reader(path) -> labels`` that reads the class labels out of a ``format`` file."""
    def deco(fn: LabelReader) -> LabelReader:
        LABEL_READERS[format] = fn
        return fn
    return deco


def load_runtime(path: str | Path, format: str, *, threads: int = 0) -> Runner:
    """Load an artifact with its runtime on this machine.

    Args:
        path: the artifact file (or folder).
        format: its manifest format (``onnx``, ``executorch``, ``torchscript``, ...).
        threads: intra-op threads; 0 = the runtime's default (all cores).

    Returns:
        ``runner(x: float32 (N, 3, H, W)) -> logits (N, C)``.

    Example:
        >>> run = load_runtime("runs/salmon/export/model.onnx", "onnx", threads=1)  # doctest: +SKIP
        >>> run(x).shape
        (8, 2)
    """
    if format not in RUNTIMES:
        have = ", ".join(sorted(RUNTIMES)) or "none"
        raise ExportError(f"no runtime for {format} artifacts on this machine (have: {have})")
    return RUNTIMES[format](Path(path), threads)


def run_batched(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray, batch: int) -> np.ndarray:
    """``fn`` over ``x`` in chunks of at most ``batch`` (runtimes have a maximum batch size)."""
    return np.concatenate([np.asarray(fn(np.ascontiguousarray(x[i:i + batch])), dtype=np.float32)
                           for i in range(0, len(x), batch)])


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


def fidelity(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How faithfully ``logits`` (e.g. int8) follow ``ref`` (fp32) on the same images.

    Returns:
        ``selection_agreement`` (top-1) and ``relative_logit_error`` (mean |diff| divided by
        the mean per-image standard deviation of ``ref``, so it is comparable across models).
    """
    logits = np.asarray(logits, np.float32)
    ref = np.asarray(ref, np.float32)
    spread = float(ref.std(axis=1).mean()) or 1.0
    return {"selection_agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "relative_logit_error": float(np.abs(logits - ref).mean() / spread)}


class RecipeSearch:
    """Keeps the most faithful int8 candidate: highest top-1 agreement, then lowest relative error.

    Top-1 agreement alone is too coarse on a few hundred images (two recipes can both reach
    100% there and still differ on the test split), so ties go to :func:`fidelity`'s error.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tried: list[dict[str, Any]] = []
        self._best: tuple[tuple[float, float], Any, Any] | None = None

    def add(self, recipe: Any, logits: np.ndarray, ref: np.ndarray, started: float, result: Any) -> float:
        """Score one candidate (``recipe.describe()``); ``result`` is kept if it is the best. Returns its agreement."""
        fid = fidelity(logits, ref)
        self.tried.append({"recipe": recipe.describe(), **fid, "seconds": round(time.time() - started, 1)})
        log.info("%s candidate %-62s selection agreement %.4f, relative logit error %.4f", self.name,
                 recipe.describe(), fid["selection_agreement"], fid["relative_logit_error"])
        score = (fid["selection_agreement"], -fid["relative_logit_error"])
        if self._best is None or score > self._best[0]:
            self._best = (score, recipe, result)
        return fid["selection_agreement"]

    @property
    def best(self) -> tuple[Any, Any]:
        """``(recipe, result)`` of the best candidate so far."""
        if self._best is None:
            raise ExportError(f"{self.name}: no quantization candidate was tried")
        return self._best[1], self._best[2]

    @property
    def best_agreement(self) -> float:
        return self._best[0][0] if self._best else 0.0

    def manifest_record(self, ctx: "ExportContext", recipe: Any, target: float) -> dict[str, Any]:
        """The ``quantization`` entry of the manifest for the chosen recipe."""
        from dataclasses import asdict

        return {**asdict(recipe), "method": recipe.describe(), "calibration_images": int(len(ctx.calibration)),
                "calibration_source": "training split, eval preprocessing", "selection_source": ctx.selection_source,
                "selection_images": int(len(ctx.selection)), "selection_target_agreement": target,
                "candidates_tried": self.tried}


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
    with converting(format, doing=f"loading {file} with {_runtime_name(format)}"):
        runner = load_runtime(ctx.stage / file, format)
    load_s = time.perf_counter() - t0
    with converting(format, doing=f"running {file} with {_runtime_name(format)}"):
        logits = runner(ctx.heldout)
    ver = verify_logits(ctx, logits, precision=precision, name=file)
    ver["runtime"] = _runtime_name(format)
    ver["reloaded_from_file"] = True
    ver["load_seconds"] = round(load_s, 3)
    if check_label_order:
        ver["labels"] = check_labels(ctx, file, format)
    if ctx.reference_unknown is not None:
        from .unknown import verify_unknown

        ver["unknown_score"] = verify_unknown(ctx, file, format, precision)
    return ver


def _runtime_name(format: str) -> str:
    return {"onnx": "onnxruntime (CPUExecutionProvider)", "executorch": "executorch.runtime (XNNPACK)",
            "torchscript": "torch.jit.load", "torchscript_lite": "torch.jit.mobile lite interpreter",
            "pytorch": "torch eager"}.get(format, format)


# --------------------------------------------------------------------------- conversion errors
_OP_PATTERNS = (
    re.compile(r"convert function for op '([\w.:]+)'"),  # coremltools
    re.compile(r"OpOverload\(op='([\w.]+)', overload='(?:\w+)'\)"),  # torch.onnx dispatch
    re.compile(r"Unsupported FX nodes: \{'call_function': \['([\w.:]+)'"),  # torch.onnx dynamo
    re.compile(r"\b(aten[.:]{1,2}\w+(?:\.\w+)?)"),  # torch.export / executorch / onnx
    re.compile(r"[Oo]perator ['\"]?([\w.:]+)['\"]? (?:is )?not (?:supported|implemented)"),
)


def unsupported_op(exc: BaseException) -> str | None:
    """The operator named in a converter's error message, if it names one."""
    text = f"{exc}"
    for pat in _OP_PATTERNS:
        m = pat.search(text)
        if m:
            return m.group(1)
    return None


@contextlib.contextmanager
def converting(fmt: str, *, doing: str | None = None) -> Iterator[None]:
    """Turn a converter's or runtime's exception into one clear :class:`ExportError` that names the op.

    Only wrap the third-party call (conversion, quantization, loading or running a written
    file): a bug in our own code should stay a traceback. A missing package (``ImportError``)
    passes through, so :func:`export_run` can say which install is missing.

    Args:
        fmt: the format (or ``"<format> int8"``) being produced.
        doing: what is being done when it is not the conversion itself, e.g.
            ``"loading model.pte with executorch.runtime (XNNPACK)"``.

    Example:
        >>> with converting("onnx"):  # doctest: +SKIP
        ...     torch.onnx.export(model, args, "model.onnx")
    """
    try:
        yield
    except (ExportError, ImportError):
        raise
    except Exception as e:  # noqa: BLE001 - converters raise anything from RuntimeError to AssertionError
        op = unsupported_op(e)
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        what = f"op {op} is not supported" if op else f"{type(e).__name__}: {first[:300]}"
        if doing:
            raise ExportError(f"{fmt}: {doing} failed: {what}") from e
        raise ExportError(f"{fmt}: this model cannot be expressed in {fmt}: {what}") from e


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Hide converters' progress bars and prints (stdout/stderr) unless debug logging is on.

    Errors still surface: exceptions propagate and are reported by the caller.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        yield


# --------------------------------------------------------------------------- data for verification
_MIN_SELECTION = 100  # images to choose int8 recipes on


def load_arrays(paths: list[Path], spec: Any) -> tuple[np.ndarray, list[int]]:
    """Image files -> ``(N, 3, H, W)`` float32 through the *phone* preprocessing, skipping unreadable ones.

    Returns:
        The array and the indices of ``paths`` that were kept.
    """
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


def _load_model(run_dir: Path, record: RunRecord) -> nn.Module:
    """The run's fp32 model; a corrupt ``model.pth`` or one that does not fit the backbone is bad input."""
    weights = run_dir / record.weights
    try:
        return load_run_model(run_dir, record)
    except ValueError:  # our own errors (unknown backbone, ...) already read as one clear line
        raise
    except Exception as e:  # noqa: BLE001 - torch.load raises RuntimeError/UnpicklingError/EOFError on bad files
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        if lines and lines[0].startswith("Error(s) in loading state_dict"):
            detail = lines[1] if len(lines) > 1 else lines[0]
            raise ExportError(f"{weights}: does not fit backbone {record.backbone} with {record.num_classes} "
                              f"classes: {detail[:200]}") from None
        first = lines[0] if lines else type(e).__name__
        raise ExportError(f"{weights}: cannot be loaded (corrupt or truncated?): {type(e).__name__}: "
                          f"{first[:200]}") from None


def _context(run_dir: Path, record: RunRecord, stage: Path, *, calibration_size: int, allow_drop: bool) -> ExportContext:
    split_path = run_dir / record.split
    if not split_path.is_file():
        raise ExportError(f"{run_dir}: {record.split} missing; cannot verify without the held-out split")
    split = load_split(split_path)
    which = "test" if split.files.get("test") else "val"
    spec = record.preprocess_spec
    heldout, kept = load_arrays(split.paths(which), spec)
    if len(heldout) == 0:
        raise ExportError(f"{run_dir}: no readable held-out images under {split.root} to verify against")
    targets = np.asarray(split.targets(which), dtype=np.int64)[kept]
    train_paths = split.paths("train")
    rng = np.random.default_rng(0)
    order = rng.permutation(len(train_paths))
    pick = sorted(order[:calibration_size])
    calib, _ = load_arrays([train_paths[i] for i in pick], spec)
    if len(calib) == 0:
        raise ExportError(f"{run_dir}: no readable training images under {split.root} to calibrate int8 with")
    if which == "test" and split.paths("val"):
        sel_paths, sel_source = split.paths("val")[:calibration_size], "val split"
    else:
        rest = sorted(order[calibration_size:2 * calibration_size]) or pick
        sel_paths, sel_source = [train_paths[i] for i in rest], "training images not used for calibration"
    selection, _ = load_arrays(sel_paths, spec)
    if len(selection) < _MIN_SELECTION and len(calib):
        # Too few to tell recipes apart (one image = several points of agreement): top up with
        # calibration images. Every recipe calibrates on them alike, so the comparison stays fair.
        extra = calib[: _MIN_SELECTION - len(selection)]
        selection = np.concatenate([selection, extra]) if len(selection) else extra
        sel_source += f" + {len(extra)} calibration images"
    from fieldid.training.ood import scored_model

    # With a detector the model has two outputs, (logits, unknown_score), in every artifact.
    model = LogitsModel(scored_model(run_dir, record, _load_model(run_dir, record))).eval()
    with torch.no_grad():
        outs = [model(torch.from_numpy(heldout[i:i + 64])) for i in range(0, len(heldout), 64)]
    scored = isinstance(outs[0], tuple)
    ref = torch.cat([o[0] if scored else o for o in outs]).numpy()
    ref_unknown = torch.cat([o[1] for o in outs]).numpy() if scored else None
    log.info("held-out %s: %d images; calibration: %d training images; recipe selection: %d (%s)", which,
             len(heldout), len(calib), len(selection), sel_source)
    return ExportContext(run_dir=run_dir, record=record, model=model, stage=stage, heldout=heldout,
                         heldout_targets=targets, heldout_split=which, calibration=calib,
                         reference_logits=ref, allow_drop=allow_drop, selection=selection,
                         selection_source=sel_source, reference_unknown=ref_unknown)


# --------------------------------------------------------------------------- built-in exporters
def _load_pytorch(path: Path, threads: int, *, backbone: str, num_classes: int) -> Runner:
    from fieldid.training.models import create_model

    model = create_model(backbone, num_classes, pretrained=False)
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model.eval()
    if threads:
        torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return lambda x: run_batched(run, x, 64)


def load_pytorch(path: str | Path, threads: int = 0, *, backbone: str, num_classes: int) -> Runner:
    """Eager PyTorch on the bundle's ``model.pth`` (the fp32 reference; needs the backbone name)."""
    return _load_pytorch(Path(path), threads, backbone=backbone, num_classes=num_classes)


@register_exporter("pytorch")
def export_pytorch(ctx: ExportContext) -> list[Artifact]:
    """The fp32 state dict that the TorchServe handler loads (``weights_only=True``)."""
    shutil.copyfile(ctx.run_dir / ctx.record.weights, ctx.stage / "model.pth")
    runner = load_pytorch(ctx.stage / "model.pth", backbone=ctx.record.backbone, num_classes=ctx.record.num_classes)
    ver = verify_logits(ctx, runner(ctx.heldout), precision="fp32", name="model.pth")
    ver.update(runtime=_runtime_name("pytorch"), reloaded_from_file=True,
               labels={"status": "not_in_file", "note": "a state dict carries no labels; use the manifest's"})
    return [make_artifact(ctx, "model.pth", "pytorch", "fp32", method="state dict of the best checkpoint",
                          input=input_spec(ctx), verification=ver)]


def _tool_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for dist in ("fieldid", "torch", "torchvision", "timm", "onnx", "onnxscript", "onnxruntime", "executorch",
                 "torchao", "coremltools", "numpy", "pillow"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


ALL_FORMATS = FORMAT_NAMES


def _swap_in(stage: Path, out: Path) -> None:
    """Replace ``out`` with the finished ``stage`` folder; the old bundle survives any failure.

    Raises:
        ExportError: the new bundle could not be moved into place (the old one is put back).
    """
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    try:
        os.replace(stage, out)
    except OSError as e:
        if old is not None:
            os.replace(old, out)  # put the previous bundle back where it was
        raise ExportError(f"{out}: could not move the new bundle into place ({e.strerror or e}); "
                          f"the previous bundle is unchanged") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>staging|old)-(?P<pid>\d+)(?:-.*)?")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _clean_leftovers(out: Path) -> None:
    """Remove ``.NAME.staging-PID-*`` / ``.NAME.old-PID`` folders left by exports that died (killed, power cut).

    An ``old`` folder whose bundle is missing means the process died between moving the old
    bundle aside and moving the new one in: the old bundle is put back instead of deleted.
    Folders of a process that is still running (a concurrent export) are left alone.
    """
    if not out.parent.is_dir():
        return
    for p in sorted(out.parent.iterdir()):
        m = _LEFTOVER.fullmatch(p.name)
        if not m or m["name"] != out.name or not p.is_dir() or _pid_alive(int(m["pid"])):
            continue
        if m["kind"] == "old" and not out.exists():
            log.warning("restoring the bundle %s left aside by a dead export (pid %s)", out, m["pid"])
            os.replace(p, out)
        else:
            log.info("removing %s, left by a dead export (pid %s)", p, m["pid"])
            shutil.rmtree(p, ignore_errors=True)


def parse_formats(formats: list[str] | str | None) -> list[str]:
    """Validate ``--formats`` (list or comma-separated); ``pytorch`` is always included first.

    Raises:
        ExportError: an unknown name, listing the valid ones.
    """
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    wanted = list(dict.fromkeys(["pytorch"] + [f.strip().lower() for f in (formats or ALL_FORMATS)]))
    unknown = [f for f in wanted if f not in ALL_FORMATS]
    if unknown:
        raise ExportError(f"unknown format(s) {', '.join(unknown)}; valid: {', '.join(ALL_FORMATS)}")
    return wanted


def _check_writable(out: Path) -> None:
    """Bad ``--out`` fails here, before anything is created (the parent is made only after validation)."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").is_file():
        # The finished bundle *replaces* the folder: never do that to a folder of someone's files.
        raise ExportError(f"{out}: exists, is not empty and is not a fieldid bundle; choose another --out")
    existing = out.parent.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the folder mkdir(parents=True) would create the rest in
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ExportError(f"{out}: output location is not writable")


def _make_stage(out: Path) -> Path:
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # The pid in the name lets a later export tell a dead process's leftovers from a running one's.
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"{out}: output location is not writable ({e.strerror or e})") from None
    os.chmod(stage, 0o755)  # mkdtemp's 0700 would hide the bundle from a server running as another user
    return stage


def _run_metrics(run_dir: Path, record: RunRecord) -> dict[str, Any]:
    path = run_dir / record.metrics
    if not path.is_file():
        return {}
    try:
        m = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return {k: m.get(k) for k in ("split", "accuracy", "macro_f1", "num_images")}


def _add_unknown(manifest: Manifest, artifacts: list[Artifact], run_dir: Path, record: RunRecord) -> None:
    """Manifest ``unknown`` + ``model_version``; ``unknown_output`` on every artifact whose score was verified."""
    from fieldid.training.ood import model_version

    from .unknown import UNKNOWN_OUTPUT, manifest_unknown

    manifest.unknown = manifest_unknown(record)
    manifest.model_version = record.model_version or model_version(run_dir, record)
    for a in artifacts:
        if "unknown_score" in a.verification or (manifest.unknown and a.format == "coreml"):
            a.unknown_output = UNKNOWN_OUTPUT


def export_run(run_dir: str | Path, *, formats: list[str] | str | None = None, out: str | Path | None = None,
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

    Raises:
        ExportError: bad run, unknown format, unwritable output, a model a format cannot
            express, or (without ``allow_drop``) an artifact that missed its bar. The
            previous bundle is untouched in every case.

    Example:
        >>> m = export_run("runs/salmon", formats=["onnx"])  # doctest: +SKIP
        >>> [a["file"] for a in m.artifacts]
        ['model.pth', 'model.onnx', 'model.int8.onnx']
    """
    from . import _import_exporters

    _import_exporters()
    run_dir = Path(run_dir)
    wanted = parse_formats(formats)
    if calibration_size < 1:
        raise ExportError(f"calibration size must be >= 1 (got {calibration_size})")
    try:
        record = load_record(run_dir)
    except RecordError as e:
        raise ExportError(str(e)) from None
    out = Path(out) if out else run_dir / "export"
    _check_writable(out)
    _clean_leftovers(out)
    t_start = time.time()
    # Everything that can reject the run (held-out split, images, weights) runs before the
    # output's parent folder or the staging folder is created.
    ctx = _context(run_dir, record, Path(), calibration_size=calibration_size, allow_drop=allow_drop)
    stage = ctx.stage = _make_stage(out)
    try:
        artifacts: list[Artifact] = []
        timings = {}
        for fmt in wanted:
            t0 = time.time()
            log.info("exporting %s ...", fmt)
            try:
                artifacts += EXPORTERS[fmt](ctx)
            except ImportError as e:  # an optional dependency of this format is not installed
                missing = e.name or str(e)
                raise ExportError(f"format {fmt} needs {missing}, which is not installed: "
                                  f"pip install 'fieldid[export]'") from None
            timings[fmt] = round(time.time() - t0, 1)
        manifest = Manifest(
            name=record.name, labels=record.labels, preprocess=record.preprocess, temperature=record.temperature,
            fallback_threshold=record.fallback_threshold, fallback_rule=record.fallback_rule,
            backbone=record.backbone, num_classes=record.num_classes, source_run=str(run_dir.resolve()),
            source_checkpoint=record.best_checkpoint, artifacts=[],
            tool_versions=_tool_versions(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            metrics=_run_metrics(run_dir, record),
            notes=[f"export seconds per format: {timings} (total {time.time() - t_start:.0f} s)",
                   f"verification: every artifact with a runtime here was reloaded from its file and run on the "
                   f"{ctx.heldout_split} split ({len(ctx.heldout)} images, phone preprocessing) against the PyTorch "
                   f"fp32 model; int8 recipes were chosen on {len(ctx.selection)} images from the "
                   f"{ctx.selection_source}, never on the held-out split"],
            verification_summary={"status": "failed" if ctx.failures else "passed", "failures": list(ctx.failures),
                                  "allow_drop": allow_drop},
        )
        _add_unknown(manifest, artifacts, run_dir, record)
        for a in artifacts:
            manifest.set_artifact(a)
        add_examples(manifest, run_dir, stage, split_file=record.split)  # the demo's photos, inside the bundle
        if any(a.verification.get("status") == "structure_only" for a in artifacts):
            manifest.notes.append("Core ML cannot run on Linux: its artifacts are verified for structure only "
                                  "(spec type, input, labels and order, outputs, op set); see each verification")
        manifest.validate()
        manifest.to_json(stage / "manifest.json")
        if ctx.failures and not allow_drop:
            raise ExportError("verification failed: " + "; ".join(ctx.failures)
                              + " (use --allow-drop to keep them anyway)")
        _swap_in(stage, out)
        log.info("bundle %s: %d artifacts in %.0f s", out, len(artifacts), time.time() - t_start)
        return manifest
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)

