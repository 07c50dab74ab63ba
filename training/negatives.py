"""Generated "not a photo of anything we know" images: gradients, noise, stripes, flat colour.

They are what a phone camera pointed at a wall, a lens cap or a screen produces, and what the
unknown detector must flag. Used to probe the detector in export verification, to build the
``fieldid bench --ood`` folder and as the demo's "not a fish" examples. Torch-free (numpy +
Pillow) and deterministic: image ``i`` comes from ``np.random.default_rng([seed, i])``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from fieldid.cli_common import UsageError, not_a_folder, require_extra

from .records import atomic_write_bytes

__all__ = ["NEGATIVE_KINDS", "SKIMAGE_PHOTOS", "generated_unknown", "generated_unknowns", "write_generated_unknowns",
           "make_ood_set"]

NEGATIVE_KINDS = ("gradient", "radial", "noise", "clouds", "stripes", "flat")


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, 3).astype(np.float32)


def generated_unknown(kind: str, rng: np.random.Generator, size: int = 192) -> Image.Image:
    """One generated image of ``kind`` (one of :data:`NEGATIVE_KINDS`).

    Example:
        >>> generated_unknown("gradient", np.random.default_rng(0), 32).size
        (32, 32)
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    if kind == "gradient":
        a = rng.uniform(0, 2 * np.pi)
        t = (np.cos(a) * xx + np.sin(a) * yy)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
        arr = _colour(rng) * (1 - t[..., None]) + _colour(rng) * t[..., None]
    elif kind == "radial":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        t = np.clip(np.hypot(xx - cx, yy - cy) / rng.uniform(0.4, 1.0), 0, 1)
        arr = _colour(rng) * (1 - t[..., None]) + _colour(rng) * t[..., None]
    elif kind == "noise":
        arr = rng.uniform(0, 1, (size, size, 3)).astype(np.float32)
        if rng.uniform() < 0.5:
            arr = np.repeat(arr.mean(2, keepdims=True), 3, axis=2)
    elif kind == "clouds":
        cells = int(rng.integers(3, 9))
        small = rng.uniform(0, 1, (cells, cells, 3)).astype(np.float32)
        img = Image.fromarray((small * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC)
        return img.filter(ImageFilter.GaussianBlur(size / 40))
    elif kind == "stripes":
        a = rng.uniform(0, np.pi)
        period = rng.uniform(0.05, 0.3)
        t = (np.sin((np.cos(a) * xx + np.sin(a) * yy) * 2 * np.pi / period) > 0).astype(np.float32)
        arr = _colour(rng) * (1 - t[..., None]) + _colour(rng) * t[..., None]
    elif kind == "flat":
        arr = np.broadcast_to(_colour(rng), (size, size, 3)) + rng.normal(0, 0.02, (size, size, 3))
    else:
        raise UsageError(f"unknown kind {kind!r}; valid: {', '.join(NEGATIVE_KINDS)}")
    return Image.fromarray((np.clip(arr, 0, 1) * 255).round().astype(np.uint8), "RGB")


def generated_unknowns(n: int, *, size: int = 192, seed: int = 0) -> list[tuple[str, Image.Image]]:
    """``n`` generated images, cycling through :data:`NEGATIVE_KINDS`: ``[(name, image), ...]``."""
    out = []
    for i in range(n):
        kind = NEGATIVE_KINDS[i % len(NEGATIVE_KINDS)]
        out.append((f"{kind}_{i:03d}", generated_unknown(kind, np.random.default_rng([seed, i]), size)))
    return out


def write_generated_unknowns(out: str | Path, n: int, *, size: int = 192, seed: int = 0) -> list[Path]:
    """Write :func:`generated_unknowns` as PNG files into ``out`` (atomically); returns the paths."""
    import io

    out = Path(out)
    paths = []
    for name, img in generated_unknowns(n, size=size, seed=seed):
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        paths.append(atomic_write_bytes(out / f"{name}.png", buf.getvalue()))
    return paths


# scikit-image's bundled photos that are neither fish nor fillets, only those shipped in the wheel
# (eagle, for one, is fetched from the network on first use: offline that is a failed download).
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
                  "gravel", "horse", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina", "rocket", "text")


def _skimage_photos() -> list[tuple[str, Image.Image]]:
    skimage_data = require_extra("skimage.data", "bench", "`fieldid data ood` (its photos of other things)")

    out = []
    for name in SKIMAGE_PHOTOS:
        try:
            arr = np.asarray(getattr(skimage_data, name)())
        except Exception:  # noqa: BLE001 - a photo a given scikit-image version lacks or cannot open
            continue
        if arr.dtype != np.uint8:
            arr = (np.clip(arr.astype(np.float64) / max(1e-9, float(arr.max())), 0, 1) * 255).astype(np.uint8)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[..., :3]
        out.append((name, Image.fromarray(arr).convert("RGB")))
    return out


def _distinct_names(folders: list[Path]) -> list[str]:
    """A sub-folder name per folder: its own name, or as many of its parents as make it unique
    (``faces/test`` and ``scenes/test`` become ``faces-test`` and ``scenes-test``; copied under one
    name, the second folder's files would land among -- or over -- the first one's)."""
    parts = [f.resolve().parts[1:] for f in folders]  # without the anchor ("/"): a name, not a path
    depth = [1] * len(folders)
    while True:
        names = ["-".join(p[-d:]) or "root" for p, d in zip(parts, depth)]
        clash = [i for i, n in enumerate(names) if names.count(n) > 1 and depth[i] < len(parts[i])]
        if not clash:
            break
        for i in clash:
            depth[i] += 1
    seen: dict[str, int] = {}
    out = []
    for n in names:  # the same folder given twice: numbered
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}-{seen[n]}")
    return out


