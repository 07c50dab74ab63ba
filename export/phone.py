"""What a phone app does around the model, in numpy + Pillow only (no torch).

* :func:`decode_image` — bytes -> RGB image, with a format allow-list, EXIF orientation and a
  pixel limit; errors carry an HTTP-style status (400 empty, 413 too large, 415 not an image).
* :func:`preprocess` — the manifest's preprocessing, bit-for-bit what training's torchvision
  eval pipeline does (resize shorter side, center crop, scale, normalise).
* :func:`prediction` — calibrated top-k in the one response schema shared by the on-device
  path and the TorchServe fallback, so an app can treat either answer the same way.
"""
from __future__ import annotations

import io
import math
import warnings
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageOps

from fieldid.records import PreprocessSpec

__all__ = [
    "ALLOWED_FORMATS",
    "DEFAULT_MAX_PIXELS",
    "ImageInputError",
    "decode_image",
    "check_resize_fits",
    "preprocess",
    "softmax",
    "prediction",
    "RESPONSE_SCHEMA_VERSION",
]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_PIXELS = 40_000_000  # a 40 MP phone photo; far above any model input
RESPONSE_SCHEMA_VERSION = 1

_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
             "nearest": Image.Resampling.NEAREST}


class ImageInputError(ValueError):
    """Bad image input. ``status`` is the HTTP code a server should answer with."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, *, formats: Sequence[str] = ALLOWED_FORMATS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft_side: int | None = None) -> Image.Image:
    """Decode JPEG/PNG/WEBP bytes to RGB with EXIF orientation applied.

    ``draft_side``: a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8; Pillow's draft
    mode) whose shorter side is still >= ``draft_side`` - a 24 MP photo for a 146 px model decodes
    at 1/4 size, several times faster. The pixel limit applies to the file's full size either way.

    Raises:
        ImageInputError: 400 empty body, 415 not an allowed image format or undecodable,
            413 more than ``max_pixels`` pixels.

    Example:
        >>> decode_image(b"")
        Traceback (most recent call last):
        ...
        export.phone.ImageInputError: empty request body: send a JPEG, PNG or WEBP image
    """
    if not data:
        raise ImageInputError("empty request body: send a JPEG, PNG or WEBP image", 400)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            # formats= makes Pillow try only these decoders: no surprises from exotic formats.
            im = Image.open(io.BytesIO(data), formats=list(formats))
            if im.width * im.height > max_pixels:
                raise ImageInputError(f"image is {im.width}x{im.height} pixels; the limit is {max_pixels}", 413)
            if draft_side and im.format == "JPEG" and min(im.size) >= 2 * draft_side:
                im.draft("RGB", (int(draft_side), int(draft_side)))
            im.load()
    except ImageInputError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageInputError(f"image exceeds the pixel limit of {max_pixels}", 413) from None
    except Exception:
        raise ImageInputError(f"not a decodable {', '.join(formats)} image", 415) from None
    im = ImageOps.exif_transpose(im)
    return im.convert("RGB")


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
        export.phone.ImageInputError: image is 20000x1: too elongated to resize (pixel limit 40000000)
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


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image -> float32 ``(1, 3, crop, crop)`` array, as the manifest prescribes.

    Matches torchvision's ``Resize -> CenterCrop -> ToTensor -> Normalize`` on PIL images
    (same Pillow resampling, same crop rounding, float32 arithmetic).
    """
    img = _resize_shorter(img.convert("RGB"), spec.resize_size, spec.interpolation)
    w, h = img.size
    c = spec.crop_size
    top = int(round((h - c) / 2.0))
    left = int(round((w - c) / 2.0))
    img = img.crop((left, top, left + c, top + c))
    x = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(spec.mean, dtype=np.float32)) / np.asarray(spec.std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None])


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def prediction(logits: np.ndarray, labels: Sequence[str], *, temperature: float, fallback_threshold: float,
               model: str, version: str, source: str, latency_ms: float, k: int = 5) -> dict[str, Any]:
    """One image's answer in the shared response schema.

    Example:
        >>> p = prediction(np.array([2.0, 0.0]), ["wild", "farmed"], temperature=1.0,
        ...                fallback_threshold=0.5, model="salmon", version="1", source="device",
        ...                latency_ms=1.0)
        >>> p["top_k"][0]["label"], p["needs_fallback"]
        ('wild', False)
    """
    probs = softmax(np.asarray(logits).reshape(-1), temperature)
    order = np.argsort(-probs, kind="stable")[: min(k, len(labels))]
    top = [{"label": labels[i], "index": int(i), "probability": float(probs[i])} for i in order]
    return {
        "schema_version": RESPONSE_SCHEMA_VERSION,
        "model": model,
        "version": version,
        "source": source,
        "top_k": top,
        "confidence": top[0]["probability"],
        "needs_fallback": bool(top[0]["probability"] < fallback_threshold),
        "fallback_threshold": fallback_threshold,
        "latency_ms": round(float(latency_ms), 3),
    }
