"""The images export verifies, calibrates and chooses int8 recipes on — from the run, or from a folder.

A run written by ``fieldid train`` keeps bounded samples of them under ``RUN/samples/``
(``fieldid.training.samples``): export and bench read those, so a run moved to another machine
without its photos still exports. ``--data DIR`` (or an older run without samples) reads the
photos instead, through the phone preprocessing.

Calibration and selection images are :class:`PhoneImages`: uint8 rows in a file, read and
normalised one batch at a time, so memory does not grow with ``--calibration-size``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np

from fieldid.cli_common import first_line
from fieldid.training.images import ImageError, load_rgb
from fieldid.training.records import PreprocessSpec, RunRecord, confined_path

from .phone import center_crop, normalize
from .registry import ExportError

__all__ = ["PhoneImages", "ExportInputs", "load_arrays", "load_pixels", "run_inputs", "folder_inputs",
           "samples_index", "heldout_from_run"]

log = logging.getLogger("fieldid.export")


class PhoneImages:
    """``N`` images as uint8 ``(crop, crop, 3)`` rows in a file; indexing gives phone-preprocessed float32.

    ``x[i:j]`` / ``x[[i, k]]`` -> ``(n, 3, crop, crop)`` float32, exactly what
    :func:`fieldid.export.phone.preprocess` gives for the same photo. Rows are read with plain
    file reads (not a memory map), so only the batch being used is resident.

    Example:
        >>> imgs = PhoneImages.from_array(pixels, spec)  # doctest: +SKIP
        >>> next(imgs.batches(8)).shape  # doctest: +SKIP
        (8, 3, 224, 224)
    """

    def __init__(self, path: Path, offset: int, count: int, spec: PreprocessSpec, *, owned: bool = False) -> None:
        self.path, self.offset, self.count, self.spec, self._owned = Path(path), offset, count, spec, owned
        c = spec.crop_size
        self.row_shape = (c, c, 3)
        self.row_bytes = c * c * 3

    @classmethod
    def from_npy(cls, path: Path, spec: PreprocessSpec, limit: int | None = None) -> "PhoneImages":
        """Rows of a ``(N, crop, crop, 3)`` uint8 ``.npy`` file (a run's samples)."""
        try:
            with open(path, "rb") as fh:
                version = np.lib.format.read_magic(fh)
                read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read(fh)
                offset = fh.tell()
        except Exception as e:  # noqa: BLE001 - ValueError, SyntaxError, TokenError: a broken header
            raise ExportError(f"{path}: not a .npy file ({first_line(e)}); re-train, or export with --data DIR") from None
        c = spec.crop_size
        if dtype != np.uint8 or fortran or len(shape) != 4 or tuple(shape[1:]) != (c, c, 3):
            raise ExportError(f"{path}: expected uint8 (N, {c}, {c}, 3) rows, found {dtype} {shape}")
        if path.stat().st_size < offset + shape[0] * c * c * 3:  # rows are read lazily: say it now
            raise ExportError(f"{path}: truncated ({path.stat().st_size} bytes for {shape[0]} rows); re-train, or "
                              "export with --data DIR")
        return cls(path, offset, min(shape[0], limit) if limit is not None else shape[0], spec)

    @classmethod
    def from_array(cls, pixels: np.ndarray, spec: PreprocessSpec) -> "PhoneImages":
        """uint8 rows held by the caller -> a temporary row file (deleted with :meth:`close`)."""
        fd, tmp = tempfile.mkstemp(prefix="fieldid-images-", suffix=".u8")
        with os.fdopen(fd, "wb") as fh:
            fh.write(np.ascontiguousarray(pixels, np.uint8).tobytes())
        return cls(Path(tmp), 0, len(pixels), spec, owned=True)

    @classmethod
    def from_files(cls, paths: Sequence[Path], spec: PreprocessSpec, desc: str) -> tuple["PhoneImages", list[int]]:
        """Decode photos one at a time into a temporary row file; unreadable ones are skipped (logged).

        Returns:
            The images and the indices of ``paths`` that were kept.
        """
        fd, tmp = tempfile.mkstemp(prefix="fieldid-images-", suffix=".u8")
        kept: list[int] = []
        step = max(1, len(paths) // 10)
        with os.fdopen(fd, "wb") as fh:
            for i, p in enumerate(paths):
                try:
                    fh.write(center_crop(load_rgb(p), spec).tobytes())
                    kept.append(i)
                except ImageError as e:
                    log.warning("skipping unreadable image %s", e)
                if len(paths) >= 200 and (i + 1) % step == 0:
                    log.info("%s: decoded %d/%d images", desc, i + 1, len(paths))
        return cls(Path(tmp), 0, len(kept), spec, owned=True), kept

    def __len__(self) -> int:
        return self.count

    @property
    def shape(self) -> tuple[int, ...]:
        c = self.spec.crop_size
        return (self.count, 3, c, c)

    def pixels(self, start: int, stop: int) -> np.ndarray:
        """uint8 rows ``start:stop`` as ``(n, crop, crop, 3)``."""
        start, stop = max(0, start), min(stop, self.count)
        n = max(0, stop - start)
        with open(self.path, "rb") as fh:
            fh.seek(self.offset + start * self.row_bytes)
            buf = np.fromfile(fh, dtype=np.uint8, count=n * self.row_bytes)
        return buf.reshape((n,) + self.row_shape)

    def __getitem__(self, key: Any) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, stride = key.indices(self.count)
            if stride != 1:
                return self[np.arange(start, stop, stride)]
            return normalize(self.pixels(start, stop), self.spec)
        idx = np.atleast_1d(np.asarray(key, dtype=np.int64)) % max(self.count, 1)
        rows = np.stack([self.pixels(int(i), int(i) + 1)[0] for i in idx]) if len(idx) else \
            np.zeros((0,) + self.row_shape, np.uint8)
        out = normalize(rows, self.spec)
        return out[0] if np.ndim(key) == 0 else out

    def batches(self, size: int) -> Iterator[np.ndarray]:
        """Normalised float32 batches of at most ``size`` images, read lazily."""
        for i in range(0, self.count, size):
            yield self[i:i + size]

    def head(self, n: int) -> "PhoneImages":
        """The first ``n`` rows (a view on the same file)."""
        return PhoneImages(self.path, self.offset, min(n, self.count), self.spec)

    def close(self) -> None:
        """Delete a temporary row file this object created."""
        if self._owned:
            self.path.unlink(missing_ok=True)
            self._owned = False

    def __del__(self) -> None:  # temporary files never outlive the export
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def load_pixels(paths: Sequence[Path], spec: PreprocessSpec) -> tuple[np.ndarray, list[int]]:
    """Image files -> uint8 ``(N, crop, crop, 3)`` center crops, skipping unreadable ones (logged)."""
    rows, kept = [], []
    for i, p in enumerate(paths):
        try:
            rows.append(center_crop(load_rgb(p), spec))
            kept.append(i)
        except ImageError as e:
            log.warning("skipping unreadable image %s", e)
    c = spec.crop_size
    return (np.stack(rows) if rows else np.zeros((0, c, c, 3), np.uint8)), kept


def load_arrays(paths: list[Path], spec: Any) -> tuple[np.ndarray, list[int]]:
    """Image files -> ``(N, 3, H, W)`` float32 through the *phone* preprocessing, skipping unreadable ones.

    Returns:
        The array and the indices of ``paths`` that were kept.
    """
    pixels, kept = load_pixels(paths, spec)
    return normalize(pixels, spec), kept


@dataclass
class ExportInputs:
    """Held-out images (in memory: verification runs every artifact on all of them) and the lazy rest."""

    heldout: np.ndarray  # (N, 3, H, W) float32, phone preprocessing
    heldout_targets: np.ndarray
    heldout_split: str
    calibration: PhoneImages
    selection: PhoneImages
    selection_source: str
    source: str  # "run samples (RUN/samples)" or the dataset folder


def samples_index(run_dir: Path, record: RunRecord) -> dict[str, Any] | None:
    """``RUN/samples/samples.json`` when the run kept samples, else ``None``."""
    rel = record.extra.get("samples") if isinstance(record.extra, dict) else None
    if not rel:
        return None
    path = _inside(run_dir, str(rel), "run.json extra.samples")
    if not path.is_file():
        raise ExportError(f"{path}: named in run.json but missing; re-train, or export with --data DIR")
    try:
        index = json.loads(path.read_text())
        groups = index["groups"]
        for g in ("heldout", "calibration", "selection"):
            groups[g]["array"], groups[g]["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ExportError(f"{path}: malformed run samples ({type(e).__name__}: {e}); re-train, or export "
                          f"with --data DIR") from None
    index["_folder"] = path.parent
    return index


def _inside(root: Path, rel: str, what: str) -> Path:
    """``root / rel``, refusing absolute paths and ``..`` (files named in a record stay in its folder)."""
    return confined_path(root, rel, what=what, where=str(root), error=ExportError)


def heldout_from_run(index: dict[str, Any], spec: PreprocessSpec) -> tuple[np.ndarray, np.ndarray, str]:
    """The run's stored held-out images (float32, phone preprocessing), targets and split name."""
    g = index["groups"]["heldout"]
    imgs = PhoneImages.from_npy(_inside(index["_folder"], g["array"], "samples.json"), spec)
    x = imgs[0:len(imgs)]
    y = np.asarray([f["target"] for f in g["files"]], np.int64)[:len(x)]
    split = str(g.get("source", "test split")).split()[0]
    return x, y, split


def run_inputs(index: dict[str, Any], spec: PreprocessSpec, calibration_size: int) -> ExportInputs:
    """Export's inputs from the run's stored samples."""
    groups = index["groups"]
    folder = index["_folder"]
    heldout, targets, split = heldout_from_run(index, spec)
    calib = PhoneImages.from_npy(_inside(folder, groups["calibration"]["array"], "samples.json"), spec,
                                 limit=calibration_size)
    if calibration_size > len(calib):
        log.info("the run keeps %d calibration images; calibrating on those (export with --data DIR for more)",
                 len(calib))
    sel = PhoneImages.from_npy(_inside(folder, groups["selection"]["array"], "samples.json"), spec,
                               limit=calibration_size)
    return ExportInputs(heldout=heldout, heldout_targets=targets, heldout_split=split, calibration=calib,
                        selection=sel, selection_source=str(groups["selection"].get("source", "")),
                        source=f"run samples ({folder})")


def folder_inputs(split: Any, spec: PreprocessSpec, calibration_size: int, *, root: str) -> ExportInputs:
    """Export's inputs read from the photos a split names (``--data DIR``, or a run without samples)."""
    from fieldid.training.samples import calibration_order

    which = "test" if split.files.get("test") else "val"
    heldout, kept = load_arrays(split.paths(which), spec)
    if len(heldout) == 0:
        raise ExportError(f"no readable held-out images under {root} to verify against")
    targets = np.asarray(split.targets(which), dtype=np.int64)[kept]
    train_paths = split.paths("train")
    order = calibration_order(len(train_paths))
    pick = sorted(order[:calibration_size])
    calib, _ = PhoneImages.from_files([train_paths[i] for i in pick], spec, "calibration")
    if len(calib) == 0:
        raise ExportError(f"no readable training images under {root} to calibrate int8 with")
    if which == "test" and split.paths("val"):
        sel_paths, sel_source = split.paths("val")[:calibration_size], "val split"
    else:
        rest = sorted(order[calibration_size:2 * calibration_size]) or pick
        sel_paths, sel_source = [train_paths[i] for i in rest], "training images not used for calibration"
    selection, _ = PhoneImages.from_files(sel_paths, spec, "selection")
    return ExportInputs(heldout=heldout, heldout_targets=targets, heldout_split=which, calibration=calib,
                        selection=selection, selection_source=sel_source, source=str(root))
