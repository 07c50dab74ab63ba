"""What a run keeps so it can be exported and benchmarked without its dataset.

At the end of training, :func:`write_samples` stores, under ``RUN/samples/``, the images export
and bench read, already decoded and center-cropped the eval way (uint8, ``(N, crop, crop, 3)``,
one ``.npy`` per group) plus ``samples.json`` listing where each row came from:

* ``heldout``: the held-out split export verifies on and bench measures (test, else val), at
  most :data:`MAX_HELDOUT` images (a seeded, class-stratified pick when the split is larger);
* ``calibration``: :data:`CALIBRATION_POOL` training images in a seeded random order; export
  calibrates int8 on the first ``--calibration-size`` of them;
* ``selection``: the images int8 recipes are chosen on (val when the held-out split is test,
  else training images not in the calibration pool), never the held-out ones.

Everything is bounded: at 224 px the three groups hold at most about
``(500 + 400 + 200) * 150 KB = 165 MB``. The crop is what the phone preprocessing produces
before it scales and normalises (resize shorter side, center crop), so the stored pixels give
export the same input as decoding the original file would.
"""
from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from torchvision import transforms as T

from .data import ImageCache, Split
from .records import PreprocessSpec, atomic_write_json

__all__ = ["SAMPLES_DIR", "SAMPLES_FILE", "SAMPLES_SCHEMA_VERSION", "MAX_HELDOUT", "CALIBRATION_POOL",
           "SELECTION_POOL", "write_samples", "calibration_order"]

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
SAMPLES_FILE = "samples.json"
SAMPLES_SCHEMA_VERSION = 1
MAX_HELDOUT = 500
CALIBRATION_POOL = 400  # twice export's default --calibration-size (200): room for more without the dataset
SELECTION_POOL = 200


def calibration_order(num_train: int, seed: int = 0) -> list[int]:
    """The seeded order in which export takes training images for int8 calibration.

    Export uses the same order when it reads the dataset itself (``--data``), so a run's
    stored sample and a re-read of its photos calibrate on the same images.
    """
    return [int(i) for i in np.random.default_rng(seed).permutation(num_train)]


def _stratified(targets: Sequence[int], k: int, seed: int = 0) -> list[int]:
    """``k`` indices spread over the classes in proportion (all of them when there are <= k)."""
    n = len(targets)
    if n <= k:
        return list(range(n))
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    # Round-robin over classes in a seeded order keeps every class's share.
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(int(targets[i]), []).append(int(i))
    picked: list[int] = []
    while len(picked) < k:
        for c in sorted(by_class):
            if by_class[c] and len(picked) < k:
                picked.append(by_class[c].pop())
    return sorted(picked)


def _crop(cache: ImageCache, i: int, crop: int) -> np.ndarray:
    # The cache already holds the eval pipeline's first step (shorter side resized); this is its second.
    return np.asarray(T.CenterCrop(crop)(cache.image(i)), dtype=np.uint8)


def _save_npy(path: Path, arr: np.ndarray) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            np.save(fh, arr)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _group(cache: ImageCache, rows: list[int], crop: int, relroot: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    arr = np.zeros((len(rows), crop, crop, 3), np.uint8)
    files = []
    for j, i in enumerate(rows):
        arr[j] = _crop(cache, i, crop)
        p = Path(cache.paths[i])
        try:
            rel = p.resolve().relative_to(relroot).as_posix()
        except ValueError:
            rel = p.name
        files.append({"file": rel, "target": int(cache.targets[i])})
    return arr, files


def write_samples(out: str | Path, split: Split, spec: PreprocessSpec, caches: dict[str, ImageCache]) -> str:
    """Store the run's bounded calibration / selection / held-out samples under ``RUN/samples/``.

    Args:
        out: the run directory.
        split: the run's split (for the dataset root the file names are relative to).
        spec: the run's preprocessing (crop size).
        caches: training's decoded images per split (``train``, ``val``, ``test``).

    Returns:
        ``samples/samples.json``, relative to the run (what ``run.json``'s ``extra["samples"]`` holds).

    Example:
        >>> record.extra["samples"] = write_samples(out, split, spec, datasets)  # doctest: +SKIP
    """
    caches = {k: getattr(v, "cache", v) for k, v in caches.items()}  # datasets wrap their ImageCache
    folder = Path(out) / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    crop = spec.crop_size
    train = caches["train"]
    held_name = "test" if len(caches.get("test", ())) else "val"
    held = caches[held_name]
    order = calibration_order(len(train))
    groups: dict[str, tuple[ImageCache, list[int], str]] = {
        "heldout": (held, _stratified(held.targets, MAX_HELDOUT), f"{held_name} split"),
        "calibration": (train, order[:CALIBRATION_POOL], "training split, seeded order"),
    }
    if held_name == "test" and len(caches.get("val", ())):
        groups["selection"] = (caches["val"], list(range(min(SELECTION_POOL, len(caches["val"])))), "val split")
    else:
        rest = sorted(order[CALIBRATION_POOL:CALIBRATION_POOL + SELECTION_POOL])
        groups["selection"] = (train, rest, "training images not in the calibration pool")
    index: dict[str, Any] = {"schema_version": SAMPLES_SCHEMA_VERSION, "layout": "NHWC uint8 RGB, center-cropped",
                             "crop_size": crop, "resize_size": spec.resize_size, "dataset_root": split.root,
                             "groups": {}}
    for name, (cache, rows, source) in groups.items():
        arr, files = _group(cache, rows, crop, split.root)
        _save_npy(folder / f"{name}.npy", arr)
        index["groups"][name] = {"array": f"{name}.npy", "source": source, "count": len(files),
                                 "of": len(cache), "files": files}
    atomic_write_json(folder / SAMPLES_FILE, index)
    mb = sum((folder / f"{n}.npy").stat().st_size for n in groups) / 1e6
    log.info("run samples: %s (%.0f MB) so export and bench need not read the dataset", ", ".join(
        f"{n} {index['groups'][n]['count']}" for n in groups), mb)
    return f"{SAMPLES_DIR}/{SAMPLES_FILE}"
