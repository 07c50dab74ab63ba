"""The one image-intake policy of fieldid: which files are photos, how they are decoded, what is refused.

Training, ``fieldid data check``, export calibration, the TorchServe handler, the edge demo,
``fieldid predict`` and the app build all decode photos through :func:`open_image`, so a photo
that trains also serves, and one refused anywhere is refused everywhere with the same reason.

* Formats: JPEG, PNG, WebP, BMP, TIFF and HEIC/HEIF (iPhone photos, via ``pillow-heif``).
  GIF, camera RAW files and anything else are refused as "unsupported format".
* One pixel limit, :data:`MAX_PIXELS`, checked on the header before any pixel is decoded.
* EXIF orientation is applied (phones store portrait photos rotated) and the result is RGB.
  A malformed EXIF block fails like any other bad image (:class:`ImageInputError`, 415).
* With ``target=`` (the size the model will resize to), JPEGs decode at a reduced size with
  Pillow's draft mode: a 24 MP phone photo then decodes in a fraction of the time.

Torch-free and free of every other fieldid package, so any part can import it.
"""
from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

try:  # a hard dependency of fieldid; guarded so the other formats still work without it
    import pillow_heif

    # thumbnails=False: an iPhone HEIC carries a preview image we never use; skip decoding it.
    pillow_heif.register_heif_opener(thumbnails=False)
    _HEIF = ("HEIF",)
except ImportError:  # pragma: no cover - pillow-heif is in fieldid's dependencies
    _HEIF = ()

__all__ = [
    "ACCEPTED_FORMATS",
    "ACCEPTED_NAMES",
    "EXTENSIONS",
    "MAX_PIXELS",
    "DRAFT_MARGIN",
    "REASONS",
    "ImageInputError",
    "is_image_path",
    "open_image",
]

# Pillow format names accepted everywhere.
ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", *_HEIF)
# The accepted formats as a user reads them (Pillow calls HEIC "HEIF").
ACCEPTED_NAMES = ", ".join("HEIC" if f == "HEIF" else f for f in ACCEPTED_FORMATS)
# File name endings (lower case) that mark a photo in a dataset folder.
EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff",
                               *((".heic", ".heif", ".hif") if _HEIF else ()))
# One pixel limit for every part. 100 MP admits 48 MP (iPhone) and 50/64 MP (Android) photos
# with room to spare and refuses 108/200 MP "hi-res" modes, whose full RGB decode alone is
# 0.3-0.6 GB per request. It sits above Pillow's own 89.5 MP bomb warning, which open_image
# therefore silences: this limit, not Pillow's, is the one that applies.
MAX_PIXELS = 100_000_000
# Draft decoding keeps the shorter side >= DRAFT_MARGIN x the target, so the final bilinear resize
# still averages 4+ source pixels per output pixel: on a 24 MP JPEG the result differs from a full
# decode by about 1 grey level at margin 4, 2 at margin 2 and 9 at margin 1, for a decode time that
# shrinks accordingly (`fieldid bench intake` prints the table). The server and the demo use
# the same margin, so device and server answers on one photo stay identical.
DRAFT_MARGIN = 4
# ImageInputError.reason values, as `fieldid data check` lists them.
REASONS = ("empty", "unsupported format", "unreadable", "too large")


