"""Photo-quality measures and the rule that flags unusual photos. numpy + Pillow only (torch-free).

Per photo, from the decoded RGB image (:func:`measure`): sharpness (variance of the Laplacian
of the grey image, after scaling its shorter side down to :data:`MEASURE_SIDE` px so photos of
different resolutions compare), mean brightness (0..1), information (Shannon entropy of the
256-level grey histogram, bits), width and height.

Flags (:func:`flag_quality`) are *relative to the dataset*: a whole set of soft, dark or
low-resolution photos (scanned digits, night surveys) is the task, not a defect. A photo is
flagged when its robust z-score (distance from the dataset median in units of 1.4826 x median
absolute deviation, with a floor so a very uniform set does not flag hair-width differences)
passes :data:`Z_LIMIT`, and for brightness and information also an absolute level (so "darker
than the rest" must also be dark). A nearly black or white photo (mean below 8 % / above 96 %) is
flagged already at a z-score of 1.5 beyond the median (a set of varied exposures has a wide
spread, which would otherwise hide it). Nearly constant photos (grey std < 2 levels) are always
low information. Fewer than :data:`MIN_PHOTOS` photos: only that last rule applies.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
from PIL import Image

__all__ = ["MEASURE_SIDE", "MIN_PHOTOS", "QUALITY_KINDS", "Z_LIMIT", "flag_quality", "measure", "robust_z"]

MEASURE_SIDE = 256
Z_LIMIT = 3.5
MIN_PHOTOS = 20
QUALITY_KINDS = ("blurry", "dark", "bright", "low_information", "odd_size", "odd_aspect")
# Floors of the robust scale, in the units of each measure (see module docstring).
_FLOOR = {"sharpness": 0.15, "brightness": 0.03, "entropy": 0.2, "side": math.log(1.25), "aspect": math.log(1.1)}
_DARK, _BRIGHT = 0.3, 0.7  # flagged brightness must also be below / above these
_BLACK, _WHITE, _EXTREME_Z = 0.08, 0.96, 1.5  # nearly black / white: flagged at a smaller z-score
_LOW_ENTROPY = 5.0  # bits; flagged information must also be below this
_FLAT_STD = 2.0  # grey levels: a photo this uniform is flagged whatever the dataset


def measure(image: Image.Image) -> dict[str, float]:
    """Quality measures of one RGB photo.

    Example:
        >>> m = measure(Image.new("RGB", (64, 48), (128, 128, 128)))
        >>> m["sharpness"], m["brightness"] > 0.5, m["entropy"], m["width"], m["height"]
        (0.0, True, 0.0, 64, 48)
    """
    w, h = image.size
    grey = image.convert("L")
    short = min(w, h)
    if short > MEASURE_SIDE:
        scale = MEASURE_SIDE / short
        grey = grey.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    a = np.asarray(grey, dtype=np.float32)
    if a.shape[0] >= 3 and a.shape[1] >= 3:
        lap = a[:-2, 1:-1] + a[2:, 1:-1] + a[1:-1, :-2] + a[1:-1, 2:] - 4 * a[1:-1, 1:-1]
        sharp = float(lap.var())
    else:
        sharp = 0.0
    hist = np.bincount(a.astype(np.uint8).ravel(), minlength=256).astype(np.float64)
    p = hist[hist > 0] / hist.sum()
    entropy = float(-(p * np.log2(p)).sum())
    return {"sharpness": round(sharp, 3), "brightness": round(float(a.mean()) / 255, 4),
            "entropy": round(abs(entropy), 4), "grey_std": round(float(a.std()), 3), "width": int(w), "height": int(h)}


def robust_z(values: Sequence[float], floor: float) -> np.ndarray:
    """``(x - median) / max(1.4826 * MAD, floor)`` of every value.

    Example:
        >>> robust_z([1, 1, 1, 1, 5], floor=0.5).tolist()
        [0.0, 0.0, 0.0, 0.0, 8.0]
    """
    x = np.asarray(values, dtype=np.float64)
    med = np.median(x)
    scale = max(1.4826 * float(np.median(np.abs(x - med))), floor)
    return (x - med) / scale


def flag_quality(measures: Sequence[dict[str, float]], *, z_limit: float = Z_LIMIT) -> dict[str, list[dict[str, Any]]]:
    """Indices of unusual photos per kind (``QUALITY_KINDS``), each ``{"index", "value", "z"}``.

    ``value`` is the measure the flag is about: sharpness, brightness, entropy, shorter side in
    px, or aspect ratio (longer / shorter side).
    """
    out: dict[str, list[dict[str, Any]]] = {k: [] for k in QUALITY_KINDS}
    n = len(measures)
    if n == 0:
        return out
    get = lambda key: np.array([m[key] for m in measures], dtype=np.float64)  # noqa: E731
    bright, entropy, std = get("brightness"), get("entropy"), get("grey_std")
    side = np.minimum(get("width"), get("height"))
    aspect = np.maximum(get("width"), get("height")) / np.maximum(side, 1)
    sharp = get("sharpness")

    def add(kind: str, idx: np.ndarray, values: np.ndarray, z: np.ndarray | None) -> None:
        for i in np.flatnonzero(idx):
            out[kind].append({"index": int(i), "value": round(float(values[i]), 4),
                              "z": None if z is None else round(float(z[i]), 2)})

    flat = std < _FLAT_STD
    if n < MIN_PHOTOS:
        add("low_information", flat, entropy, None)
        return out
    z_sharp = robust_z(np.log10(sharp + 1.0), _FLOOR["sharpness"])
    z_bright = robust_z(bright, _FLOOR["brightness"])
    z_entropy = robust_z(entropy, _FLOOR["entropy"])
    z_side = robust_z(np.log(np.maximum(side, 1)), _FLOOR["side"])
    z_aspect = robust_z(np.log(aspect), _FLOOR["aspect"])
    # A flat photo is low information, not blurry: one flag says it.
    add("blurry", (z_sharp < -z_limit) & ~flat, sharp, z_sharp)
    add("dark", ((z_bright < -z_limit) & (bright < _DARK)) | ((bright < _BLACK) & (z_bright < -_EXTREME_Z)),
        bright, z_bright)
    add("bright", ((z_bright > z_limit) & (bright > _BRIGHT)) | ((bright > _WHITE) & (z_bright > _EXTREME_Z)),
        bright, z_bright)
    add("low_information", flat | ((z_entropy < -z_limit) & (entropy < _LOW_ENTROPY)), entropy, z_entropy)
    add("odd_size", np.abs(z_side) > z_limit, side, z_side)
    add("odd_aspect", z_aspect > z_limit, aspect, z_aspect)
    return out
