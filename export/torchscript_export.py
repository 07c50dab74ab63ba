"""TorchScript: ``model.pt`` (scripted, else traced; frozen) and ``model.ptl`` for the lite interpreter.

Older Android apps still load ``.ptl`` through ``LiteModuleLoader``. ``optimize_for_mobile``
needs an XNNPACK-enabled torch build, which this one is not, so the lite file is the frozen
module saved with ``_save_for_lite_interpreter``. Labels, preprocessing and temperature go into
``_extra_files`` (``fieldid/labels.json`` ...), which both loaders can read back.
"""
from __future__ import annotations

import contextlib
import json
import logging
import warnings
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fieldid.cli_common import first_line

from .registry import Runner, converting, register_exporter, register_label_reader, register_runtime, run_batched
from .verify import EVAL_BATCH, ExportContext, input_spec, make_artifact, verify_artifact
from .manifest import Artifact
from .unknown import first_output

__all__ = ["export_torchscript", "load_torchscript", "load_torchscript_lite", "read_extra_files", "EXTRA_FILES"]

log = logging.getLogger("fieldid.export")
EXTRA_FILES = ("fieldid/labels.json", "fieldid/preprocess.json", "fieldid/meta.json")


@contextlib.contextmanager
def _no_jit_deprecation() -> Iterator[None]:
    """torch 2.14 deprecates torch.jit and the lite interpreter; the formats are still what apps load."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(torch\.jit\.\w+`?|Lite Interpreter) is deprecated",
                                category=FutureWarning)
        warnings.filterwarnings("ignore", message=r".*Lite Interpreter is deprecated", category=DeprecationWarning)
        yield


def _extra_files(ctx: ExportContext) -> dict[str, str]:
    r = ctx.record
    meta = {"temperature": r.temperature, "fallback_threshold": r.fallback_threshold, "backbone": r.backbone,
            "outputs": "logits", "input": "float32 NCHW, (pixel / 255 - mean) / std"}
    return dict(zip(EXTRA_FILES, (json.dumps(r.labels), json.dumps(r.preprocess), json.dumps(meta))))


def read_extra_files(path: str | Path) -> dict[str, str]:
    """The fieldid ``_extra_files`` of a ``.pt``/``.ptl`` (both are zip archives with ``extra/``).

    Example:
        >>> json.loads(read_extra_files("model.ptl")["fieldid/labels.json"])  # doctest: +SKIP
        ['farmed', 'wild']
    """
    out = {}
    with zipfile.ZipFile(path) as z:
        for name in z.namelist():
            part = name.split("/extra/", 1)
            if len(part) == 2 and part[1] in EXTRA_FILES:
                out[part[1]] = z.read(name).decode("utf-8")
    return out


@register_label_reader("torchscript")
def _pt_labels(path: Path) -> list[str]:
    files = {k: "" for k in EXTRA_FILES}
    with _no_jit_deprecation():
        torch.jit.load(str(path), map_location="cpu", _extra_files=files)  # the loader an app uses
    return json.loads(files["fieldid/labels.json"])


@register_label_reader("torchscript_lite")
def _ptl_labels(path: Path) -> list[str]:
    return json.loads(read_extra_files(path)["fieldid/labels.json"])


def _runner(module: torch.nn.Module | torch.jit.ScriptModule, threads: int) -> Runner:
    if threads:
        torch.set_num_threads(threads)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return first_output(module(torch.from_numpy(x))).numpy()

    return lambda x: run_batched(run, x, EVAL_BATCH)


@register_runtime("torchscript")
def load_torchscript(path: Path, threads: int = 0) -> Runner:
    """``torch.jit.load`` (``threads`` sets torch's process-wide intra-op threads)."""
    with _no_jit_deprecation():
        module = torch.jit.load(str(path), map_location="cpu")
    return _runner(module, threads)


@register_runtime("torchscript_lite")
def load_torchscript_lite(path: Path, threads: int = 0) -> Runner:
    """The lite interpreter (``torch.jit.mobile``), as ``LiteModuleLoader`` on Android."""
    from torch.jit.mobile import _load_for_lite_interpreter

    with _no_jit_deprecation():
        module = _load_for_lite_interpreter(str(path))
    return _runner(module, threads)


def _script_or_trace(ctx: ExportContext) -> tuple[torch.jit.ScriptModule, str]:
    with _no_jit_deprecation():
        try:
            return torch.jit.freeze(torch.jit.script(ctx.model.eval())), "torch.jit.script + freeze"
        except Exception as e:  # noqa: BLE001 - e.g. timm models with untyped Python in forward
            log.info("torch.jit.script failed (%s); tracing instead", first_line(e))
        with converting("torchscript"), torch.no_grad():
            traced = torch.jit.trace(ctx.model.eval(), ctx.example_batch(2), check_trace=False)
            return torch.jit.freeze(traced), "torch.jit.trace + freeze"


@register_exporter("torchscript")
def export_torchscript(ctx: ExportContext) -> list[Artifact]:
    """``model.pt`` and ``model.ptl``, both verified by reloading them with their own loaders."""
    module, how = _script_or_trace(ctx)
    extra = _extra_files(ctx)
    with _no_jit_deprecation(), converting("torchscript"):
        module.save(str(ctx.stage / "model.pt"), _extra_files=extra)
        module._save_for_lite_interpreter(str(ctx.stage / "model.ptl"), _extra_files=extra)
    arts = []
    for file, fmt, method in (("model.pt", "torchscript", how),
                              ("model.ptl", "torchscript_lite", how + " + _save_for_lite_interpreter")):
        ver = verify_artifact(ctx, file, fmt, "fp32")
        arts.append(make_artifact(ctx, file, fmt, "fp32", method=method, input=input_spec(ctx),
                                  labels_in_file="_extra_files['fieldid/labels.json']",
                                  verification=ver))
    return arts
