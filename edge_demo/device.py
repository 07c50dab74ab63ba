"""The on-device path: ONNX Runtime on the bundle's ONNX artifact, as a phone app runs it.

Preprocessing is :mod:`fieldid.export.phone` (numpy + Pillow), read from the bundle's manifest, so this
module -- like a phone -- never imports torch. The int8 artifact is preferred when the bundle
has one; fp32 is the fallback (and selectable for comparison).
"""
from __future__ import annotations

import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fieldid.export.manifest import Artifact, Manifest, ManifestError, file_sha256, load_manifest
from fieldid.export.phone import DEFAULT_MAX_PIXELS, check_resize_fits, decode_image, prediction, preprocess

__all__ = [
    "PRECISIONS",
    "DemoError",
    "DeviceAnswer",
    "OnDeviceModel",
    "bundle_dir_of",
    "onnx_precisions",
    "select_artifact",
]

# On-device ONNX precisions, most phone-like first: "auto" picks the first one present.
PRECISIONS = ("int8", "fp32")


class DemoError(ValueError):
    """The demo cannot run as asked (no bundle, no ONNX artifact, corrupt file, ...)."""


def bundle_dir_of(path: str | Path) -> Path:
    """A bundle folder, or a run folder -> its ``export/`` bundle (:func:`fieldid.export.manifest.bundle_dir_of`).

    Raises:
        DemoError: neither holds a ``manifest.json``.

    Example:
        >>> bundle_dir_of("runs/reef")  # doctest: +SKIP
        PosixPath('runs/reef/export')
    """
    from fieldid.export.manifest import bundle_dir_of as find_bundle  # torch-free

    try:
        return find_bundle(path)
    except ManifestError as e:
        raise DemoError(str(e)) from None


def onnx_precisions(manifest: Manifest) -> list[str]:
    """The on-device precisions this bundle offers, int8 first (e.g. ``["int8", "fp32"]``)."""
    have = {a.precision for a in manifest.artifact_list() if a.format == "onnx" and a.outputs == "logits"}
    return [p for p in PRECISIONS if p in have]


def select_artifact(manifest: Manifest, precision: str = "auto") -> tuple[Artifact, str]:
    """Pick the ONNX artifact to run on the device.

    Args:
        manifest: the bundle's manifest.
        precision: ``"auto"`` (int8 when the bundle has it, else fp32), ``"int8"`` or ``"fp32"``.

    Returns:
        ``(artifact, notice)``; ``notice`` is a sentence for the user when ``auto`` had to fall
        back to fp32 (no int8 file, or one that failed verification), else ``""``.

    Raises:
        DemoError: the bundle has no ONNX artifact of that precision.

    Example:
        >>> art, notice = select_artifact(load_manifest("runs/reef"))  # doctest: +SKIP
        >>> art.precision  # doctest: +SKIP
        'int8'
    """
    if precision not in ("auto", *PRECISIONS):
        raise DemoError(f"precision {precision!r} is not one of: auto, {', '.join(PRECISIONS)}")
    have = onnx_precisions(manifest)
    if not have:
        raise DemoError(f"bundle {manifest.name!r} has no ONNX model to run on the device; "
                        f"re-export it with the onnx format")
    if precision == "auto":
        # A phone ships only a verified model: an int8 file kept despite failing (--allow-drop) is
        # offered for comparison but not chosen.
        usable = [p for p in have if manifest.find("onnx", p).verification.get("status") != "failed"] or have
        chosen, notice = usable[0], ""
        if chosen != "int8" and "int8" in have:
            v = manifest.find("onnx", "int8").verification
            agree = v.get("top1_agreement")
            detail = f" (top-1 agreement {agree:.1%} with PyTorch)" if isinstance(agree, float) else ""
            notice = (f"Bundle {manifest.name!r} has an int8 ONNX model, but it failed its verification"
                      f"{detail}, so the device runs the fp32 one; int8 stays selectable for comparison.")
        elif chosen != "int8":
            notice = (f"Bundle {manifest.name!r} has no int8 ONNX model yet, so the device runs the fp32 one "
                      f"(larger and slower than a phone would ship).")
    elif precision in have:
        chosen, notice = precision, ""
    else:
        raise DemoError(f"bundle {manifest.name!r} has no {precision} ONNX model (has: {', '.join(have)})")
    return manifest.find("onnx", chosen), notice


@dataclass
class DeviceAnswer:
    """One on-device answer: the shared response dict plus where the time went."""

    response: dict[str, Any]
    precision: str  # of the artifact that answered
    size_bytes: int  # of that artifact: what the phone downloads
    timings_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, model
    image_size: tuple[int, int] = (0, 0)


