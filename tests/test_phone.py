"""fieldid.export.phone, the phone contract: preprocessing against training's torchvision pipeline, which
file a phone runs, and every consumer (server engine, demo, ``fieldid predict``) answering through it."""
from __future__ import annotations

import io
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from fieldid.export.manifest import Artifact, ManifestError, load_manifest
from fieldid.export.phone import (RESPONSE_FIELDS, ImageInputError, PhoneError, PhoneModel, decode_image,
                                  onnx_precisions, prediction, preprocess, select_artifact, softmax)
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
    assert tuple(p) == RESPONSE_FIELDS and set(RESPONSE_FIELDS) == {
        "schema_version", "model", "version", "source", "top_k", "confidence", "needs_fallback",
        "fallback_threshold", "latency_ms", "unknown", "unknown_score", "unknown_threshold", "model_version"}
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


# --------------------------------------------------------------------------- which file a phone runs
def test_select_artifact_prefers_verified_int8_and_says_when_it_cannot(tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    fp32 = m.find("onnx", "fp32")
    assert onnx_precisions(m) == ["int8", "fp32"]  # export builds model.int8.onnx too
    # As passed (whether this machine's int8 kernels met the bar on the toy model is not the question here).
    int8 = Artifact(**{**asdict(m.find("onnx", "int8")), "verification": {"status": "passed"}})
    # The same manifest without its int8 artifact: fp32, and a notice saying why.
    m.artifacts = [a for a in m.artifacts if a["file"] != int8.file]
    art, notice = select_artifact(m, "auto")
    assert art.precision == "fp32" and "no int8" in notice
    with pytest.raises(PhoneError, match="no int8 ONNX"):
        select_artifact(m, "int8")
    m.set_artifact(int8)
    art, notice = select_artifact(m, "auto")
    assert (art.precision, notice) == ("int8", "")
    assert select_artifact(m, "fp32")[0].file == fp32.file
    # An int8 file kept despite failing verification (--allow-drop) is not shipped by default.
    failed = Artifact(**{**asdict(int8), "verification": {"status": "failed", "top1_agreement": 0.85}})
    m.set_artifact(failed)
    art, notice = select_artifact(m, "auto")
    assert art.precision == "fp32" and "failed its verification" in notice and "85.0%" in notice
    assert select_artifact(m, "int8")[0].precision == "int8"  # still selectable on purpose
    with pytest.raises(PhoneError, match="not one of"):
        select_artifact(m, "fp16")


def test_select_artifact_ships_int8_only_when_verification_passed(tiny_bundle: Path) -> None:
    """"Verified int8, else fp32": an int8 file that was never verified (no status, or skipped) is not what
    a phone ships. (The demo's old rule took any int8 file that had not *failed*.)"""
    m = load_manifest(tiny_bundle)
    int8 = m.find("onnx", "int8")
    for verification in ({}, {"status": "skipped"}):
        m.set_artifact(Artifact(**{**asdict(int8), "verification": verification}))
        art, notice = select_artifact(m)
        assert art.precision == "fp32" and "was not verified" in notice


def test_damaged_artifact_is_refused(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    onnx = bundle / load_manifest(bundle).find("onnx", "fp32").file
    onnx.write_bytes(onnx.read_bytes()[:-1] + b"\0")
    with pytest.raises(PhoneError, match="sha256 differs") as e:
        PhoneModel(bundle, "fp32")
    assert isinstance(e.value, ManifestError)  # the server's callers catch it as a bundle problem


# --------------------------------------------------------------------------- one answer everywhere
def _big_jpeg() -> bytes:
    """A photo large enough for the JPEG draft decode to reduce it (the phone's decode differs from a full one)."""
    img = Image.fromarray(skdata.chelsea()).resize((1804, 1200), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def test_predict_the_server_and_the_demo_answer_one_photo_identically(tiny_bundle: Path) -> None:
    """``fieldid predict`` answers "as the phone does": same decode (JPEG draft size), same file, same
    numbers as the demo's on-device model; the server engine's fp32 answer equals the device's fp32 one.
    (predict used to decode every pixel, so its probabilities differed from the demo's on large JPEGs.)"""
    from fieldid.classify import DevicePredictor
    from fieldid.serve.engine import ClassifierEngine

    data = _big_jpeg()
    phone = PhoneModel(tiny_bundle, "auto").predict(data, k=5).response
    predicted = DevicePredictor.load(tiny_bundle).predict(data, k=5)
    assert predicted["version"] == phone["version"]  # the same file: the phone's choice
    strip = ("latency_ms",)
    assert {k: v for k, v in predicted.items() if k not in strip} == {k: v for k, v in phone.items() if k not in strip}

    device_fp32 = PhoneModel(tiny_bundle, "fp32").predict(data, k=5).response
    server = ClassifierEngine.from_bundle(tiny_bundle, device="cpu", threads=1, top_k=5).predict(data)
    assert server["source"] == "server" and device_fp32["source"] == "device"
    assert server["top_k"] == device_fp32["top_k"]
    assert (server["unknown_score"], server["needs_fallback"]) == (device_fp32["unknown_score"],
                                                                   device_fp32["needs_fallback"])
