"""Core ML: ``model.mlpackage`` (ML Program, fp16, iOS 16+) and ``model.int8.mlpackage`` (int8 weights).

The model is a classifier with an *image* input: RGB pixels 0-255 in, class label and a
label -> probability dictionary out. ``ImageType`` can only scale by one scalar, so the
per-channel ``(pixel / 255 - mean) / std`` is put inside the model (exact), followed by the
network and ``softmax(logits / T)`` with the run's temperature: the probabilities are the
calibrated ones an app compares with the fallback threshold.

Core ML cannot run on Linux. What can be checked here is checked, from the saved file: the
spec type, the input (image, RGB, size), the labels and their order, the output names and
that every op exists in the iOS 16 op set. The traced PyTorch program that was converted is
also run on the held-out split against the reference model, which proves the in-model
normalisation and temperature are right; only the fp16 numerics of the device stay unverified.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import nn

from .registry import converting, quiet_third_party, register_exporter, register_label_reader
from .verify import ExportContext, input_spec, make_artifact
from .manifest import Artifact
from .unknown import UNKNOWN_OUTPUT, first_output, output_names

__all__ = ["export_coreml", "inspect_mlpackage", "CoreMLClassifier", "MIN_TARGET"]

log = logging.getLogger("fieldid.export")
MIN_TARGET = "iOS16"
INPUT_NAME = "image"
OUTPUTS = ("classLabel", "classLabel_probs")
PROBABILITY_TOLERANCE = 1e-4


class CoreMLClassifier(nn.Module):
    """RGB 0-255 image -> calibrated probabilities, with the exact per-channel normalisation inside."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], temperature: float) -> None:
        super().__init__()
        self.model = model
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        # (x / 255 - m) / s == x * (1 / (255 s)) - m / s: one multiply-add per pixel.
        self.register_buffer("scale", 1.0 / (255.0 * s))
        self.register_buffer("shift", -m / s)
        self.inv_temperature = float(1.0 / temperature)

    def forward(self, image: torch.Tensor) -> Any:
        out = self.model(image * self.scale + self.shift)
        if isinstance(out, tuple):  # (logits, unknown_score): the score passes through unchanged
            return torch.softmax(out[0] * self.inv_temperature, dim=1), out[1]
        return torch.softmax(out * self.inv_temperature, dim=1)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """coremltools warns about untested torch/sklearn versions, missing macOS libraries, progress bars."""
    ct_log = logging.getLogger("coremltools")
    level = ct_log.level
    ct_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), quiet_third_party():
            warnings.filterwarnings("ignore", module=r"coremltools(\..*)?")
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+`? is deprecated", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r"Implicitly cleaning up", category=ResourceWarning)
            yield
    finally:
        ct_log.setLevel(level)


def _ct():
    with _quiet():
        import coremltools as ct
    return ct


# --------------------------------------------------------------------------- structure checks
def _main_block(spec: Any) -> Any:
    fn = spec.mlProgram.functions["main"]
    return fn.block_specializations[fn.opset]


def _classify_labels(spec: Any) -> list[str]:
    for op in _main_block(spec).operations:
        if op.type == "classify":
            values = op.inputs["classes"].arguments[0].value.immediateValue.list.values
            return [v.immediateValue.tensor.strings.values[0] for v in values]
    return []


def _ops_unavailable_at(ops: set[str], target: Any) -> list[str]:
    from coremltools.converters.mil.mil.ops.registry import SSAOpRegistry

    missing = []
    for op in sorted(ops):
        versions = SSAOpRegistry.core_ops.get(op)
        if not versions or min(versions) > target:
            missing.append(op)
    return missing


def inspect_mlpackage(path: str | Path) -> dict[str, Any]:
    """What a saved ``.mlpackage`` declares, read from its spec (works without macOS).

    Returns:
        ``{"spec_type", "specification_version", "input": {...}, "outputs": [...], "labels": [...],
        "ops": {op: count}, "ops_missing_in_ios16": [...], "int8_weight_ops": n, "metadata": {...}}``.

    Example:
        >>> inspect_mlpackage("model.mlpackage")["labels"]  # doctest: +SKIP
        ['farmed', 'wild']
    """
    ct = _ct()
    with _quiet():
        spec = ct.utils.load_spec(str(path))
    desc = spec.description
    inp = desc.input[0]
    img = inp.type.imageType if inp.type.WhichOneof("Type") == "imageType" else None
    info: dict[str, Any] = {
        "spec_type": spec.WhichOneof("Type"),
        "specification_version": int(spec.specificationVersion),
        "input": {"name": inp.name, "type": inp.type.WhichOneof("Type"),
                  "width": int(img.width) if img else None, "height": int(img.height) if img else None,
                  "color": ct.proto.FeatureTypes_pb2.ImageFeatureType.ColorSpace.Name(img.colorSpace) if img else None},
        "outputs": [o.name for o in desc.output],
        "predicted_feature": desc.predictedFeatureName,
        "predicted_probabilities": desc.predictedProbabilitiesName,
        "metadata": dict(desc.metadata.userDefined),
    }
    if info["spec_type"] == "mlProgram":
        ops = Counter(op.type for op in _main_block(spec).operations)
        info["labels"] = _classify_labels(spec)
        info["ops"] = dict(sorted(ops.items()))
        info["opset"] = spec.mlProgram.functions["main"].opset
        info["ops_missing_in_ios16"] = _ops_unavailable_at(set(ops), ct.target.iOS16)
        info["int8_weight_ops"] = sum(n for op, n in ops.items() if op.startswith("constexpr_"))
    return info


@register_label_reader("coreml")
def _coreml_labels(path: Path) -> list[str]:
    info = inspect_mlpackage(path)
    # A classifier keeps them in its classify op; the two-output program (unknown_score) in its metadata.
    return info.get("labels") or json.loads(info["metadata"].get("fieldid.labels", "[]"))


def _structure_checks(ctx: ExportContext, info: dict[str, Any], *, int8_weights: bool) -> dict[str, Any]:
    size = ctx.record.preprocess_spec.crop_size
    # With an unknown detector the model is a plain two-output program (coremltools' classifier
    # takes exactly one output): the labels then live in the metadata, as in every other format.
    scored = len(output_names(ctx)) > 1
    labels = json.loads(info["metadata"].get("fieldid.labels", "null")) if scored else info.get("labels")
    checks = {
        "spec_type_mlprogram": info["spec_type"] == "mlProgram",
        "specification_version_ios16": info["specification_version"] == 7,  # Core ML 6 = iOS 16
        "input_rgb_image_of_crop_size": info["input"] == {"name": INPUT_NAME, "type": "imageType", "width": size,
                                                          "height": size, "color": "RGB"},
        "label_order_matches_run": labels == ctx.labels,
        "outputs": (info["outputs"] == [OUTPUTS[1], UNKNOWN_OUTPUT] if scored else
                    info["outputs"] == list(OUTPUTS) and info["predicted_feature"] == OUTPUTS[0]),
        "ops_available_in_ios16": not info.get("ops_missing_in_ios16", ["?"]),
        "metadata_labels_match": json.loads(info["metadata"].get("fieldid.labels", "null")) == ctx.labels,
    }
    if int8_weights:
        checks["int8_weights_present"] = info.get("int8_weight_ops", 0) > 0
    return checks


# --------------------------------------------------------------------------- export
def _pixels(ctx: ExportContext) -> np.ndarray:
    """The held-out images back as 0-255 pixels (exact: they were integers before normalising)."""
    spec = ctx.record.preprocess_spec
    mean = np.asarray(spec.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, 3, 1, 1)
    return np.clip(np.round((ctx.heldout * std + mean) * 255.0), 0, 255).astype(np.float32)


def _check_traced(ctx: ExportContext, traced: torch.jit.ScriptModule) -> dict[str, Any]:
    """Run the exact program handed to coremltools (fp32, on CPU) on the held-out pixels.

    Its probabilities must equal ``softmax(reference_logits / T)``: this proves the in-model
    normalisation and temperature, which no structure check can.
    """
    with torch.no_grad():
        outs = [traced(torch.from_numpy(p[None])) for p in _pixels(ctx)]
        probs = torch.cat([first_output(o) for o in outs]).numpy()
    ref = torch.softmax(torch.from_numpy(ctx.reference_logits) / ctx.record.temperature, dim=1).numpy()
    diff = float(np.abs(probs - ref).max())
    agree = float((probs.argmax(1) == ctx.reference_logits.argmax(1)).mean())
    ok = diff <= PROBABILITY_TOLERANCE and agree == 1.0
    if not ok:
        ctx.failures.append(f"model.mlpackage: converted program differs from PyTorch (max |prob diff| {diff:.2e}, "
                            f"agreement {agree:.2%})")
    return {"status": "passed" if ok else "failed", "what": "traced fp32 program given to ct.convert, run on CPU",
            "split": ctx.heldout_split, "num_images": int(len(probs)), "max_abs_probability_diff": diff,
            "top1_agreement": agree, "bar": f"max |prob diff| <= {PROBABILITY_TOLERANCE:g}, 100% agreement"}


def _set_metadata(mlmodel: Any, ctx: ExportContext) -> None:
    r = ctx.record
    mlmodel.short_description = f"fieldid {r.name}: {r.backbone} classifier ({len(r.labels)} classes)"
    mlmodel.input_description[INPUT_NAME] = (f"RGB image {r.preprocess['crop_size']}x{r.preprocess['crop_size']}: "
                                             f"resize the shorter side to {r.preprocess['resize_size']}, center-crop")
    mlmodel.output_description[OUTPUTS[1]] = "calibrated probabilities softmax(logits / temperature)"
    meta = {"fieldid.labels": json.dumps(r.labels), "fieldid.preprocess": json.dumps(r.preprocess),
            "fieldid.temperature": repr(r.temperature), "fieldid.fallback_threshold": repr(r.fallback_threshold),
            "fieldid.temperature_in_model": "true"}
    if len(output_names(ctx)) > 1:
        mlmodel.output_description[UNKNOWN_OUTPUT] = "higher = less like the training photos; > unknown_threshold = unknown"
        meta["unknown_threshold"] = repr(float(r.unknown["threshold"]))
    mlmodel.user_defined_metadata.update(meta)


def _artifact(ctx: ExportContext, file: str, precision: str, method: str, program_check: dict[str, Any], *,
              int8_weights: bool) -> Artifact:
    info = inspect_mlpackage(ctx.stage / file)
    checks = _structure_checks(ctx, info, int8_weights=int8_weights)
    ok = all(checks.values())
    if not ok:
        bad = [k for k, v in checks.items() if not v]
        ctx.failures.append(f"{file}: structure checks failed: {', '.join(bad)}")
    ver = {
        "status": "structure_only" if ok else "failed",
        "reason": "Core ML runs only on macOS/iOS; numerics of this file cannot be executed on Linux",
        "checks": checks,
        "labels": {"status": "passed" if checks["label_order_matches_run"] else "failed", "read_from_file": True},
        "converted_program_check": program_check,
        "spec": {k: info.get(k) for k in ("spec_type", "specification_version", "input", "outputs", "opset", "ops",
                                          "int8_weight_ops")},
    }
    log.info("verified %-22s structure %s (%d checks)", file, "ok" if ok else "FAILED", len(checks))
    scored = len(output_names(ctx)) > 1
    return make_artifact(ctx, file, "coreml", precision, method=method, input_name=INPUT_NAME,
                         output_name=OUTPUTS[1], outputs="probabilities" if scored else "classifier",
                         temperature_in_model=True,
                         input=input_spec(ctx, batch=1, normalization="in_model", name=INPUT_NAME),
                         labels_in_file="metadata fieldid.labels (classLabel_probs in label order)" if scored
                         else "classify op class labels (classLabel / classLabel_probs)",
                         verification=ver)


def _coreml_outputs(ctx: ExportContext, ct: Any) -> dict[str, Any]:
    """``ct.convert`` arguments for the classifier outputs, plus ``unknown_score`` when the run has one."""
    if len(output_names(ctx)) == 1:
        return {"classifier_config": ct.ClassifierConfig(list(ctx.labels))}
    # coremltools' ClassifierConfig supports one output only (an extra one fails in its MIL backend).
    return {"outputs": [ct.TensorType(name=OUTPUTS[1]), ct.TensorType(name=UNKNOWN_OUTPUT)]}


@register_exporter("coreml")
def export_coreml(ctx: ExportContext) -> list[Artifact]:
    """``model.mlpackage`` (fp16 ML Program classifier) and ``model.int8.mlpackage`` (int8 weights)."""
    ct = _ct()
    import coremltools.optimize.coreml as cto

    spec = ctx.record.preprocess_spec
    wrapper = CoreMLClassifier(ctx.model, spec.mean, spec.std, ctx.record.temperature).eval()
    size = spec.crop_size
    example = torch.from_numpy(_pixels(ctx)[:1])
    with _quiet(), torch.no_grad(), converting("coreml"):
        traced = torch.jit.trace(wrapper, example)
    with converting("coreml", doing="running the traced program on the held-out split"):
        program_check = _check_traced(ctx, traced)
    with _quiet(), converting("coreml"):
        mlmodel = ct.convert(
            traced, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
            compute_precision=ct.precision.FLOAT16,
            inputs=[ct.ImageType(name=INPUT_NAME, shape=(1, 3, size, size), color_layout=ct.colorlayout.RGB,
                                 scale=1.0, bias=[0.0, 0.0, 0.0])],
            **_coreml_outputs(ctx, ct),
        )
        _set_metadata(mlmodel, ctx)
        mlmodel.save(str(ctx.stage / "model.mlpackage"))
    fp16 = _artifact(ctx, "model.mlpackage", "fp16",
                     "coremltools ct.convert, ML Program, fp16 compute, iOS16 target, ClassifierConfig",
                     program_check, int8_weights=False)
    if not ctx.int8:
        return [fp16]
    with _quiet(), converting("coreml int8"):
        config = cto.OptimizationConfig(global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric",
                                                                                   dtype="int8"))
        q = cto.linear_quantize_weights(mlmodel, config=config)
        _set_metadata(q, ctx)
        q.save(str(ctx.stage / "model.int8.mlpackage"))
    int8 = _artifact(ctx, "model.int8.mlpackage", "int8_weights",
                     "coremltools.optimize.coreml.linear_quantize_weights, int8 symmetric per-channel weights, "
                     "fp16 activations", program_check, int8_weights=True)
    int8.quantization = {"method": "linear_quantize_weights", "mode": "linear_symmetric", "dtype": "int8",
                         "granularity": "per_channel", "activations": "fp16 (weights-only quantization)",
                         "calibration_images": 0}
    return [fp16, int8]