class OnDeviceModel:
    """One ONNX artifact of a bundle, loaded into ONNX Runtime the way an app would load it.

    The file's sha256 is checked against the manifest on load, as an app checks a download.

    Example:
        >>> m = OnDeviceModel("runs/reef", precision="auto")  # doctest: +SKIP
        >>> m.predict(open("fish.jpg", "rb").read()).response["top_k"][0]["label"]  # doctest: +SKIP
        'lionfish'
    """

    def __init__(self, bundle: str | Path, precision: str = "auto", *, threads: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        import onnxruntime as ort  # heavy import: only when a model is really loaded

        self.bundle_dir = bundle_dir_of(bundle)
        try:
            self.manifest = load_manifest(self.bundle_dir)
        except ManifestError as e:
            raise DemoError(str(e)) from None
        self.artifact, self.notice = select_artifact(self.manifest, precision)
        self.path = self.bundle_dir / self.artifact.file
        if file_sha256(self.path) != self.artifact.sha256:
            raise DemoError(f"{self.path}: sha256 differs from the manifest; the file is damaged or was "
                            f"replaced, re-export the bundle")
        self.spec = self.manifest.preprocess_spec
        self.max_pixels = max_pixels
        opts = ort.SessionOptions()
        # A phone app runs one model on a couple of cores; 1 thread also keeps latency steady
        # when the machine is shared.
        opts.intra_op_num_threads = max(1, int(threads))
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=["CPUExecutionProvider"])
        self._input = self.artifact.input_name
        self._output = self.artifact.output_name
        # Contract 2: a bundle with an unknown-score detector names that output; older bundles do not.
        self.unknown_output = self.artifact.unknown_output or ""
        self.unknown_threshold = (self.manifest.unknown or {}).get("threshold") if self.unknown_output else None
        self._outputs = [self._output] + ([self.unknown_output] if self.unknown_output else [])
        self._warm_up()

    def _warm_up(self) -> None:
        """One throw-away prediction, as apps do at start: Pillow's decoder registry and ORT's
        first run cost tens of milliseconds that would otherwise land on the user's first photo."""
        buf = io.BytesIO()
        Image.new("RGB", (self.spec.resize_size, self.spec.resize_size), (90, 120, 140)).save(buf, "PNG")
        self.predict(buf.getvalue())

    @property
    def precision(self) -> str:
        return self.artifact.precision

    @property
    def size_bytes(self) -> int:
        return self.artifact.size_bytes

    @property
    def version(self) -> str:
        """First 12 hex digits of the artifact's sha256: changes exactly when the file does."""
        return self.artifact.sha256[:12]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model output for a preprocessed ``(N, 3, H, W)`` float32 batch."""
        return self.run(x)[0]

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """One ONNX Runtime call: ``(N, C)`` logits and, when the artifact has that output, the
        ``(N,)`` unknown scores (else ``None``)."""
        outs = self.session.run(self._outputs, {self._input: x})
        unknown = np.asarray(outs[1], dtype=np.float32).reshape(len(x)) if self.unknown_output else None
        return outs[0], unknown

    def predict(self, image_bytes: bytes, *, k: int = 3) -> DeviceAnswer:
        """Photo bytes -> calibrated top-``k`` answer (``source="device"``).

        Raises:
            export.phone.ImageInputError: not an allowed image, too many pixels, or too
                elongated to resize (the server's 413 rule).
        """
        t0 = time.perf_counter()
        # target: a phone photo (JPEG) decodes at reduced size, ~3x faster at 24 MP (intake's draft).
        img = decode_image(image_bytes, max_pixels=self.max_pixels, target=self.spec.resize_size)
        check_resize_fits(img.size, self.spec.resize_size, self.max_pixels)
        t1 = time.perf_counter()
        x = preprocess(img, self.spec)
        t2 = time.perf_counter()
        logits, unknown = self.run(x)
        t3 = time.perf_counter()
        m = self.manifest
        response = prediction(logits[0], m.labels, temperature=m.temperature,
                              fallback_threshold=m.fallback_threshold, model=m.name, version=self.version,
                              source="device", latency_ms=(t3 - t0) * 1e3, k=k,
                              unknown_score=None if unknown is None else float(unknown[0]),
                              unknown_threshold=self.unknown_threshold, model_version=m.model_version)
        timings = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "model": (t3 - t2) * 1e3}
        return DeviceAnswer(response=response, precision=self.precision, size_bytes=self.size_bytes,
                            timings_ms={n: round(v, 3) for n, v in timings.items()}, image_size=img.size)
