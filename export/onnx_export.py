"""ONNX: fp32 single-file model with dynamic batch; labels/preprocessing in metadata_props."""
from __future__ import annotations

import json
import logging

import numpy as np
import torch

from .bundle import ExportContext, make_artifact, register_exporter, verify_logits
from .manifest import Artifact

__all__ = ["export_onnx", "onnx_metadata", "run_onnx"]

log = logging.getLogger("fieldid.export")
OPSET = 18


def onnx_metadata(ctx: ExportContext) -> dict[str, str]:
    """What an app needs, carried inside the file (ONNX ``metadata_props`` are strings)."""
    r = ctx.record
    return {
        "fieldid.labels": json.dumps(r.labels),
        "fieldid.preprocess": json.dumps(r.preprocess),
        "fieldid.temperature": repr(r.temperature),
        "fieldid.fallback_threshold": repr(r.fallback_threshold),
        "fieldid.backbone": r.backbone,
        "fieldid.outputs": "logits",
    }


def _set_metadata(path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))


def run_onnx(path, x: np.ndarray, *, threads: int = 0) -> np.ndarray:
    """Run an ONNX file with ONNX Runtime on CPU; returns logits."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 64]})[0] for i in range(0, len(x), 64)])


@register_exporter("onnx")
def export_onnx(ctx: ExportContext) -> list[Artifact]:
    path = ctx.stage / "model.onnx"
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        ctx.model, (ctx.example,), str(path), input_names=["input"], output_names=["logits"],
        opset_version=OPSET, dynamo=True, dynamic_shapes={"input": {0: batch}},
        external_data=False, verbose=False,
    )
    _set_metadata(path, onnx_metadata(ctx))
    ver = verify_logits(ctx, run_onnx(path, ctx.heldout), precision="fp32", name="model.onnx")
    arts = [make_artifact(ctx, "model.onnx", "onnx", "fp32", method=f"torch.onnx.export dynamo, opset {OPSET}",
                          verification=ver)]
    return arts