# What ``data ood`` writes: a folder holding anything else is a user's, not ours to write into.
OOD_PARTS = ("other", "unseen")
MAX_GENERATED = 10_000


def _ood_out(out: Path) -> None:
    """Refuse an output that is a file, or a non-empty folder holding more than ``other/`` and ``unseen/``
    (hidden files such as Finder's ``.DS_Store`` do not count)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: is a file; give a new or empty folder, or one `fieldid data ood` made")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir()
                         if not p.name.startswith(".") and (p.name not in OOD_PARTS or not p.is_dir()))
        if foreign:
            raise UsageError(f"{out}: not empty and not a folder `fieldid data ood` made (it holds "
                             f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); give a new or empty folder")


def _pick_readable(folder: Path, most: int, rng: np.random.Generator) -> tuple[list[Path], int]:
    """Up to ``most`` photos under ``folder`` that the phone's intake decodes (in name order), and how
    many photo files it tried and skipped. Only the photos picked are decoded (a folder of 50,000 costs
    ``most`` decodes, not 50,000): a seeded sample, topped up from the rest in a seeded order when
    some of it does not decode."""
    from fieldid.intake import ImageInputError, is_image_path, open_image

    files = sorted(p for p in folder.rglob("*") if is_image_path(p) and p.is_file())
    kept: list[int] = []
    skipped = 0

    def take(order: list[int]) -> None:
        nonlocal skipped
        for i in order:
            if len(kept) == most:
                return
            try:
                open_image(files[i], target=64)
            except (ImageInputError, OSError):
                skipped += 1
                continue
            kept.append(i)

    if len(files) <= most:
        take(list(range(len(files))))
    else:
        first = [int(i) for i in sorted(rng.choice(len(files), most, replace=False))]
        take(first)
        if len(kept) < most:  # drawn only then: the seeded sample of a readable folder stays the one it was
            tried = set(first)
            take([int(i) for i in rng.permutation(len(files)) if int(i) not in tried])
    return [files[i] for i in sorted(kept)], skipped


def make_ood_set(out: str | Path, *, unseen: list[str | Path] = (), other: list[str | Path] = (),
                 generated: int = 120, per_folder: int = 200, seed: int = 0, skimage: bool = True) -> dict[str, int]:
    """Write the ``fieldid bench --ood`` folder: ``OUT/other/`` and ``OUT/unseen/``.

    Every argument is checked before anything is written. Only photos the phone's intake decodes
    are copied (any format it accepts, HEIC included); the others tried are counted in ``skipped``.

    Args:
        out: output folder: new, empty, or one made by this function (files are written
            atomically, existing ones replaced).
        unseen: folders of classes of the same kind the model was *not* trained on
            (copied to ``unseen/<folder name>/``).
        other: folders of other datasets (copied to ``other/<folder name>/``, at most ``per_folder`` each).
        generated: generated gradients / noise / stripes images (``other/generated/``), 0 to
            :data:`MAX_GENERATED`.
        per_folder: most images copied from one ``--other`` / ``--unseen`` folder.
        seed: seed of the generated images and of the subsampling.
        skimage: also scikit-image's bundled photos (``other/skimage/``); off for a model trained on
            crops of them.

    Returns:
        Image counts per sub-folder, and ``skipped`` (files with a photo's name that did not decode).

    Raises:
        UsageError: a bad count, an output that is a file or someone else's folder, a named folder
            that does not exist or holds no readable photo.
    """
    import io

    out = Path(out)
    if isinstance(generated, bool) or not isinstance(generated, (int, np.integer)) or not 0 <= generated <= MAX_GENERATED:
        raise UsageError(f"--generated must be an integer in [0, {MAX_GENERATED}], got {generated!r}")
    if isinstance(per_folder, bool) or not isinstance(per_folder, (int, np.integer)) or per_folder < 1:
        raise UsageError(f"per_folder must be a positive integer, got {per_folder!r}")
    _ood_out(out)
    rng = np.random.default_rng(seed)
    chosen: list[tuple[str, str, Path, list[Path]]] = []
    skipped = 0
    for group, folders in (("other", other), ("unseen", unseen)):
        names = _distinct_names([Path(f) for f in folders])
        for folder, name in zip(folders, names):
            folder = Path(folder)
            files, bad = _pick_readable(folder, int(per_folder), rng) if folder.is_dir() else ([], 0)
            if not files:
                why = not_a_folder(folder) if not folder.is_dir() else (
                    f"none of its {bad} photo file(s) decodes" if bad else "no photos in it")
                raise UsageError(f"--{group} {folder}: {why}")
            skipped += bad
            chosen.append((group, name, folder, files))
    counts: dict[str, int] = {}
    photos = _skimage_photos() if skimage else []
    for name, img in photos:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        atomic_write_bytes(out / "other" / "skimage" / f"{name}.png", buf.getvalue())
    if skimage:
        counts["other/skimage"] = len(photos)
    counts["other/generated"] = len(write_generated_unknowns(out / "other" / "generated", int(generated), seed=seed))
    for group, name, folder, files in chosen:
        for p in files:
            atomic_write_bytes(out / group / name / p.relative_to(folder), p.read_bytes())
        counts[f"{group}/{name}"] = len(files)
    counts["skipped"] = skipped
    return counts
