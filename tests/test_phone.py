"""fieldid.export.phone: the numpy + Pillow preprocessing an app copies, against training's torchvision pipeline."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from fieldid.export.phone import ImageInputError, decode_image, prediction, preprocess, softmax
from fieldid.training.data import eval_transform
from fieldid.training.records import PreprocessSpec

# Real photos bundled with scikit-image (no downloads), incl. a portrait one and an odd size.
PHOTOS = {
    "chelsea": lambda: Image.fromarray(skdata.chelsea()),
    "coffee": lambda: Image.fromarray(skdata.coffee()),
    "astronaut": lambda: Image.fromarray(skdata.astronaut()),
    "rocket_portrait": lambda: Image.fromarray(skdata.rocket()),
    "chelsea_odd_crop": lambda: Image.fromarray(skdata.chelsea()).crop((3, 7, 290, 250)).rotate(90, expand=True),
}

SPECS = {
    "mobilenet_128": PreprocessSpec.for_crop(128, 0.875),
    "mobilenet_224": PreprocessSpec.for_crop(224, 0.875),
    "effnet_lite_bicubic": PreprocessSpec.for_crop(224, 0.875, interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3),
    "odd_sizes_nearest": PreprocessSpec(resize_size=101, crop_size=77, interpolation="nearest"),
    "tiny_64": PreprocessSpec.for_crop(64, 0.875),
}


@pytest.mark.parametrize("spec_name", sorted(SPECS))
@pytest.mark.parametrize("photo", sorted(PHOTOS))
def test_preprocess_matches_torchvision_on_real_photos(photo: str, spec_name: str) -> None:
    img, spec = PHOTOS[photo](), SPECS[spec_name]
    ours = preprocess(img, spec)
    ref = eval_transform(spec, from_cache=False)(img).numpy()[None]
    assert ours.shape == ref.shape == (1, 3, spec.crop_size, spec.crop_size)
    assert ours.dtype == np.float32 and ours.flags["C_CONTIGUOUS"]
    assert float(np.abs(ours - ref).max()) <= 1e-5


def test_preprocess_of_a_decoded_jpeg_matches_torchvision() -> None:
    """The full app path: JPEG bytes -> decode_image -> preprocess."""
    buf = io.BytesIO()
    Image.fromarray(skdata.coffee()).save(buf, format="JPEG", quality=90)
    img = decode_image(buf.getvalue())
    spec = SPECS["mobilenet_128"]
    ref = eval_transform(spec, from_cache=False)(img).numpy()[None]
    assert float(np.abs(preprocess(img, spec) - ref).max()) <= 1e-5


def test_decode_applies_exif_orientation() -> None:
    img = Image.fromarray(skdata.chelsea())  # 451 x 300 landscape
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    out = decode_image(buf.getvalue())
    assert out.size == (img.height, img.width) and out.mode == "RGB"


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("payload, status", [
    (b"", 400),
    (b"this is not an image", 415),
    (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, 415),  # truncated PNG
])
def test_decode_rejects_bad_input_with_http_status(payload: bytes, status: int) -> None:
    with pytest.raises(ImageInputError) as e:
        decode_image(payload)
    assert e.value.status == status


def test_decode_rejects_formats_outside_the_allow_list() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="GIF")
    with pytest.raises(ImageInputError) as e:
        decode_image(buf.getvalue())
    assert e.value.status == 415


def test_decode_rejects_too_many_pixels() -> None:
    with pytest.raises(ImageInputError) as e:
        decode_image(_png((200, 200)), max_pixels=100 * 100)
    assert e.value.status == 413


def test_decode_converts_grey_and_alpha_to_rgb() -> None:
    assert decode_image(_png((9, 7), "L")).mode == "RGB"
    assert decode_image(_png((9, 7), "RGBA")).mode == "RGB"


def test_prediction_schema_and_fallback() -> None:
    labels = ["wild", "farmed", "unknown"]
    logits = np.array([2.0, 1.0, -1.0])
    p = prediction(logits, labels, temperature=2.0, fallback_threshold=0.6, model="salmon", version="abc",
                   source="device", latency_ms=1.23456, k=2)
    assert set(p) == {"schema_version", "model", "version", "source", "top_k", "confidence", "needs_fallback",
                      "fallback_threshold", "latency_ms", "unknown", "unknown_score", "unknown_threshold",
                      "model_version"}
    assert p["unknown"] is False and p["unknown_score"] is None  # no unknown_score passed
    probs = softmax(logits, 2.0)
    assert [t["label"] for t in p["top_k"]] == ["wild", "farmed"]
    assert p["confidence"] == pytest.approx(probs[0])
    assert p["needs_fallback"] is bool(probs[0] < 0.6)
    assert p["latency_ms"] == 1.235
    sharp = prediction(logits, labels, temperature=0.1, fallback_threshold=0.6, model="m", version="v",
                       source="device", latency_ms=0.0)
    assert sharp["needs_fallback"] is False and len(sharp["top_k"]) == 3


def test_phone_module_does_not_import_torch() -> None:
    code = "import sys, export.phone; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
