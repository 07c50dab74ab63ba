"""Small, fast, deterministic datasets for tests (real training steps, not mocks)."""
from __future__ import annotations

import io
import random
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps
from PIL.TiffImagePlugin import IFDRational

SHAPES = ("circle", "square", "triangle")


def _draw(kind: str, rng: np.random.Generator, size: int) -> Image.Image:
    bg = tuple(int(x) for x in rng.integers(0, 90, 3))
    img = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
    col = tuple(int(x) for x in rng.integers(150, 256, 3))
    if kind == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif kind == "square":
        d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
    noise = rng.normal(0, 8, (size, size, 3))
    arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def make_shapes_dataset(root: Path, counts: dict[str, int] | None = None, *, size: int = 72, seed: int = 0) -> Path:
    """Flat ImageFolder of coloured shapes: ``root/<shape>/<i>.png``. Learnable in a few steps."""
    counts = counts or {k: 24 for k in SHAPES}
    for ci, (kind, n) in enumerate(sorted(counts.items())):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([seed, ci, i])
            _draw(kind, rng, size).save(root / kind / f"{kind}_{i:03d}.png")
    return root


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width x height`` but holds almost no data: a decompression-bomb shape.

    Decoding it fails (no pixel data), so only a check on the header can refuse it as too large;
    it costs nothing to make at any size.
    """
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def malformed_exif_jpeg(photo: Image.Image) -> bytes:
    """A JPEG whose EXIF block makes Pillow's own ``exif_transpose`` raise.

    Found by flipping bytes of a real iPhone-like EXIF block (seeded search). Returned only when
    plain Pillow loads it and then fails in ``exif_transpose``, so a test using it cannot pass by
    testing nothing.
    """
    small = photo.resize((64, 43))
    exif = Image.Exif()
    exif[0x0112], exif[0x010F], exif[0x0110], exif[0x011A] = 6, "Apple", "iPhone 15", IFDRational(72, 1)
    ifd = exif.get_ifd(0x8769)
    ifd[0x9003], ifd[0x829A] = "2024:01:01 00:00:00", IFDRational(1, 100)
    buf = io.BytesIO()
    small.save(buf, "JPEG", exif=exif.tobytes())
    good = buf.getvalue()
    start = good.find(b"Exif\0\0") + 6
    end = start + int.from_bytes(good[start - 8:start - 6], "big") - 8
    rng = random.Random(0)
    for _ in range(20_000):
        d = bytearray(good)
        for _ in range(rng.randint(1, 6)):
            d[rng.randrange(start, end)] = rng.randrange(256)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                im = Image.open(io.BytesIO(bytes(d)))
                im.load()
            except Exception:  # noqa: BLE001 - we want one that *loads* but fails in exif_transpose
                continue
            try:
                ImageOps.exif_transpose(im)
            except Exception:  # noqa: BLE001
                return bytes(d)
    raise AssertionError("no malformed EXIF block found; Pillow may have become tolerant of all of them")


def shapes_photos(root: Path, per_class: int = 100, *, seed: int = 1) -> tuple[list[Path], np.ndarray]:
    """New photos of the shapes set's distribution (another seed than the training set's): an
    independent sample, large enough that a rate measured on it means something.

    Returns:
        The files (class by class, sorted) and their class indices (the order of ``SHAPES``).
    """
    make_shapes_dataset(root, {k: per_class for k in SHAPES}, seed=seed)
    paths = sorted(root.rglob("*.png"))
    return paths, np.asarray([SHAPES.index(p.parent.name) for p in paths], np.int64)


# An int8 file may change the top-1 answer only where fp32 itself was undecided: a top-2 margin below
# this fraction of the median margin. Which images those are is a property of the fp32 model, the same
# on every CPU; how int8 kernels round (AVX2, AVX-512, VNNI) decides only which of them move. Measured on
# tiny shape runs, answers that moved had margins up to 0.4 x the median; a broken quantization moves
# clear answers too.
NEAR_TIE_FRACTION = 0.5
# And few move at all: 3x the product's 1% bar, so a file that holds the bar (true rate <= 1%) passes
# on 300 images with probability 0.999 (binomial), while one that moves 6% fails.
MAX_MOVED_RATE = 0.03


def int8_flips(ref: np.ndarray, got: np.ndarray, *, near_tie: float = NEAR_TIE_FRACTION,
               max_moved: float = MAX_MOVED_RATE) -> dict:
    """Top-1 changes of ``got`` (an int8 artifact's logits) against ``ref`` (fp32) on the same images.

    Returns:
        ``{"images", "moved", "near_ties", "moved_clear", "median_margin", "moved_margins", "ok", "message"}``:
        ``ok`` when at most ``max_moved`` of the images moved and none whose fp32 margin is at least
        ``near_tie`` x the median margin; ``message`` says how many images decided it.
    """
    ref = np.asarray(ref, np.float32)
    got = np.asarray(got, np.float32).reshape(ref.shape)
    top2 = np.sort(ref, axis=1)[:, -2:]
    margin = top2[:, 1] - top2[:, 0]
    median = float(np.median(margin))
    near = margin < near_tie * median
    moved = got.argmax(1) != ref.argmax(1)
    clear_moved = int((moved & ~near).sum())
    out = {"images": int(len(ref)), "moved": int(moved.sum()), "near_ties": int(near.sum()), "moved_clear": clear_moved,
           "median_margin": median, "moved_margins": sorted(round(float(m), 3) for m in margin[moved])}
    out["ok"] = clear_moved == 0 and out["moved"] <= max_moved * out["images"]
    out["message"] = (f"{out['moved']} of {out['images']} images changed their top-1 answer (at most "
                      f"{max_moved:.0%} may), {clear_moved} of them clear of a near tie (fp32 margin >= {near_tie} x "
                      f"median {median:.2f}; {out['near_ties']} near ties); moved margins {out['moved_margins'][:10]}")
    return out
