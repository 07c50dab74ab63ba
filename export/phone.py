"""What a phone app does around the model, in numpy + Pillow only (no torch).

* :func:`decode_image` — bytes -> RGB image under :mod:`fieldid.intake`'s policy (JPEG, PNG,
  WebP, BMP, TIFF, HEIC; one pixel limit; EXIF orientation; JPEG draft decoding when a target
  size is given); errors carry an HTTP-style status (400 empty, 413 too large, 415 not an image).
* :func:`preprocess` — the manifest's preprocessing, bit-for-bit what training's torchvision
  eval pipeline does (resize shorter side, center crop, scale, normalise).
* :func:`prediction` — calibrated top-k in the one response schema shared by the on-device
  path and the TorchServe fallback, so an app can treat either answer the same way.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from fieldid.intake import ACCEPTED_FORMATS, MAX_PIXELS, ImageInputError, open_image
from fieldid.records import PreprocessSpec

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ImageInputError",
    "decode_image",
    "check_resize_fits",
    "preprocess",
    "center_crop",
    "normalize",
    "softmax",
    "prediction",
    "RESPONSE_SCHEMA_VERSION",
]

ALLOWED_FORMATS = ACCEPTED_FORMATS  # the intake policy's formats (Pillow names)
DEFAULT_MAX_PIXELS = MAX_PIXELS  # the intake policy's one pixel limit
RESPONSE_SCHEMA_VERSION = 1

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


def decode_image(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, target: int | None = None) -> Image.Image:
    """Decode photo bytes to RGB with EXIF orientation applied (:func:`fieldid.intake.open_image`).

    Args:
        data: the encoded photo (a request body, an upload).
        max_pixels: pixel limit, checked before decoding.
        target: the manifest's ``resize_size``; a JPEG then decodes at reduced size, its shorter
            side still >= ``fieldid.intake.DRAFT_MARGIN x target`` (2.5x faster on a 24 MP photo,
            see ``python -m fieldid.intake``). The pixel limit applies to the full size either way.

    Raises:
        ImageInputError: 400 empty body, 415 not an accepted format or undecodable (incl. a
            malformed EXIF block), 413 more than ``max_pixels`` pixels.

    Example:
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

    Example:
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


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


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
        A dict with ``top_k``, ``confidence``, ``unknown`` (the photo is none of the classes),
        ``needs_fallback`` (unknown, or confidence below ``fallback_threshold``) and the
        provenance fields.

    Example:
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
    unknown = bool(score is not None and unknown_threshold is not None and score > unknown_threshold)
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
        "needs_fallback": bool(unknown or top[0]["probability"] < fallback_threshold),
        "fallback_threshold": fallback_threshold,
        "latency_ms": round(float(latency_ms), 3),
    }
