"""The phone contract: what a phone app does around the model, in numpy + Pillow + ONNX Runtime (no torch).

Every consumer of a bundle answers a photo through this module, so they cannot drift apart:
the server engine (``serve/engine.py``), the Gradio demo (``edge_demo/``), the web app's build
and latency bench (``app/``), ``fieldid predict`` (``fieldid/classify.py``) and the cascade and
unknown-photo benchmarks (``export/bench_cascade.py``, ``export/bench_ood.py``). None of them imports
another; each imports this.

The contract, in the order a photo meets it:

* **Decode** — :func:`decode_image`: :mod:`fieldid.intake`'s policy (JPEG, PNG, WebP, BMP,
  TIFF, HEIC; one pixel limit; EXIF orientation; JPEG draft decoding at the manifest's resize
  size). Errors carry an HTTP-style status (400 empty, 413 too large, 415 not an image).
* **Preprocess** — :func:`preprocess`: the manifest's recipe, bit-for-bit what training's
  torchvision eval pipeline does; ``app/static/preprocess.js`` is tested against it.
  :func:`prepare` is both steps (bytes -> model input), the one path every consumer uses
  (:func:`decode_for_model` + :func:`preprocess` where the two are timed apart).
* **Which file** — :func:`select_artifact`: the verified int8 ONNX model, else the fp32 one.
  The demo, the web app's default, ``fieldid predict`` and the cascade bench all ship/run
  that file.
* **Run** — :func:`onnx_session` and :class:`OnnxRunner`: one ONNX Runtime call gives the
  logits and, when the file has that output, the unknown score.
* **Calibrate, unknown, fallback** — :func:`softmax` with the manifest's temperature,
  :func:`is_unknown` (score above the manifest's threshold), :func:`needs_fallback`
  (unknown, or calibrated confidence below ``fallback_threshold``: the server is asked).
* **Answer** — :func:`prediction` / :func:`answer`: the one response schema
  (:data:`RESPONSE_FIELDS`) shared by the device, the server and ``fieldid predict``.

:class:`PhoneModel` puts the steps together for one artifact of a bundle.
"""
from __future__ import annotations

import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from PIL import Image

from fieldid.intake import ACCEPTED_FORMATS, MAX_PIXELS, ImageInputError, open_image
from fieldid.records import PreprocessSpec, file_sha256

from .manifest import Artifact, Manifest, ManifestError, bundle_dir_of, load_manifest

if TYPE_CHECKING:  # annotations only: onnxruntime is imported when a model is really loaded
    import onnxruntime

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "MAX_FILE_BYTES",
    "PRECISIONS",
    "RESPONSE_SCHEMA_VERSION",
    "RESPONSE_FIELDS",
    "ImageInputError",
    "PhoneError",
    "decode_image",
    "check_resize_fits",
    "preprocess",
    "decode_for_model",
    "prepare",
    "center_crop",
    "normalize",
    "onnx_precisions",
    "select_artifact",
    "checked_file",
    "onnx_session",
    "OnnxRunner",
    "softmax",
    "is_unknown",
    "needs_fallback",
    "prediction",
    "answer",
    "PhoneAnswer",
    "PhoneModel",
]

ALLOWED_FORMATS = ACCEPTED_FORMATS  # the intake policy's formats (Pillow names)
DEFAULT_MAX_PIXELS = MAX_PIXELS  # the intake policy's one pixel limit
# A file larger than any phone photo: apps refuse it before reading or decoding it.
MAX_FILE_BYTES = 30_000_000
RESPONSE_SCHEMA_VERSION = 1
# Every answer (device, server, ``fieldid predict``) has exactly these keys; see prediction().
RESPONSE_FIELDS = ("schema_version", "model", "version", "model_version", "source", "top_k", "confidence",
                   "unknown", "unknown_score", "unknown_threshold", "needs_fallback", "fallback_threshold",
                   "latency_ms")
# The ONNX precisions a phone runs, in order of preference (select_artifact's "auto").
PRECISIONS = ("int8", "fp32")

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


class PhoneError(ManifestError):
    """The bundle cannot be run as a phone runs it: no ONNX model of that precision, or a file
    whose sha256 differs from the manifest (damaged or replaced)."""


