"""Real-photo benchmark sets, built from images that installed packages ship (no download).

Each builder writes a pre-split ImageFolder ``<root>/<name>/{train,test}/<class>/*.png`` once
(a ``.complete`` marker makes the next call free): ``fieldid train`` takes its val photos out of
``train/`` and the baselines of ``fieldid bench real`` use the same split. What each set stands for:

============  ===========================================================  =============================
set           what                                                          user case it stands for
============  ===========================================================  =============================
elpv          2,624 electroluminescence photos of solar cells, 300 px grey,  inspection grades: ordinal,
              4 defect grades (0, 1/3, 2/3, 1), largest class 14x the        imbalanced >= 10x, greyscale,
              smallest; stratified 75/25 split as in the published work      larger than 224 px, small
              (Deitsch et al., 2019; ``elpv-dataset`` on PyPI, data          detail (cracks)
              CC BY-NC-SA 4.0: benchmark use only, never redistributed)
elpv_few      the same grades with 16 training photos per grade (the same    a user who hand-labelled a few
              test photos as ``elpv``)                                       photos per class (<= 20)
digits        scikit-learn's 1,797 handwritten digit scans (8x8, 16 grey     greyscale, tiny photos
              levels), 10 classes, 75/25
faces         scikit-image's LFW subset: 100 face crops, 100 non-face        small binary set, 25 px grey
              patches, 70/30
textures      crops of four texture photos of scikit-image (brick, grass,    imbalanced 12x, in a second
              gravel, moon), imbalanced 96/48/24/8 train crops, test in the  domain; test follows the
              same proportion from the unseen bottom 30 % of each photo      photos' own distribution
scenes        22 classes, one per real photo that scikit-image, scikit-learn many classes (>= 20), few photos
              and matplotlib ship (astronaut, coffee, retina, hubble, ...):  per class (10 train, 5 test),
              which photo does a crop come from; train crops from the top    fine-grained texture/colour
              70 % of each photo, test crops from the bottom 30 %
============  ===========================================================  =============================
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Collection

import numpy as np

from fieldid.cli_common import UsageError, require_extra

__all__ = ["REAL_SETS", "build_real_set", "build_real_sets", "link_files", "check_set_names", "RealSetError"]


class RealSetError(UsageError):
    """A benchmark set whose source package is not installed (the message names the install)."""


def _save(img: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _stratified(targets: list[int], test_fraction: float, seed: int) -> np.ndarray:
    """A boolean test mask with ``test_fraction`` of every class (seeded)."""
    rng = np.random.default_rng(seed)
    targets_arr = np.asarray(targets)
    test = np.zeros(len(targets_arr), dtype=bool)
    for c in np.unique(targets_arr):
        idx = rng.permutation(np.flatnonzero(targets_arr == c))
        test[idx[:int(round(len(idx) * test_fraction))]] = True
    return test


ELPV_GRADES = ("0_functional", "1_possibly_defective", "2_likely_defective", "3_defective")


def _elpv_rows() -> list[tuple[Path, int]]:
    try:
        import elpv_dataset
    except ImportError:
        raise RealSetError("the elpv sets need the elpv-dataset package: "
                           "pip install --no-deps elpv-dataset==1.0.0.post1 (make bench-real installs it)") from None
    folder = Path(elpv_dataset.__file__).parent / "data"
    rows = []
    for line in (folder / "labels.csv").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2:
            # Grades are the experts' defect probabilities 0, 1/3, 2/3, 1.
            rows.append((folder / parts[0], int(round(float(parts[1]) * 3))))
    return rows


def _elpv(out: Path, *, train_per_class: int | None = None, seed: int = 0) -> None:
    rows = _elpv_rows()
    test = _stratified([y for _, y in rows], 0.25, seed)
    rng = np.random.default_rng(seed + 1)
    keep_train = set(range(len(rows)))
    if train_per_class is not None:
        keep_train = set()
        for c in range(len(ELPV_GRADES)):
            idx = [i for i, (_, y) in enumerate(rows) if y == c and not test[i]]
            keep_train.update(rng.permutation(idx)[:train_per_class].tolist())
    for i, (src, y) in enumerate(rows):
        part = "test" if test[i] else "train"
        if part == "train" and i not in keep_train:
            continue
        dst = out / part / ELPV_GRADES[y] / src.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


def _digits(out: Path, seed: int = 0) -> None:
    from PIL import Image

    d = require_extra("sklearn.datasets", "bench", "the digits set of fieldid bench real").load_digits()
    test = _stratified(list(d.target), 0.25, seed)
    for i, (img, y) in enumerate(zip(d.images, d.target)):
        arr = (255 - img * (255 / 16)).astype(np.uint8)  # dark ink on paper, as scanned
        big = np.asarray(Image.fromarray(arr).resize((32, 32), Image.Resampling.BILINEAR))
        _save(big, out / ("test" if test[i] else "train") / str(y) / f"{y}_{i:04d}.png")


def _faces(out: Path, seed: int = 0) -> None:
    data = require_extra("skimage.data", "bench", "the faces set of fieldid bench real")
    imgs = data.lfw_subset()
    targets = [0] * 100 + [1] * 100
    test = _stratified(targets, 0.3, seed)
    for i, img in enumerate(imgs):
        cls = ("face", "not_face")[targets[i]]
        _save((img * 255).astype(np.uint8), out / ("test" if test[i] else "train") / cls / f"{cls}_{i:03d}.png")


def _crops(photo: np.ndarray, rows: tuple[int, int], count: int, rng: np.random.Generator, *,
           size: int, side_range: tuple[int, int]) -> list[np.ndarray]:
    """``count`` random square crops (side in ``side_range``) between image rows ``rows``, resized."""
    from PIL import Image

    h, w = photo.shape[:2]
    lo, hi = rows
    crops = []
    for _ in range(count):
        side = int(rng.integers(side_range[0], min(side_range[1], hi - lo, w) + 1))
        y0 = int(rng.integers(lo, hi - side + 1))
        x0 = int(rng.integers(0, w - side + 1))
        img = Image.fromarray(photo[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.Resampling.BILINEAR)
        crops.append(np.asarray(img))
    return crops


def _split_crops(out: Path, photos: dict[str, np.ndarray], counts: dict[str, tuple[int, int]], *, size: int,
                 side_fraction: tuple[float, float], seed: int) -> None:
    """Train crops from the top 70 % of each photo, test crops from the rest: no test pixel is seen in training."""
    rng = np.random.default_rng(seed)
    for cls, photo in photos.items():
        if photo.dtype != np.uint8:
            photo = (np.clip(photo, 0, 1) * 255).astype(np.uint8) if photo.max() <= 1 else photo.astype(np.uint8)
        if photo.ndim == 3 and photo.shape[2] == 4:
            photo = photo[..., :3]
        h = photo.shape[0]
        cut = int(h * 0.7)
        short = min(photo.shape[:2])
        side = (max(16, int(short * side_fraction[0])), max(24, int(short * side_fraction[1])))
        for part, n, rows in (("train", counts[cls][0], (0, cut)), ("test", counts[cls][1], (cut, h))):
            for i, crop in enumerate(_crops(photo, rows, n, rng, size=size, side_range=side)):
                _save(crop, out / part / cls / f"{cls}_{i:03d}.png")


def _textures(out: Path, seed: int = 0) -> None:
    data = require_extra("skimage.data", "bench", "the textures set of fieldid bench real")
    photos = {name: getattr(data, name)() for name in ("brick", "grass", "gravel", "moon")}
    counts = {"brick": (96, 24), "grass": (48, 12), "gravel": (24, 6), "moon": (8, 2)}
    _split_crops(out, photos, counts, size=64, side_fraction=(0.1, 0.25), seed=seed)


def _scene_photos() -> dict[str, np.ndarray]:
    from matplotlib import cbook
    from PIL import Image

    data = require_extra("skimage.data", "bench", "the scenes set of fieldid bench real")
    load_sample_images = require_extra("sklearn.datasets", "bench", "the scenes set of fieldid bench real").load_sample_images

    names = ("astronaut", "camera", "chelsea", "coffee", "rocket", "retina", "hubble_deep_field", "moon", "coins",
             "page", "immunohistochemistry", "cell", "microaneurysms", "motorcycle_left", "clock", "brick", "grass",
             "gravel", "text")
    photos: dict[str, np.ndarray] = {}
    for name in names:
        fn = getattr(data, name, None)
        if fn is None:
            continue
        img = fn()
        photos[name[:-5] if name.endswith("_left") else name] = img[0] if isinstance(img, tuple) else img
    with cbook.get_sample_data("grace_hopper.jpg") as fh:
        photos["grace_hopper"] = np.asarray(Image.open(fh).convert("RGB"))
    samples = load_sample_images()
    for fname, img in zip(samples.filenames, samples.images):
        photos[Path(fname).stem] = img
    return photos


def _scenes(out: Path, seed: int = 0) -> None:
    photos = _scene_photos()
    _split_crops(out, photos, {k: (10, 5) for k in photos}, size=96, side_fraction=(0.15, 0.3), seed=seed)


REAL_SETS: dict[str, Callable[[Path], None]] = {
    "elpv": _elpv,
    "elpv_few": lambda out: _elpv(out, train_per_class=16),
    "digits": _digits,
    "faces": _faces,
    "textures": _textures,
    "scenes": _scenes,
}


def check_set_names(names: tuple[str, ...], valid: Collection[str]) -> None:
    """A benchmark's ``--sets``: names not in ``valid`` are one line naming the valid ones (a UsageError,
    which the benchmarks' commands turn into exit 2)."""
    if not names:
        raise UsageError(f"--sets names no set; valid: {', '.join(valid)}")
    bad = [n for n in names if n not in valid]
    if bad:
        raise UsageError(f"unknown set(s) {', '.join(bad)}; valid: {', '.join(valid)}")


