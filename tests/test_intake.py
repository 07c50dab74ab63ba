"""fieldid.intake: the one image-intake policy, on real photos from scikit-image.

Each part (training's ``load_rgb``, ``fieldid data check``, the phone/server/demo ``decode_image``)
must accept and refuse the same files for the same reasons: HEIC/HEIF (written here with
pillow-heif, as an iPhone would), BMP, TIFF; one pixel limit that Pillow's own bomb warning does
not pre-empt; a malformed EXIF block refused like any other bad image; JPEG draft decoding.
"""
from __future__ import annotations

import io
import json
import warnings
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata

from helpers import make_shapes_dataset, malformed_exif_jpeg, png_header

from fieldid import intake
from fieldid.export.phone import decode_image, preprocess
from fieldid.intake import MAX_PIXELS, ImageInputError, open_image
from fieldid.training.datacheck import check_dataset, format_report
from fieldid.training.images import ImageError, load_rgb, scan_image_folder
from fieldid.training.records import PreprocessSpec


@cache
def chelsea() -> Image.Image:
    return Image.fromarray(skdata.chelsea())  # 451 x 300, landscape


def encode(im: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def rotated_exif() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    return exif.tobytes()


# --------------------------------------------------------------------------- formats


def test_heic_from_an_iphone_decodes_upright_everywhere(tmp_path: Path) -> None:
    """A HEIC written by pillow-heif with the portrait EXIF flag: upright RGB in every part."""
    data = encode(chelsea(), "HEIF", quality=90, exif=rotated_exif())
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    ref = np.asarray(chelsea().transpose(Image.Transpose.ROTATE_270), np.float32)  # what the user saw
    for img in (decode_image(data), load_rgb(path), open_image(data, target=64)):
        assert img.mode == "RGB" and img.size == (300, 451)  # portrait, rotated exactly once
        assert float(np.abs(np.asarray(img, np.float32) - ref).mean()) < 6  # lossy, but the same photo


@pytest.mark.parametrize("fmt, ext", [("BMP", ".bmp"), ("TIFF", ".tif"), ("WEBP", ".webp"), ("PNG", ".png")])
def test_bmp_tiff_webp_png_are_accepted_by_every_part(tmp_path: Path, fmt: str, ext: str) -> None:
    data = encode(chelsea(), fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    (tmp_path / f"a{ext}").write_bytes(data)
    ref = np.asarray(chelsea())
    assert np.array_equal(np.asarray(decode_image(data)), ref)  # server / demo / phone
    assert np.array_equal(np.asarray(load_rgb(tmp_path / f"a{ext}")), ref)  # training / data check
    assert intake.is_image_path(tmp_path / f"A{ext.upper()}")


@pytest.mark.parametrize("payload, status, reason", [
    (b"", 400, "empty"),
    (b"this is not an image", 415, "unreadable"),
    (encode(chelsea(), "GIF"), 415, "unsupported format"),
    (encode(chelsea(), "JPEG")[:300], 415, "unreadable"),  # truncated
    (encode(chelsea(), "ICO"), 415, "unsupported format"),
], ids=["empty", "text", "gif", "truncated_jpeg", "ico"])
def test_refusals_carry_status_and_reason(payload: bytes, status: int, reason: str) -> None:
    with pytest.raises(ImageInputError) as e:
        decode_image(payload)
    assert (e.value.status, e.value.reason) == (status, reason)
    if reason == "unsupported format":
        assert "GIF" in str(e.value) or "ICO" in str(e.value)


def test_training_load_rgb_raises_the_same_error_with_the_path(tmp_path: Path) -> None:
    path = tmp_path / "cat.jpg"
    path.write_bytes(encode(chelsea(), "GIF"))  # a GIF under a .jpg name
    with pytest.raises(ImageError) as e:
        load_rgb(path)
    assert isinstance(e.value, ImageInputError) and e.value.reason == "unsupported format"
    assert str(e.value).startswith(f"{path}: ")
    with pytest.raises(ImageError, match="unreadable|IsADirectoryError|Is a directory"):
        (tmp_path / "folder.jpg").mkdir()
        load_rgb(tmp_path / "folder.jpg")


# --------------------------------------------------------------------------- pixel limit


def test_one_pixel_limit_decides_not_pillows_bomb_warning() -> None:
    """Between Pillow's 89.5 MP warning and our 100 MP limit our check is the one that applies."""
    pillow_limit = Image.MAX_IMAGE_PIXELS
    assert pillow_limit < 9500 * 9500 < MAX_PIXELS < 10_001 * 10_000 < 2 * pillow_limit < 14_000 * 14_000
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        # 90 MP: passes the limit, so decoding starts (and fails: the header-only file has no pixels).
        with pytest.raises(ImageInputError) as e:
            decode_image(png_header(9500, 9500))
        assert e.value.status == 415 and e.value.reason == "unreadable"
        # Just over 100 MP: refused by our limit from the header, with its size in the message.
        with pytest.raises(ImageInputError, match=r"10001x10000 pixels .*the limit is 100000000") as e:
            decode_image(png_header(10_001, 10_000))
        assert e.value.status == 413 and e.value.reason == "too large"
        # 196 MP: Pillow raises DecompressionBombError in open(); still a 413, not a crash.
        with pytest.raises(ImageInputError) as e:
            decode_image(png_header(14_000, 14_000))
        assert e.value.status == 413
    assert not [w for w in seen if issubclass(w.category, Image.DecompressionBombWarning)]


def test_a_smaller_limit_is_honoured_by_every_entry_point(tmp_path: Path) -> None:
    data = encode(chelsea(), "PNG")  # 135,300 pixels
    with pytest.raises(ImageInputError) as e:
        decode_image(data, max_pixels=100_000)
    assert e.value.status == 413
    assert decode_image(data, max_pixels=135_300).size == (451, 300)


# --------------------------------------------------------------------------- EXIF


def test_malformed_exif_is_a_415_not_a_crash(tmp_path: Path) -> None:
    data = malformed_exif_jpeg(chelsea())
    with pytest.raises(ImageInputError) as e:
        decode_image(data)
    assert e.value.status == 415 and e.value.reason == "unreadable"
    (tmp_path / "bad_exif.jpg").write_bytes(data)
    with pytest.raises(ImageError):
        load_rgb(tmp_path / "bad_exif.jpg")


def test_exif_orientation_is_applied_also_when_draft_decoding() -> None:
    data = encode(chelsea().resize((1804, 1200)), "JPEG", quality=90, exif=rotated_exif())
    full, draft = open_image(data), open_image(data, target=128)
    assert full.size == (1200, 1804)
    assert draft.size == (600, 902)  # 1/2 scale keeps the shorter side >= 4 x 128, and it is upright


# --------------------------------------------------------------------------- JPEG draft


@pytest.fixture(scope="module")
def jpeg_24mp() -> bytes:
    """A 24 MP (6000 x 4000) phone-sized JPEG of a real photo."""
    return encode(Image.fromarray(skdata.astronaut()).resize((6000, 4000), Image.Resampling.BICUBIC), "JPEG",
                  quality=92)


def test_draft_decode_of_a_24mp_jpeg_is_small_and_faithful(jpeg_24mp: bytes) -> None:
    spec = PreprocessSpec.for_crop(224, 0.875)  # resize_size 256
    full = decode_image(jpeg_24mp)
    draft = decode_image(jpeg_24mp, target=spec.resize_size)
    assert full.size == (6000, 4000)
    assert draft.size == (3000, 2000)  # 1/2 scale: shorter side 2000 >= 4 x 256; 1/4 would be 1000
    diff = np.abs(preprocess(draft, spec) - preprocess(full, spec))
    assert float(diff.max()) < 0.03 and float(diff.mean()) < 0.005  # normalised units (~1 grey level max)


def test_draft_is_never_used_for_small_targets_on_small_photos() -> None:
    data = encode(chelsea(), "JPEG", quality=95)
    assert np.array_equal(np.asarray(open_image(data, target=256)), np.asarray(open_image(data)))


# --------------------------------------------------------------------------- data check and training


def _heic_class_folder(root: Path) -> Path:
    """Shapes dataset, 20 + 20 images, with 4 of the squares re-saved as iPhone-style .HEIC."""
    data = make_shapes_dataset(root, {"circle": 20, "square": 20}, size=48)
    for p in sorted((data / "square").iterdir())[:4]:
        Image.open(p).convert("RGB").save(p.with_suffix(".HEIC"), "HEIF", quality=95, exif=rotated_exif())
        p.unlink()
    return data


def test_data_check_counts_heic_and_lists_what_it_skips_and_why(tmp_path: Path) -> None:
    data = _heic_class_folder(tmp_path / "d")
    (data / "square" / "clip.gif").write_bytes(encode(chelsea(), "GIF"))
    (data / "square" / "notes.txt").write_text("where these came from")
    (data / "square" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # system clutter: not reported
    (data / "circle" / "huge.png").write_bytes(png_header(12_000, 9_000))  # 108 MP "hi-res mode"
    (data / "circle" / "broken.jpg").write_bytes(encode(chelsea(), "JPEG")[:400])
    (data / "circle" / "bad_exif.jpg").write_bytes(malformed_exif_jpeg(chelsea()))
    report = check_dataset(data, progress=False)
    assert report.counts == {"all": {"circle": 20, "square": 20}}  # the 4 HEIC files count
    skipped = {r["file"]: r["reason"] for r in report.skipped}
    assert skipped == {"circle/bad_exif.jpg": "unreadable", "circle/broken.jpg": "unreadable",
                       "circle/huge.png": "too large", "square/clip.gif": "unsupported format",
                       "square/notes.txt": "unsupported format"}
    assert list(skipped) == sorted(skipped)  # listing order
    assert all(r["detail"] and str(tmp_path) not in r["detail"] for r in report.skipped)
    assert not report.ok
    text = format_report(report)
    assert "skipped files (training will not use them): 5" in text
    assert "circle/huge.png: too large (image is 12000x9000 pixels (108 MP)" in text
    assert "square/clip.gif: unsupported format (.gif files are not read; accepted: JPEG" in text
    json.dumps(report.to_dict(), allow_nan=False)


def test_a_class_folder_with_heic_files_trains_on_them(tmp_path: Path) -> None:
    """The reported bug: 40 photos, 4 of them .HEIC, trained on 36. Now all 40 are used."""
    from fieldid.training import TrainConfig
    from fieldid.training.train import train

    data = _heic_class_folder(tmp_path / "d")
    assert sum(len(v) for v in scan_image_folder(data).splits["all"].values()) == 40
    rec = train(data, tmp_path / "run", TrainConfig(epochs=1, head_epochs=1, image_size=32, batch_size=16,
                                                    val_fraction=0.2, test_fraction=0.2))
    assert rec.status == "trained"
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    used = [rel for files in split["files"].values() for rel, _ in files]
    assert len(used) == 40 and sum(rel.endswith(".HEIC") for rel in used) == 4
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["training"]["skipped_unreadable"] == 0