# --------------------------------------------------------------------------- decode + preprocess
def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None) -> Image.Image:
    """Decode photo bytes to RGB with EXIF orientation applied (:func:`fieldid.intake.open_image`).

    Args:
        data: the encoded photo (a request body, an upload).
        max_pixels: pixel limit, checked before decoding.
        target: the manifest's ``resize_size``; a JPEG then decodes at reduced size, its shorter
            side still >= ``fieldid.intake.DRAFT_MARGIN x target`` (2.5x faster on a 24 MP photo,
            see ``fieldid bench intake``). The pixel limit applies to the full size either way.

    Raises:
        ImageInputError: 400 empty body, 415 not an accepted format or undecodable (incl. a
            malformed EXIF block), 413 more than ``max_pixels`` pixels.

    Examples:
        >>> decode_image(b"")
        Traceback (most recent call last):
        ...
        fieldid.intake.ImageInputError: empty image: send a JPEG, PNG, WEBP, BMP, TIFF, HEIC file
    """
    return open_image(bytes(data), target=target, max_pixels=max_pixels)


def check_resize_fits(size: tuple[int, int], resize_size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
    """Refuse an image whose resized copy (shorter side -> ``resize_size``) would exceed ``max_pixels``.

    Resizing the shorter side scales the longer one up too: a 20000x1 strip passes the pixel
    limit but would become a gigabyte-sized intermediate image. Call after :func:`decode_image`.

    Raises:
        ImageInputError: 413, the image is too elongated.

    Examples:
        >>> check_resize_fits((20_000, 1), 256)
        Traceback (most recent call last):
        ...
        fieldid.intake.ImageInputError: image is 20000x1: too elongated to resize (pixel limit 100000000)
    """
    w, h = size
    r = int(resize_size)
    if r * math.ceil(r * max(w, h) / min(w, h)) > max_pixels:
        raise ImageInputError(f"image is {w}x{h}: too elongated to resize (pixel limit {max_pixels})", 413)


def _resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if (new_w, new_h) == (w, h):
        return img  # torchvision returns the image untouched in this case too
    return img.resize((new_w, new_h), _RESAMPLE[interpolation])


def center_crop(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> uint8 ``(crop, crop, 3)``: the manifest's resize (shorter side) and center crop.

    The first half of :func:`preprocess`; a run stores its export samples in this form.
    """
    img = _resize_shorter(img.convert("RGB"), spec.resize_size, spec.interpolation)
    w, h = img.size
    c = spec.crop_size
    top = int(round((h - c) / 2.0))
    left = int(round((w - c) / 2.0))
    return np.asarray(img.crop((left, top, left + c, top + c)), dtype=np.uint8)


def normalize(pixels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """uint8 ``(N, crop, crop, 3)`` -> float32 ``(N, 3, crop, crop)``: scale and mean/std, the second half of
    :func:`preprocess`."""
    x = np.asarray(pixels, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> float32 ``(1, 3, crop, crop)`` array, as the manifest prescribes.

    Matches torchvision's ``Resize -> CenterCrop -> ToTensor -> Normalize`` on PIL images
    (same Pillow resampling, same crop rounding, float32 arithmetic).
    """
    return normalize(center_crop(img, spec)[None], spec)


def decode_for_model(data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                     draft: bool = True) -> Image.Image:
    """Photo bytes -> the RGB image the model's preprocessing starts from.

    Decodes under the intake policy, a JPEG at reduced DCT size for ``spec.resize_size`` (the same
    draft rule on the phone stand-in, the server and ``fieldid predict``, so their answers on one
    photo are identical), and refuses an image too elongated to resize.

    Args:
        data: the encoded photo.
        spec: the manifest's preprocessing.
        max_pixels: pixel limit (413 above).
        draft: False decodes every pixel (only the serve bench's "before" row uses this).

    Raises:
        ImageInputError: 400 / 413 / 415 as :func:`decode_image` and :func:`check_resize_fits` say.
    """
    img = decode_image(data, max_pixels=max_pixels, target=spec.resize_size if draft else None)
    check_resize_fits(img.size, spec.resize_size, max_pixels)
    return img


def prepare(data: bytes, spec: PreprocessSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS,
            draft: bool = True) -> np.ndarray:
    """Photo bytes -> the model's ``(1, 3, crop, crop)`` float32 input: :func:`decode_for_model`, then
    :func:`preprocess` -- the one path from bytes to model input that every consumer uses.

    Raises:
        ImageInputError: 400 / 413 / 415 (see :func:`decode_for_model`).

    Examples:
        >>> prepare(open("fish.jpg", "rb").read(), manifest.preprocess_spec).shape  # doctest: +SKIP
        (1, 3, 128, 128)
    """
    return preprocess(decode_for_model(data, spec, max_pixels=max_pixels, draft=draft), spec)


# --------------------------------------------------------------------------- which file
def _verified(art: Artifact) -> bool:
    return art.verification.get("status") == "passed"


def onnx_precisions(manifest: Manifest) -> list[str]:
    """The phone precisions this bundle has as ONNX logits models, int8 first (e.g. ``["int8", "fp32"]``)."""
    have = {a.precision for a in manifest.artifact_list() if a.format == "onnx" and a.outputs == "logits"}
    return [p for p in PRECISIONS if p in have]


def select_artifact(manifest: Manifest, precision: str = "auto") -> tuple[Artifact, str]:
    """The ONNX file a phone runs: the one answer the demo, the app build, ``fieldid predict`` and the
    cascade bench all use.

    Args:
        manifest: the bundle's manifest.
        precision: ``"auto"`` -- the int8 model when its verification passed, else fp32 --, or
            ``"int8"`` / ``"fp32"`` (asked for by name: returned even when unverified, for comparison).

    Returns:
        ``(artifact, notice)``; ``notice`` is a sentence for the user when ``auto`` runs fp32
        although a phone would rather ship int8 (no int8 file, or one that did not pass), else ``""``.

    Raises:
        PhoneError: the bundle has no ONNX model (of that precision), or ``precision`` is not valid.

    Examples:
        >>> art, notice = select_artifact(load_manifest("runs/reef"))  # doctest: +SKIP
        >>> art.file  # doctest: +SKIP
        'model.int8.onnx'
    """
    if precision not in ("auto", *PRECISIONS):
        raise PhoneError(f"precision {precision!r} is not one of: auto, {', '.join(PRECISIONS)}")
    have = onnx_precisions(manifest)
    if not have:
        raise PhoneError(f"bundle {manifest.name!r} has no ONNX model to run on the device; "
                         f"re-export it with the onnx format")
    if precision != "auto":
        if precision not in have:
            raise PhoneError(f"bundle {manifest.name!r} has no {precision} ONNX model (has: {', '.join(have)})")
        return manifest.find("onnx", precision), ""
    if "int8" in have and _verified(int8 := manifest.find("onnx", "int8")):
        return int8, ""
    if "fp32" not in have:  # an int8 file only, not verified: run it, but say so
        return manifest.find("onnx", "int8"), (f"Bundle {manifest.name!r} has only an int8 ONNX model and it did not "
                                               f"pass its verification.")
    if "int8" in have:
        v = manifest.find("onnx", "int8").verification
        agree = v.get("top1_agreement")
        detail = f" (top-1 agreement {agree:.1%} with PyTorch)" if isinstance(agree, float) else ""
        why = "failed its verification" if v.get("status") == "failed" else "was not verified"
        notice = (f"Bundle {manifest.name!r} has an int8 ONNX model, but it {why}{detail}, so the device runs "
                  f"the fp32 one; int8 stays selectable for comparison.")
    else:
        notice = (f"Bundle {manifest.name!r} has no int8 ONNX model yet, so the device runs the fp32 one "
                  f"(larger and slower than a phone would ship).")
    return manifest.find("onnx", "fp32"), notice


def checked_file(bundle_dir: str | Path, artifact: Artifact) -> Path:
    """The artifact's path after checking its sha256 against the manifest, as an app checks a download.

    Raises:
        PhoneError: the file differs from the manifest (damaged or replaced).
    """
    path = Path(bundle_dir) / artifact.file
    digest = file_sha256(path)
    if digest != artifact.sha256:
        raise PhoneError(f"{path}: sha256 differs from the manifest ({digest[:12]}... vs {artifact.sha256[:12]}...); "
                         f"the file is damaged or was replaced, re-export the bundle")
    return path


# --------------------------------------------------------------------------- run
def onnx_session(path: str | Path, *, threads: int | None = 1,
                 providers: Sequence[Any] | None = None) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session for one artifact.

    Args:
        path: the ``.onnx`` file.
        threads: intra-op threads (1 = what a phone gives a model, and steady latency on a shared
            machine; None = ONNX Runtime's default, one per core).
        providers: execution providers (default CPU).
    """
    import onnxruntime as ort  # heavy: only when a model is really loaded

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = int(threads)
    opts.inter_op_num_threads = 1  # one graph at a time; parallelism is inside each operator
    opts.log_severity_level = 3  # ORT warns about unused initializers of QDQ graphs; not actionable
    # int8 files hold u8 activations x s8 weights. On x86 without VNNI (AVX2, AVX-512 without VNNI)
    # ORT's fast u8s8 kernel adds pairs of products in saturating int16, so answers would depend on
    # the CPU; this option makes it use exact u8u8 there (no effect where VNNI is present), as the
    # phone's WebAssembly int8 and VNNI machines compute.
    opts.add_session_config_entry("session.x64quantprecision", "1")
    return ort.InferenceSession(str(path), sess_options=opts, providers=list(providers or ["CPUExecutionProvider"]))


class OnnxRunner:
    """One ONNX Runtime call per batch: ``(N, 3, H, W)`` -> logits ``(N, C)`` and unknown scores ``(N,)``.

    The unknown score is read from the file's ``artifact.unknown_output`` when it has one (bundles
    with an unknown detector); otherwise it is ``None``.
    """

    def __init__(self, session: Any, artifact: Artifact, *, input_dtype: Any = np.float32) -> None:
        self.session = session
        self.artifact = artifact
        self.unknown_output = artifact.unknown_output or ""
        self._outputs = [artifact.output_name] + ([self.unknown_output] if self.unknown_output else [])
        self._input_dtype = input_dtype
        # The manifest's names against the file's own, here rather than as an ORT error on the first photo.
        if hasattr(session, "get_inputs"):
            inputs = [i.name for i in session.get_inputs()]
            outputs = [o.name for o in session.get_outputs()]
            if artifact.input_name not in inputs:
                raise ManifestError(f"{artifact.file}: the manifest's input_name {artifact.input_name!r} is not an "
                                    f"input of the file (it has {', '.join(map(repr, inputs))})")
            missing = [o for o in self._outputs if o not in outputs]
            if missing:
                raise ManifestError(f"{artifact.file}: the manifest names output(s) {', '.join(map(repr, missing))} "
                                    f"the file does not have (it has {', '.join(map(repr, outputs))})")

    def __call__(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.ascontiguousarray(x, dtype=self._input_dtype)
        outs = self.session.run(self._outputs, {self.artifact.input_name: x})
        logits = np.asarray(outs[0], dtype=np.float32)
        unknown = np.asarray(outs[1], dtype=np.float32).reshape(len(x)) if self.unknown_output else None
        return logits, unknown


# --------------------------------------------------------------------------- calibrate, unknown, fallback
def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Calibrated probabilities ``softmax(logits / temperature)`` along the last axis (float64).

    Examples:
        >>> softmax(np.array([0.0, 0.0])).tolist()
        [0.5, 0.5]
    """
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def is_unknown(scores: np.ndarray | float | None, threshold: float | None) -> np.ndarray:
    """Photos that are none of the classes: unknown score above the manifest's threshold.

    ``None`` scores or threshold (a bundle without a detector) flag nothing.

    Examples:
        >>> is_unknown(np.array([1.0, 3.0]), 2.0).tolist()
        [False, True]
    """
    if scores is None or threshold is None:
        return np.zeros(np.shape(scores) if scores is not None else (), dtype=bool)
    return np.asarray(scores, dtype=np.float64) > float(threshold)


def needs_fallback(confidence: np.ndarray | float, unknown: np.ndarray | bool,
                   fallback_threshold: float) -> np.ndarray:
    """The fallback decision: ask the server when the photo is unknown or the calibrated top-1
    probability is below ``fallback_threshold``.

    Examples:
        >>> needs_fallback(np.array([0.9, 0.5, 0.9]), np.array([False, False, True]), 0.8).tolist()
        [False, True, True]
    """
    return np.asarray(unknown, dtype=bool) | (np.asarray(confidence, dtype=np.float64) < fallback_threshold)


# --------------------------------------------------------------------------- answer
def prediction(logits: np.ndarray, labels: Sequence[str], *, temperature: float, fallback_threshold: float,
               model: str, version: str, source: str, latency_ms: float, k: int = 5,
               unknown_score: float | None = None, unknown_threshold: float | None = None,
               model_version: str = "") -> dict[str, Any]:
    """One image's answer in the shared response schema (device, server and ``predict`` alike).

    Args:
        logits: the model's class logits for one image.
        labels: class names in index order.
        temperature: calibration temperature (probabilities are ``softmax(logits / T)``).
        fallback_threshold: below this top-1 probability the answer should ask the server.
        model: the bundle's model name; ``version``: the artifact's own hash.
        source: ``"device"`` or ``"server"``.
        latency_ms: time spent on this answer.
        k: how many classes ``top_k`` lists.
        unknown_score: the artifact's ``unknown_score`` output (``None``: the artifact has none).
        unknown_threshold: the manifest's ``unknown["threshold"]``; score > threshold = unknown.
        model_version: the run's model identity (same on device and server).

    Returns:
        A dict with the keys :data:`RESPONSE_FIELDS`: ``top_k``, ``confidence``, ``unknown`` (the
        photo is none of the classes), ``needs_fallback`` (unknown, or confidence below
        ``fallback_threshold``) and the provenance fields.

    Examples:
        >>> p = prediction(np.array([2.0, 0.0]), ["wild", "farmed"], temperature=1.0,
        ...                fallback_threshold=0.5, model="salmon", version="1", source="device",
        ...                latency_ms=1.0, unknown_score=3.0, unknown_threshold=2.0)
        >>> p["top_k"][0]["label"], p["unknown"], p["needs_fallback"]
        ('wild', True, True)
    """
    probs = softmax(np.asarray(logits).reshape(-1), temperature)
    order = np.argsort(-probs, kind="stable")[: min(k, len(labels))]
    top = [{"label": labels[i], "index": int(i), "probability": float(probs[i])} for i in order]
    score = None if unknown_score is None else float(np.asarray(unknown_score).reshape(-1)[0])
    unknown = bool(is_unknown(score, unknown_threshold))
    return {
        "schema_version": RESPONSE_SCHEMA_VERSION,
        "model": model,
        "version": version,
        "model_version": model_version,
        "source": source,
        "top_k": top,
        "confidence": top[0]["probability"],
        "unknown": unknown,
        "unknown_score": score,
        "unknown_threshold": None if unknown_threshold is None else float(unknown_threshold),
        "needs_fallback": bool(needs_fallback(top[0]["probability"], unknown, fallback_threshold)),
        "fallback_threshold": fallback_threshold,
        "latency_ms": round(float(latency_ms), 3),
    }


def answer(manifest: Manifest, artifact: Artifact, logits: np.ndarray, unknown_score: float | None = None, *,
           source: str, latency_ms: float, k: int = 5, version: str | None = None) -> dict[str, Any]:
    """:func:`prediction` with the manifest's temperature, thresholds and model identity filled in.

    Args:
        manifest: the bundle's manifest.
        artifact: the file that produced ``logits`` (its unknown output decides whether the
            manifest's unknown threshold applies).
        logits: one image's class logits.
        unknown_score: that image's unknown score (``None`` when the file has no detector).
        source: ``"device"`` or ``"server"``.
        latency_ms: time spent on this answer.
        k: classes listed in ``top_k``.
        version: the version answers report (default: the artifact's sha256, 12 hex digits).
    """
    has_detector = bool(artifact.unknown_output) and unknown_score is not None
    threshold = (manifest.unknown or {}).get("threshold") if has_detector else None
    return prediction(np.asarray(logits).reshape(-1), manifest.labels, temperature=manifest.temperature,
                      fallback_threshold=manifest.fallback_threshold, model=manifest.name,
                      version=version or artifact.sha256[:12], source=source, latency_ms=latency_ms, k=k,
                      unknown_score=unknown_score if has_detector else None, unknown_threshold=threshold,
                      model_version=manifest.model_version or "")


@dataclass
class PhoneAnswer:
    """One on-device answer: the response dict plus where the time went."""

    response: dict[str, Any]
    precision: str  # of the artifact that answered
    size_bytes: int  # of that artifact: what the phone downloads
    timings_ms: dict[str, float] = field(default_factory=dict)  # decode, preprocess, model
    image_size: tuple[int, int] = (0, 0)


class PhoneModel:
    """One ONNX file of a bundle, run the way the phone runs it (the contract, end to end).

    Args:
        bundle: a bundle folder, or a run folder (its ``export/`` bundle).
        precision: ``auto`` (:func:`select_artifact`), ``int8`` or ``fp32``.
        threads: ONNX Runtime intra-op threads (a phone gives a model one or two cores).
        max_pixels: pixel limit (413 above).
        warmup: run one throw-away photo now, as apps do at start.

    Raises:
        PhoneError: no such ONNX model, or a damaged file. ManifestError: no readable bundle.

    Examples:
        >>> m = PhoneModel("runs/reef")  # doctest: +SKIP
        >>> m.predict(open("fish.jpg", "rb").read()).response["top_k"][0]["label"]  # doctest: +SKIP
        'lionfish'
    """

    def __init__(self, bundle: str | Path, precision: str = "auto", *, threads: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS, warmup: bool = True) -> None:
        self.bundle_dir = bundle_dir_of(bundle)
        self.manifest = load_manifest(self.bundle_dir)
        self.artifact, self.notice = select_artifact(self.manifest, precision)
        self.path = checked_file(self.bundle_dir, self.artifact)
        self.spec = self.manifest.preprocess_spec
        self.max_pixels = int(max_pixels)
        self.session = onnx_session(self.path, threads=max(1, int(threads)))
        self.runner = OnnxRunner(self.session, self.artifact)
        self.unknown_output = self.runner.unknown_output
        self.unknown_threshold = (self.manifest.unknown or {}).get("threshold") if self.unknown_output else None
        if warmup:
            self._warm_up()

    def _warm_up(self) -> None:
        """Pillow's decoder registry and ORT's first run cost tens of milliseconds that would
        otherwise land on the user's first photo."""
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

    def run(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """``(N, 3, H, W)`` float32 -> ``(N, C)`` logits and the ``(N,)`` unknown scores (or ``None``)."""
        return self.runner(x)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """Raw model output for a preprocessed ``(N, 3, H, W)`` float32 batch."""
        return self.runner(x)[0]

    def predict(self, image_bytes: bytes, *, k: int = 3) -> PhoneAnswer:
        """Photo bytes -> the calibrated top-``k`` answer (``source="device"``) and its timings.

        Raises:
            ImageInputError: not an accepted image, too many pixels, or too elongated to resize.
        """
        t0 = time.perf_counter()
        img = decode_for_model(image_bytes, self.spec, max_pixels=self.max_pixels)
        t1 = time.perf_counter()
        x = preprocess(img, self.spec)
        t2 = time.perf_counter()
        logits, unknown = self.runner(x)
        t3 = time.perf_counter()
        response = answer(self.manifest, self.artifact, logits[0], None if unknown is None else float(unknown[0]),
                          source="device", latency_ms=(t3 - t0) * 1e3, k=k, version=self.version)
        timings = {"decode": (t1 - t0) * 1e3, "preprocess": (t2 - t1) * 1e3, "model": (t3 - t2) * 1e3}
        return PhoneAnswer(response=response, precision=self.precision, size_bytes=self.size_bytes,
                           timings_ms={n: round(v, 3) for n, v in timings.items()}, image_size=img.size)