def link_files(files: dict[Path, Path]) -> None:
    """Hard-link (or copy, keeping mtimes) each ``src -> dst``: a benchmark's copy of a set costs no disk,
    and a feature cache keyed on size and mtime stays valid."""
    for src, dst in files.items():
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)


def build_real_set(name: str, root: str | Path) -> Path:
    """Build (once) real benchmark set ``name`` under ``root``; returns its folder.

    Example:
        >>> build_real_set("faces", "runs/bench-real/data")  # doctest: +SKIP
        PosixPath('runs/bench-real/data/faces')
    """
    if name not in REAL_SETS:
        raise ValueError(f"unknown real set {name!r}; valid: {', '.join(REAL_SETS)}")
    folder = Path(root) / name
    if not (folder / ".complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        REAL_SETS[name](folder)
        (folder / ".complete").touch()
    return folder


def build_real_sets(root: str | Path, names: tuple[str, ...] = tuple(REAL_SETS)) -> dict[str, Path]:
    """Every set of ``names`` under ``root`` (name -> folder)."""
    return {name: build_real_set(name, root) for name in names}


def class_counts(folder: Path, part: str) -> dict[str, int]:
    """Photos per class in ``folder/part`` (for the benchmark table)."""
    return {d.name: sum(1 for f in d.iterdir() if f.is_file()) for d in sorted((folder / part).iterdir()) if d.is_dir()}