class ImageInputError(ValueError):
    """Bad image input.

    Attributes:
        status: the HTTP code a server answers with (400 empty, 413 too large, 415 not an
            accepted or decodable image).
        reason: one of :data:`REASONS`.
    """

    def __init__(self, message: str, status: int, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or {400: "empty", 413: "too large"}.get(status, "unreadable")


def is_image_path(path: str | Path) -> bool:
    """True for a visible file whose name ends in one of :data:`EXTENSIONS` (any case).

    Example:
        >>> is_image_path("IMG_0042.HEIC"), is_image_path("notes.txt"), is_image_path(".DS_Store")
        (True, False, False)
    """
    p = Path(path)
    return p.suffix.lower() in EXTENSIONS and not p.name.startswith(".")


def _identify(fp: IO[bytes]) -> str | None:
    """The format Pillow sees in ``fp`` when it is none of ours (header only, never decoded)."""
    fp.seek(0)
    try:
        with Image.open(fp) as other:
            return other.format
    except Exception:  # noqa: BLE001 - not an image at all
        return None


def _too_large(w: int, h: int, max_pixels: int, prefix: str) -> ImageInputError:
    return ImageInputError(f"{prefix}image is {w}x{h} pixels ({w * h / 1e6:.0f} MP); the limit is "
                           f"{max_pixels} ({max_pixels / 1e6:.0f} MP)", 413)


def _to_8_bit(im: Image.Image) -> Image.Image:
    """16-bit and float greyscale (PNG, TIFF: inspection and lab cameras) scaled to 8 bits, as a browser does.

    Pillow's ``convert("RGB")`` clips such values at 255 instead of scaling them, so a 16-bit
    frame came out almost white (and a float one in [0, 1] black). ``I;16*`` is 16-bit by
    definition; a 32-bit ``I`` image (how some Pillow versions open a 16-bit PNG) is taken as
    16-bit when a value exceeds 255; a float ``F`` image in [0, 1] is scaled by 255. Pillow only,
    one 32-bit copy: a 100-MP frame costs 400 MB, not numpy's int64 copies.
    """
    if im.mode == "F":
        lo, hi = im.getextrema()
        return im.point(lambda v: v * 255.0).convert("L") if 0.0 <= lo and hi <= 1.0 else im.convert("L")
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    wide = im if im.mode == "I" else im.convert("I")
    if im.mode == "I" and wide.getextrema()[1] <= 255:
        return wide.convert("L")
    return wide.point(lambda v: v * (1.0 / 256.0)).convert("L")


def _decode(fp: IO[bytes], *, target: int | None, max_pixels: int, prefix: str,
            margin: int = DRAFT_MARGIN) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow warns from 89.5 MP (and raises from 179 MP); our own limit below decides.
        # Corrupt-EXIF UserWarnings are about input we either decode or refuse: not noise for users.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        try:
            im = Image.open(fp, formats=list(ACCEPTED_FORMATS))
        except Image.DecompressionBombError as e:
            # Pillow's message carries the real size: "Image size (N pixels) exceeds limit of ...".
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)) / 1e6:.0f} MP" if found else \
                f"more than {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP"
            raise ImageInputError(f"{prefix}image has {size}; the limit is {max_pixels / 1e6:.0f} MP", 413) from None
        except UnidentifiedImageError:
            other = _identify(fp)
            if other:
                raise ImageInputError(f"{prefix}unsupported format {other} (accepted: {ACCEPTED_NAMES})", 415,
                                      "unsupported format") from None
            raise ImageInputError(f"{prefix}not a decodable image (accepted: {ACCEPTED_NAMES})", 415) from None
        except Exception as e:  # noqa: BLE001 - a plugin choking on a broken header
            raise ImageInputError(f"{prefix}not a decodable image: {type(e).__name__}: {e}", 415) from None
        with im:
            w, h = im.size
            if w * h > max_pixels:
                raise _too_large(w, h, max_pixels, prefix)
            try:
                if target and im.format == "JPEG":
                    side = int(target) * margin
                    im.draft("RGB", (side, side))  # DCT scaling 1/2..1/8; both sides stay >= side
                im.load()
                # Inside the try: a malformed EXIF block raises here (struct.error, TypeError, ...).
                out = _to_8_bit(ImageOps.exif_transpose(im))
                return out.convert("RGB") if out.mode != "RGB" or out is im else out
            except ImageInputError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated data, bad EXIF, decoder errors
                raise ImageInputError(f"{prefix}not a decodable image: {type(e).__name__}: {e}", 415) from None


def open_image(source: bytes | bytearray | memoryview | str | Path, *, target: int | None = None,
               max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode a photo (bytes or a file path) to an RGB image with EXIF orientation applied.

    Args:
        source: the encoded bytes (an upload, a request body) or a file's path.
        target: the shorter side the caller will resize to; a JPEG then decodes at reduced
            size (at least ``DRAFT_MARGIN * target`` on its shorter side). None = full size.
        max_pixels: pixel limit, checked before decoding.

    Returns:
        A loaded RGB :class:`PIL.Image.Image` (independent of any open file).

    Raises:
        ImageInputError: status 400 empty input; 413 more than ``max_pixels`` pixels; 415 an
            unsupported format or undecodable data (incl. a malformed EXIF block). Messages
            for a path start with ``"<path>: "``. OSError when the file itself cannot be read.

    Example:
        >>> open_image(b"GIF89a...")
        Traceback (most recent call last):
        ...
        fieldid.intake.ImageInputError: not a decodable image (accepted: JPEG, PNG, WEBP, BMP, TIFF, HEIC)
    """
    if isinstance(source, (str, Path)):
        data = Path(source).read_bytes()  # OSError (missing, permissions) is the caller's to report
        prefix = f"{source}: "
        if not data:
            raise ImageInputError(f"{prefix}empty file", 400)
    else:
        data, prefix = bytes(source), ""
        if not data:
            raise ImageInputError(f"empty image: send a {ACCEPTED_NAMES} file", 400)
    return _decode(io.BytesIO(data), target=target, max_pixels=max_pixels, prefix=prefix)


def bench_decode(*, target: int = 256, repeat: int = 7) -> int:
    """``fieldid bench intake``: decode time of a 24 MP JPEG made from a scikit-image photo (6000x4000,
    quality 92), full vs draft (a table): ``repeat`` timed decodes per row (median shown), resized to
    ``target`` px on the shorter side."""
    import time

    import numpy as np
    from skimage import data as skdata

    rng = np.random.default_rng(0)
    photo = Image.fromarray(skdata.astronaut()).resize((6000, 4000), Image.Resampling.BICUBIC)
    # Sensor-like noise, so the file has a phone photo's entropy (and size), not a smooth upscale's.
    noisy = np.clip(np.asarray(photo, np.int16) + rng.normal(0, 6, (4000, 6000, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, "JPEG", quality=92)
    data = buf.getvalue()

    def small(im: Image.Image) -> np.ndarray:  # what the model sees: shorter side -> target
        w, h = im.size
        s = target / min(w, h)
        return np.asarray(im.resize((round(w * s), round(h * s)), Image.Resampling.BILINEAR), np.float32)

    rows, ref = [], None
    cases = (("full decode", None, 1), (f"draft, margin {DRAFT_MARGIN} (default)", target, DRAFT_MARGIN),
             ("draft, margin 2", target, 2), ("draft, margin 1", target, 1))
    for name, tgt, margin in cases:
        decode_ms, total_ms = [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            im = _decode(io.BytesIO(data), target=tgt, max_pixels=MAX_PIXELS, prefix="", margin=margin)
            t1 = time.perf_counter()
            arr = small(im)
            decode_ms.append((t1 - t0) * 1e3)
            total_ms.append((time.perf_counter() - t0) * 1e3)
        ref = arr if ref is None else ref
        rows.append((name, f"{im.width}x{im.height}", f"{np.median(decode_ms):.0f}", f"{np.median(total_ms):.0f}",
                     f"{np.abs(arr - ref).max():.0f}", f"{np.abs(arr - ref).mean():.2f}"))
    print(f"24 MP JPEG, {len(data) / 1e6:.1f} MB, median of {repeat}")
    header = ("decode", "decoded size", "decode ms", "decode+resize ms", "max |diff| vs full (0-255)", "mean |diff|")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for r in (header, tuple("-" * w for w in widths), *rows):
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0
