"""``fieldid export``: run directory -> verified bundle of phone artifacts + ``manifest.json``.

Each format is one exporter function registered in ``EXPORTERS`` (:mod:`.registry`). An exporter
writes its files into a staging folder and returns :class:`Artifact` records; verification
against the PyTorch model on the bar images (the held-out split, topped up to at least
``MIN_BAR_IMAGES``) is part of every export (:mod:`.verify`), int8 recipes are chosen by
:mod:`.recipes`, and the staging folder replaces the old bundle only when the export writes one
(:mod:`.writer`): an artifact that misses its bar is kept marked failed beside those that passed
(``--strict``: any miss writes nothing), an error or a bundle where nothing passed never
destroys a good one.

The images come from the run's stored samples (:mod:`.inputs`), or from ``--data DIR``. Each
format's wall time and peak resident memory are measured (:mod:`.resources`) and written into
the manifest's ``export_stats``; a format whose estimated memory exceeds what is free is refused
in one line before it starts.

This module keeps every public name of the package's export API importable from one place.
"""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import logging
import os
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fieldid.cli_common import not_a_folder
from fieldid.training.data import load_split, make_split
from fieldid.training.images import DataError
from fieldid.training.records import RecordError, RunRecord, load_record
from fieldid.training.models import load_run_model

from .formats import FORMAT_NAMES
from .inputs import ExportInputs, PhoneImages, folder_inputs, load_arrays, run_inputs, samples_index
from .examples import add_examples, add_unknown_examples
from .manifest import Artifact, Manifest, file_sha256
from .recipes import RecipeSearch, fidelity
from .registry import (EXPORTERS, LABEL_READERS, RUNTIMES, ExportError, Runner, converting, load_runtime,
                       quiet_third_party, register_exporter, register_label_reader, register_runtime, run_batched,
                       runtime_name, unsupported_op)
from .resources import MemoryRefusal, check_memory, measure
from .verify import (EVAL_BATCH, FP32_MAX_ABS_DIFF, INT8_MAX_ACCURACY_DROP, INT8_MIN_AGREEMENT, MIN_BAR_IMAGES,
                     ExportContext, LogitsModel, bar_images, check_labels, input_spec, make_artifact, run_metrics,
                     verify_artifact, verify_logits)
from .writer import check_writable, clean_leftovers, make_stage, swap_in

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
    "unsupported_op",
    "PhoneImages",
    "MemoryRefusal",
    "FP32_MAX_ABS_DIFF",
    "INT8_MIN_AGREEMENT",
    "INT8_MAX_ACCURACY_DROP",
    "MIN_BAR_IMAGES",
    "missed_artifacts",
]

log = logging.getLogger("fieldid.export")

_MIN_SELECTION = 100  # images to choose int8 recipes on

def _load_model(run_dir: Path, record: RunRecord) -> nn.Module:
    """The run's fp32 model; a corrupt ``model.pth`` or one that does not fit the backbone is bad input
    (:func:`~fieldid.training.models.load_run_model` says which in one line)."""
    try:
        return load_run_model(run_dir, record)
    except ValueError as e:  # RunError and the registry's errors: one clear line, as an export error
        raise ExportError(str(e)) from None


def _activation_mb(model: nn.Module, example: torch.Tensor) -> float:
    """MB of all layer outputs for one image: what a histogram calibration window holds per image."""
    total = 0
    hooks = []

    def add(_m: nn.Module, _i: Any, out: Any) -> None:
        nonlocal total
        if isinstance(out, torch.Tensor):
            total += out.numel() * 4

    for m in model.modules():
        if not list(m.children()):
            hooks.append(m.register_forward_hook(add))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return total / 1e6


def _rebased_split(data: Path, record: RunRecord, run_split: Any | None) -> Any:
    """The split to read from ``--data``: the run's own split rebased onto ``data`` when its files are there
    (the dataset moved), else a fresh seeded split of ``data`` mapped onto the run's labels."""
    if run_split is not None:
        files = [p for part in run_split.files.values() for p, _ in part]
        if files and all((data / p).is_file() for p in files):
            run_split.root = str(data.resolve())
            return run_split
    try:
        split = make_split(data, seed=0)
    except (DataError, OSError) as e:
        raise ExportError(f"--data {data}: {e}") from None
    unknown = sorted(set(split.labels) - set(record.labels))
    if unknown:
        raise ExportError(f"--data {data}: class folder(s) {', '.join(unknown)} not among the run's labels "
                          f"({', '.join(record.labels)})")
    index = {name: i for i, name in enumerate(record.labels)}
    split.files = {k: [(p, index[split.labels[y]]) for p, y in v] for k, v in split.files.items()}
    split.labels = list(record.labels)
    return split


def _inputs(run_dir: Path, record: RunRecord, *, calibration_size: int,
            data: Path | None) -> tuple[ExportInputs, np.ndarray | None]:
    """Held-out, calibration and selection images: the run's stored samples unless ``data`` is given.

    Returns:
        The inputs, and the classes of the selection images when they are val photos (``None``
        otherwise): :func:`bar_images` may add them to the bar images.
    """
    spec = record.preprocess_spec
    index = samples_index(run_dir, record) if data is None else None
    if index is not None:
        inp = run_inputs(index, spec, calibration_size)
        files = index["groups"]["selection"]["files"]
        if inp.selection_source != "val split" or len(files) < len(inp.selection):
            return inp, None
        try:
            return inp, np.asarray([f["target"] for f in files[:len(inp.selection)]], np.int64)
        except (KeyError, TypeError, ValueError):
            return inp, None  # samples without classes: the bars top up with views instead
    split_path = run_dir / record.split
    run_split = None
    if split_path.is_file():
        try:
            run_split = load_split(split_path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExportError(f"{split_path}: malformed split file ({type(e).__name__}: {e})") from None
    if data is not None:
        if not Path(data).is_dir():
            raise ExportError(f"--data {data}: {not_a_folder(data)} "
                              "(give the dataset folder the run was trained on)")
        split = _rebased_split(Path(data), record, run_split)
    elif run_split is None:
        raise ExportError(f"{run_dir}: {record.split} missing and the run kept no samples; cannot verify without "
                          f"the held-out split (give --data DIR)")
    else:
        split = run_split
        if not Path(split.root).is_dir():
            raise ExportError(f"{run_dir}: its dataset {split.root} is gone and the run kept no samples "
                              f"(trained before fieldid stored them); give --data DIR")
    inp = folder_inputs(split, spec, calibration_size, root=split.root)
    if inp.selection_source != "val split":
        return inp, None
    val_targets = np.asarray(split.targets("val")[:calibration_size], np.int64)
    # An unreadable val photo was skipped: the classes no longer line up row for row, so none are used.
    return inp, (val_targets if len(val_targets) == len(inp.selection) else None)


def _context(run_dir: Path, record: RunRecord, stage: Path, *, calibration_size: int, strict: bool = False,
             data: Path | None = None, int8: bool = True, min_bar_images: int = MIN_BAR_IMAGES) -> ExportContext:
    inp, val_targets = _inputs(run_dir, record, calibration_size=calibration_size, data=data)
    selection, sel_source = inp.selection, inp.selection_source
    val = selection if val_targets is not None else None  # read lazily: only the top-up's rows
    if len(selection) < _MIN_SELECTION and len(inp.calibration):
        # Too few to tell recipes apart (one image = several points of agreement): top up with
        # calibration images. Every recipe calibrates on them alike, so the comparison stays fair.
        extra = inp.calibration.pixels(0, _MIN_SELECTION - len(selection))
        selection = PhoneImages.from_array(np.concatenate([selection.pixels(0, len(selection)), extra]),
                                           record.preprocess_spec)
        sel_source += f" + {len(extra)} calibration images"
    from fieldid.training.ood import scored_model

    # With a detector the model has two outputs, (logits, unknown_score), in every artifact.
    model = LogitsModel(scored_model(run_dir, record, _load_model(run_dir, record))).eval()
    heldout, targets, decided_on = bar_images(inp.heldout, inp.heldout_targets, record.preprocess_spec, val=val,
                                              val_targets=val_targets, min_images=min_bar_images)
    with torch.no_grad():
        outs = [model(torch.from_numpy(heldout[i:i + EVAL_BATCH])) for i in range(0, len(heldout), EVAL_BATCH)]
    scored = isinstance(outs[0], tuple)
    ref = torch.cat([o[0] if scored else o for o in outs]).numpy()
    ref_unknown = torch.cat([o[1] for o in outs]).numpy() if scored else None
    log.info("images from %s: held-out %s %d; bars decided on %d (%d held-out, %d val, %d augmented views); "
             "calibration: %d training images; recipe selection: %d (%s)", inp.source, inp.heldout_split,
             len(inp.heldout), decided_on["images"], decided_on["heldout"], decided_on["val"],
             decided_on["augmented_views"], len(inp.calibration), len(selection), sel_source)
    ctx = ExportContext(run_dir=run_dir, record=record, model=model, stage=stage, heldout=heldout,
                        heldout_targets=targets, heldout_split=inp.heldout_split,
                        calibration=inp.calibration, reference_logits=ref, strict=strict,
                        selection=selection, selection_source=sel_source, reference_unknown=ref_unknown,
                        int8=int8, decided_on=decided_on, min_bar_images=min_bar_images)
    ctx.activation_mb = _activation_mb(model, ctx.example)
    ctx.images_source = inp.source
    return ctx

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

    return lambda x: run_batched(run, x, EVAL_BATCH)


def load_pytorch(path: str | Path, threads: int = 0, *, backbone: str, num_classes: int) -> Runner:
    """Eager PyTorch on the bundle's ``model.pth`` (the fp32 reference; needs the backbone name)."""
    return _load_pytorch(Path(path), threads, backbone=backbone, num_classes=num_classes)


@register_exporter("pytorch")
def export_pytorch(ctx: ExportContext) -> list[Artifact]:
    """The fp32 state dict that the TorchServe handler loads (``weights_only=True``)."""
    shutil.copyfile(ctx.run_dir / ctx.record.weights, ctx.stage / "model.pth")
    runner = load_pytorch(ctx.stage / "model.pth", backbone=ctx.record.backbone, num_classes=ctx.record.num_classes)
    ver = verify_logits(ctx, runner(ctx.heldout), precision="fp32", name="model.pth")
    ver.update(runtime=runtime_name("pytorch"), reloaded_from_file=True,
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


def parse_formats(formats: list[str] | str | None) -> list[str]:
    """Validate ``--formats`` (list or comma-separated); ``pytorch`` is always included first.

    Raises:
        ExportError: an unknown name, listing the valid ones.
    """
    if isinstance(formats, str):
        formats = [f.strip() for f in formats.split(",") if f.strip()]
    if formats is not None and not formats:  # `--formats ""`: no formats named is not every format
        raise ExportError(f"--formats names no format; valid: {', '.join(ALL_FORMATS)} (leave it out for all)")
    wanted = list(dict.fromkeys(["pytorch"] + [f.strip().lower() for f in (formats or ALL_FORMATS)]))
    unknown = [f for f in wanted if f not in ALL_FORMATS]
    if unknown:
        raise ExportError(f"unknown format(s) {', '.join(unknown)}; valid: {', '.join(ALL_FORMATS)}")
    return wanted


def _warn_dropped_formats(out: Path, wanted: list[str]) -> None:
    """Say so before the work when the bundle at ``out`` holds formats this export will not write: the
    new bundle replaces it as a whole (`--formats onnx` over a full bundle leaves only ONNX files)."""
    try:
        old = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        formats = {a["format"] for a in old.get("artifacts", []) if isinstance(a, dict) and isinstance(a.get("format"), str)}
    except (OSError, ValueError, AttributeError, TypeError):
        return  # no bundle there (or not one we can read): nothing of it to lose
    # An artifact format belongs to the --formats name it starts with (torchscript_lite: torchscript).
    dropped = sorted(f for f in formats if not any(f == w or f.startswith(w + "_") for w in wanted))
    if dropped:
        log.warning("%s holds %s files this export does not write (--formats %s): the new bundle replaces it "
                    "without them; add them to --formats to keep them, or write to another --out", out,
                    ", ".join(dropped), ",".join(wanted))


def _run_metrics(run_dir: Path, record: RunRecord) -> dict[str, Any]:
    m = run_metrics(run_dir, record)  # None when missing or unreadable: the summary just lacks the scores
    return {k: m.get(k) for k in ("split", "accuracy", "macro_f1", "num_images")} if m is not None else {}


# Extra MB a format's export holds at its peak, above what the process held before it:
# ``base + per_weight_mb * fp32 weight MB + per_activation_mb * one image's layer outputs (MB)``.
# Fitted, with ~10% margin, to the per-step peaks measured on a 224-px MobileNetV2 run (9 MB of
# weights, 78 MB of layer outputs per image): pytorch ~500, onnx ~1000, executorch ~700,
# torchscript ~500, coreml ~530 MB above the RSS before the step (manifest ``export_stats``).
_FORMAT_MEMORY = {
    "pytorch": (100, 2, 6),
    "onnx": (300, 10, 8),
    "executorch": (300, 10, 5),
    "torchscript": (150, 4, 6),
    "coreml": (250, 10, 3),
}


def _format_need_mb(fmt: str, ctx: ExportContext) -> float:
    base, per_weight, per_act = _FORMAT_MEMORY.get(fmt, (300, 10, 8))  # a registered extra format: like onnx
    weights_mb = sum(p.numel() * 4 for p in ctx.model.parameters()) / 1e6
    return base + per_weight * weights_mb + per_act * ctx.activation_mb


def _detector_float_bytes(path: Path) -> int:
    """float32 bytes of an unknown detector's tensors (its ``unknown.pth``; scalars left out)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return 4 * sum(int(t.numel()) for t in sd.values() if isinstance(t, torch.Tensor) and t.numel() > 1)


def _add_unknown(manifest: Manifest, artifacts: list[Artifact], run_dir: Path, record: RunRecord) -> None:
    """Manifest ``unknown`` + ``model_version``; ``unknown_output`` on every artifact whose score was verified."""
    from fieldid.training.ood import model_version

    from .unknown import UNKNOWN_OUTPUT, manifest_unknown

    manifest.unknown = manifest_unknown(record)
    if manifest.unknown and (record.unknown or {}).get("file"):
        # The detector's constants stay float in the int8 ONNX and .pte files too; `fieldid bench`
        # compares int8 and fp32 sizes without these bytes, so a small network's int8 file is
        # judged on its network, not on a detector that is the same in both.
        manifest.unknown["detector_float_bytes"] = _detector_float_bytes(run_dir / record.unknown["file"])
    manifest.model_version = record.model_version or model_version(run_dir, record)
    for a in artifacts:
        if "unknown_score" in a.verification or (manifest.unknown and a.format == "coreml"):
            a.unknown_output = UNKNOWN_OUTPUT


def export_run(run_dir: str | Path, *, formats: list[str] | str | None = None, out: str | Path | None = None,
               strict: bool = False, allow_drop: bool = False, calibration_size: int = 200,
               data: str | Path | None = None, memory_limit_mb: float | None = None, int8: bool = True,
               min_bar_images: int = MIN_BAR_IMAGES) -> Manifest:
    """Export a finished run to every requested format, verify each, write ``manifest.json``.

    An artifact that misses its bar is kept in the bundle marked ``failed`` (the server, the demo,
    the app and ``predict`` then use a verified one), the others are kept as they passed, and
    ``verification_summary`` says ``partial`` and lists the ``missed`` ones with the reason: an int8
    file that does not hold never costs the user the fp32 files that do.

    Args:
        run_dir: a finished ``fieldid train`` run directory.
        formats: subset of ``ALL_FORMATS`` (default: all). ``pytorch`` is always included.
        out: bundle folder (default ``RUN/export``); replaced only when the export writes a bundle,
            and only if it is empty or a fieldid bundle.
        strict: any missed bar fails the whole export (no bundle written; the previous one stays).
        allow_drop: deprecated, the default behaviour now; accepted for one release.
        calibration_size: training images used to calibrate int8 quantization (streamed: memory
            does not grow with it).
        data: read the images from this dataset folder instead of the run's stored samples.
        memory_limit_mb: memory the export may use in all (default: ``FIELDID_MEMORY_LIMIT_MB``, else
            what the machine has free); a format estimated to need more is refused before it starts.
        int8: False writes only the fp32 artifacts (fp16 for Core ML): for a server model, which
            runs fp32; it skips the int8 recipe search and calibration.
        min_bar_images: the fewest images each statistical bar is decided on (see
            :data:`~fieldid.export.verify.MIN_BAR_IMAGES`; the held-out split is topped up to it).

    Returns:
        The written :class:`Manifest` (``export_stats`` holds seconds and peak RSS per format;
        ``verification_summary["missed"]`` the artifacts that missed a bar, see :func:`missed_artifacts`).

    Raises:
        ExportError: bad run, unknown format, unwritable output, a model a format cannot
            express, not enough memory, no artifact passing its bar, or (``strict``) any artifact
            that missed its bar. The previous bundle is untouched in every case.

    Example:
        >>> m = export_run("runs/salmon", formats=["onnx"])  # doctest: +SKIP
        >>> [a["file"] for a in m.artifacts]  # doctest: +SKIP
        ['model.pth', 'model.onnx', 'model.int8.onnx']
    """
    from . import _import_exporters

    _import_exporters()
    run_dir = Path(run_dir)
    wanted = parse_formats(formats)
    if allow_drop and strict:
        raise ExportError("--allow-drop and --strict contradict each other (--allow-drop is the default now)")
    if allow_drop:
        warnings.warn("export_run(allow_drop=True): keeping the artifacts that passed is the default now; "
                      "allow_drop will be removed in the next release", DeprecationWarning, stacklevel=2)
    if calibration_size < 1:
        raise ExportError(f"calibration size must be >= 1 (got {calibration_size})")
    if min_bar_images < 1:
        raise ExportError(f"min_bar_images must be >= 1 (got {min_bar_images})")
    try:
        record = load_record(run_dir)
    except RecordError as e:
        raise ExportError(str(e)) from None
    # Absolute once, for every step (`--out .` has no name; leftovers are found by the same path).
    out = Path(os.path.abspath(out if out else run_dir / "export"))
    check_writable(out)
    clean_leftovers(out)
    _warn_dropped_formats(out, wanted)
    t_start = time.time()
    stats: dict[str, Any] = {}
    # Everything that can reject the run (held-out split, images, weights) runs before the
    # output's parent folder or the staging folder is created.
    with measure("reading images and the model") as st:
        ctx = _context(run_dir, record, Path(), calibration_size=calibration_size, strict=strict,
                       data=Path(data) if data is not None else None, int8=int8, min_bar_images=min_bar_images)
    stats["inputs"] = st.to_dict()
    stage = ctx.stage = make_stage(out)
    try:
        artifacts: list[Artifact] = []
        for fmt in wanted:
            need = _format_need_mb(fmt, ctx)
            _refuse_if_short(f"exporting {fmt}", need, wanted, memory_limit_mb)
            log.info("exporting %s ...", fmt)
            with measure(f"export {fmt}") as st:
                st.estimate_mb = need
                try:
                    artifacts += EXPORTERS[fmt](ctx)
                except ImportError as e:  # an optional dependency of this format is not installed
                    missing = e.name or str(e)
                    raise ExportError(f"format {fmt} needs {missing}, which is not installed: "
                                      f"pip install 'fieldid[export]'") from None
            stats[fmt] = st.to_dict()
        total_s = time.time() - t_start
        stats["total"] = {"seconds": round(total_s, 1),
                          "peak_rss_mb": max(v["peak_rss_mb"] for v in stats.values() if isinstance(v, dict)),
                          "calibration_images": len(ctx.calibration), "images_source": ctx.images_source}
        manifest = Manifest(
            name=record.name, labels=record.labels, preprocess=record.preprocess, temperature=record.temperature,
            fallback_threshold=record.fallback_threshold, fallback_rule=record.fallback_rule,
            backbone=record.backbone, num_classes=record.num_classes, source_run=str(run_dir.resolve()),
            source_checkpoint=record.best_checkpoint, artifacts=[],
            tool_versions=_tool_versions(), created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            metrics=_run_metrics(run_dir, record),
            notes=[f"export seconds per format: { {k: v['seconds'] for k, v in stats.items()} } (total {total_s:.0f} s)",
                   f"verification: every artifact with a runtime here was reloaded from its file and run on "
                   f"{_decided_text(ctx.decided_on, ctx.heldout_split)} (phone preprocessing) against the PyTorch "
                   + (f"fp32 model; int8 recipes were chosen on {len(ctx.selection)} images from the "
                      f"{ctx.selection_source}, never on the held-out split" if ctx.int8
                      else "fp32 model; no int8 artifacts (exported with --no-int8)")],
            export_stats=stats,
        )
        _add_unknown(manifest, artifacts, run_dir, record)
        missed = _mark_missed(artifacts, ctx.failures)
        manifest.verification_summary = _summary(missed, ctx, strict=strict, min_bar_images=min_bar_images)
        for a in artifacts:
            manifest.set_artifact(a)
        add_examples(manifest, run_dir, stage, split_file=record.split)  # the demo's photos, inside the bundle
        # and its "not a fish" ones, when there is a detector: ones the fp32 model flags clear of int8's band
        from .unknown import INT8_THRESHOLD_BAND, image_scorer

        add_unknown_examples(manifest, stage, score=image_scorer(ctx), clear_factor=1 + INT8_THRESHOLD_BAND)
        if any(a.verification.get("status") == "structure_only" for a in artifacts):
            manifest.notes.append("Core ML cannot run on Linux: its artifacts are verified for structure only "
                                  "(spec type, input, labels and order, outputs, op set); see each verification")
        manifest.validate()
        manifest.to_json(stage / "manifest.json")
        if ctx.failures and strict:
            raise ExportError("verification failed: " + "; ".join(ctx.failures)
                              + " (without --strict the artifacts that passed are kept)")
        unplaced = [f for f in ctx.failures if not any(_names(f, a.file) for a in artifacts)]
        if unplaced:  # a failed check no artifact owns: nothing says which files to trust
            raise ExportError("verification failed: " + "; ".join(unplaced))
        if len(missed) == len(artifacts):
            raise ExportError("verification failed: no artifact passed its bar: " + "; ".join(ctx.failures))
        swap_in(stage, out)
        log.info("bundle %s: %d artifacts (%d missed a bar) in %.0f s, peak RSS %.0f MB", out, len(artifacts),
                 len(missed), total_s, stats["total"]["peak_rss_mb"])
        return manifest
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        for imgs in (ctx.calibration, ctx.selection):  # temporary row files of images read from --data
            if isinstance(imgs, PhoneImages):
                imgs.close()


# Precisions whose artifact is the model itself, not a compressed copy: one of them missing its bar
# means an exporter or runtime is wrong, not that quantization did not hold (the CLI exits 3).
FULL_PRECISIONS = ("fp32", "fp16")


def _names(failure: str, file: str) -> bool:
    """A failure line is about ``file``: every check writes ``"FILE missed ..."`` or ``"FILE: ..."``."""
    return failure.startswith((f"{file} ", f"{file}:"))


def _mark_missed(artifacts: list[Artifact], failures: list[str]) -> list[dict[str, Any]]:
    """Mark every artifact a failure line names as ``failed``; the ``missed`` entries of the summary."""
    missed = []
    for a in artifacts:
        why = [f[len(a.file):].lstrip(": ").replace(" missed its bar: ", ": ", 1).replace("missed its bar: ", "", 1)
               for f in failures if _names(f, a.file)]
        if a.verification.get("status") == "failed" or why:
            a.verification["status"] = "failed"
            missed.append({"file": a.file, "format": a.format, "precision": a.precision,
                           "why": "; ".join(why) or "failed its verification"})
    return missed


def _decided_text(decided: dict[str, int], split: str) -> str:
    parts = [f"{decided.get('heldout', 0)} {split} photos"]
    if decided.get("val"):
        parts.append(f"{decided['val']} val photos")
    if decided.get("augmented_views"):
        parts.append(f"{decided['augmented_views']} augmented views of the {split} photos")
    return f"{decided.get('images', 0)} images (" + " + ".join(parts) + ")"


def _summary(missed: list[dict[str, Any]], ctx: ExportContext, *, strict: bool, min_bar_images: int) -> dict[str, Any]:
    """The manifest's ``verification_summary``: ``passed`` or ``partial`` (``missed`` lists why)."""
    return {"status": "partial" if missed else "passed", "failures": list(ctx.failures), "missed": missed,
            "strict": strict, "min_bar_images": min_bar_images, "decided_on": dict(ctx.decided_on)}


def missed_artifacts(manifest: Manifest) -> list[dict[str, Any]]:
    """The artifacts of a bundle that missed a verification bar: ``[{"file", "format", "precision", "why"}]``.

    Bundles written before ``missed`` was recorded: every artifact whose verification status is ``failed``.

    Example:
        >>> [m["file"] for m in missed_artifacts(load_manifest("runs/reef"))]  # doctest: +SKIP
        ['model.int8.pte']
    """
    recorded = manifest.verification_summary.get("missed")
    if isinstance(recorded, list):
        return recorded
    return [{"file": a.file, "format": a.format, "precision": a.precision, "why": "failed its verification"}
            for a in manifest.artifact_list() if a.verification.get("status") == "failed"]


def _refuse_if_short(step: str, need_mb: float, wanted: list[str], limit_mb: float | None) -> None:
    """One line before a step that would not fit, naming what to lower."""
    others = [f for f in wanted if f != "pytorch"]
    lower = ("--formats (export fewer formats per run, e.g. --formats " + others[0] + ")" if len(others) > 1
             else "--formats or --calibration-size")
    try:
        check_memory(step, need_mb, lower=lower, limit_mb=limit_mb)
    except MemoryRefusal as e:
        raise ExportError(str(e)) from None
