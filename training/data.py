"""Dataset splitting, the decode-once uint8 cache, and field-photo transforms."""
from __future__ import annotations

import logging
import math
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from .config import AugmentConfig
from .exclusions import active_exclusions, resolve_entries
from .images import DataError, ImageError, load_rgb, scan_image_folder
from .records import PreprocessSpec, atomic_write_json

__all__ = [
    "Split",
    "make_split",
    "load_split",
    "decode_for_cache",
    "ImageCache",
    "CachedImageDataset",
    "eval_transform",
    "train_transform",
    "class_weights",
]

log = logging.getLogger(__name__)

_INTERP = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC,
           "nearest": InterpolationMode.NEAREST}


@dataclass
class Split:
    """Which file goes where. Paths are relative to ``root`` so the split survives a move."""

    root: str
    labels: list[str]
    files: dict[str, list[tuple[str, int]]]  # split -> [(relpath, class index)]
    presplit: bool
    seed: int
    # Photos left out by an exclude file: {"file", "split", "label", "reason"} (split: the one it would have had).
    excluded: list[dict[str, str]] = field(default_factory=list)

    def to_json(self, path: str | Path) -> Path:
        return atomic_write_json(path, {
            "schema_version": 1, "root": self.root, "labels": self.labels, "presplit": self.presplit,
            "seed": self.seed, "files": {k: [[p, y] for p, y in v] for k, v in self.files.items()},
            "excluded": self.excluded,
        })

    def counts(self, split: str) -> list[int]:
        c = Counter(y for _, y in self.files.get(split, []))
        return [c.get(i, 0) for i in range(len(self.labels))]

    def paths(self, split: str) -> list[Path]:
        return [Path(self.root) / p for p, _ in self.files.get(split, [])]

    def targets(self, split: str) -> list[int]:
        return [y for _, y in self.files.get(split, [])]


def load_split(path: str | Path) -> Split:
    """Read ``split.json``; anything malformed is one :class:`DataError` naming the file and the problem.

    File paths must be relative and stay inside the dataset root (no absolute path, no ``..``).
    """
    import json

    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: split file missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a JSON object, got {type(d).__name__}")
    missing = [k for k in ("root", "labels", "presplit", "seed", "files") if k not in d]
    if missing:
        raise DataError(f"{path}: missing key(s) {', '.join(missing)}")
    if not isinstance(d["root"], str) or not d["root"]:
        raise DataError(f"{path}: 'root' must be a folder path (a string)")
    labels = d["labels"]
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(set(labels)) != len(labels):
        raise DataError(f"{path}: 'labels' must be a list of distinct class names")
    if not isinstance(d["files"], dict):
        raise DataError(f"{path}: 'files' must map split names to [file, class index] pairs")
    files: dict[str, list[tuple[str, int]]] = {}
    for name, entries in d["files"].items():
        if not isinstance(entries, list):
            raise DataError(f"{path}: files.{name} must be a list of [file, class index] pairs")
        out = []
        for i, e in enumerate(entries):
            if not (isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str)
                    and isinstance(e[1], int) and not isinstance(e[1], bool) and 0 <= e[1] < len(labels)):
                raise DataError(f"{path}: files.{name}[{i}] must be [relative path, class index < {len(labels)}], "
                                f"got {e!r}")
            rel = Path(e[0])
            if rel.is_absolute() or ".." in rel.parts or not e[0]:
                raise DataError(f"{path}: files.{name}[{i}] {e[0]!r} leaves the dataset folder (absolute or '..')")
            out.append((e[0], e[1]))
        files[name] = out
    excluded = d.get("excluded", [])
    if not isinstance(excluded, list) or not all(isinstance(e, dict) for e in excluded):
        raise DataError(f"{path}: 'excluded' must be a list of {{file, split, label, reason}} objects")
    return Split(root=d["root"], labels=labels, presplit=bool(d["presplit"]), seed=int(d["seed"]) if
                 isinstance(d["seed"], int) else 0, files=files, excluded=excluded)


def make_split(data_dir: str | Path, *, val_fraction: float = 0.15, test_fraction: float = 0.15,
               seed: int = 0, exclude: Mapping[str, str] | None = None) -> Split:
    """Stratified, seeded split of a flat ImageFolder; a pre-split tree is taken as it is.

    When a pre-split tree has no ``val/``, val is carved out of train (stratified, seeded).
    ``exclude`` (``{relative path: reason}``; default: the active
    :func:`fieldid.training.exclusions.excluding`, ``{}`` for none) drops photos *after* the
    split, so every other photo keeps its split; they are listed in ``Split.excluded``.

    Example:
        >>> s = make_split("data/reef", seed=0)  # doctest: +SKIP
        >>> sorted(s.files)  # doctest: +SKIP
        ['test', 'train', 'val']
    """
    listing = scan_image_folder(data_dir)
    root = listing.root.resolve()
    labels = listing.labels
    index = {name: i for i, name in enumerate(labels)}
    rng = random.Random(seed)
    files: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}

    def rel(p: Path) -> str:
        return p.resolve().relative_to(root).as_posix()

    def carve(classes: dict[str, list[Path]], fractions: dict[str, float]) -> None:
        for name in sorted(classes):
            paths = sorted(classes[name])
            rng.shuffle(paths)
            n = len(paths)
            start = 0
            for split, frac in fractions.items():
                # At least one image per class in each held-out split when the class allows it.
                k = min(max(1, int(round(frac * n))), max(0, n - start - 1)) if frac > 0 else 0
                files[split] += [(rel(p), index[name]) for p in paths[start:start + k]]
                start += k
            files["train"] += [(rel(p), index[name]) for p in paths[start:]]

    if listing.presplit:
        for split, classes in listing.splits.items():
            if split == "train" and "val" not in listing.splits:
                carve(classes, {"val": val_fraction})
            else:
                for name, paths in classes.items():
                    files[split] += [(rel(p), index[name]) for p in paths]
    else:
        carve(listing.splits["all"], {"val": val_fraction, "test": test_fraction})
    for k in files:
        files[k].sort()
    excluded: list[dict[str, str]] = []
    source = "exclude list"
    if exclude is None and (active := active_exclusions()) is not None:
        source, exclude = active
    if exclude:
        drop = resolve_entries(exclude, root, {p for v in files.values() for p, _ in v}, source)
        excluded = [{"file": p, "split": k, "label": labels[y], "reason": drop[p]}
                    for k, v in files.items() for p, y in v if p in drop]
        files = {k: [(p, y) for p, y in v if p not in drop] for k, v in files.items()}
        emptied = sorted(set(labels) - {labels[y] for _, y in files["train"]})
        if emptied:
            raise DataError(f"{source} leaves no training photo of class(es) {', '.join(emptied)}")
        log.info("left out %d photo(s) listed in %s (recorded in split.json)", len(excluded), source)
    if not files["train"]:
        raise DataError(f"{data_dir}: no training images after the split")
    return Split(root=str(root), labels=labels, files=files, presplit=listing.presplit, seed=seed, excluded=excluded)


def decode_for_cache(path: Path, resize_size: int, interpolation: str) -> np.ndarray:
    """Decode (EXIF applied) and resize the shorter side to ``resize_size``: HWC uint8.

    This is the first step of the eval pipeline, so eval-from-cache equals eval-from-disk.
    """
    img = load_rgb(path)
    img = T.Resize(resize_size, interpolation=_INTERP[interpolation])(img)
    return np.asarray(img, dtype=np.uint8)


class ImageCache:
    """Decoded, resized images held in memory as uint8 (or decoded lazily when disabled).

    Unreadable files are dropped with one warning each and counted in ``skipped``.
    """

    def __init__(self, paths: Sequence[Path], targets: Sequence[int], *, resize_size: int,
                 interpolation: str, enabled: bool = True, desc: str = "cache") -> None:
        self.resize_size = resize_size
        self.interpolation = interpolation
        self.enabled = enabled
        self.paths: list[Path] = []
        self.targets: list[int] = []
        self.arrays: list[np.ndarray] = []
        self.skipped: list[str] = []
        n = len(paths)
        step = max(1, n // 10)
        for i, (p, y) in enumerate(zip(paths, targets)):
            try:
                arr = decode_for_cache(p, resize_size, interpolation) if enabled else None
                if not enabled:
                    load_rgb(p)  # validate once so a corrupt file is skipped up front, not mid-epoch
            except ImageError as e:
                log.warning("skipping unreadable image %s", e)
                self.skipped.append(str(p))
                continue
            self.paths.append(Path(p))
            self.targets.append(int(y))
            if arr is not None:
                self.arrays.append(arr)
            if enabled and n >= 200 and (i + 1) % step == 0:
                log.info("%s: decoded %d/%d images", desc, i + 1, n)

    def __len__(self) -> int:
        return len(self.targets)

    def image(self, i: int) -> Image.Image:
        if self.enabled:
            return Image.fromarray(self.arrays[i])
        return Image.fromarray(decode_for_cache(self.paths[i], self.resize_size, self.interpolation))

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)


class CachedImageDataset(Dataset):
    """(tensor, target) pairs from an :class:`ImageCache` through a transform."""

    def __init__(self, cache: ImageCache, transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.cache = cache
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.cache.image(i)), self.cache.targets[i]


def eval_transform(spec: PreprocessSpec, *, from_cache: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """The eval pipeline; ``from_cache`` skips the resize that the cache already did."""
    steps: list[Callable] = [] if from_cache else [T.Resize(spec.resize_size, interpolation=_INTERP[spec.interpolation])]
    steps += [T.CenterCrop(spec.crop_size), T.ToTensor(), T.Normalize(spec.mean, spec.std)]
    return T.Compose(steps)


class PixelNoise:
    """Gaussian noise on a ``[0, 1]`` image tensor, its standard deviation drawn per photo from
    ``[0, max_grey_levels / 255]``; the result is clipped to ``[0, 1]`` like a real pixel."""

    def __init__(self, max_grey_levels: float) -> None:
        self.max_std = max_grey_levels / 255.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        std = float(torch.rand(())) * self.max_std
        return (x + torch.randn_like(x) * std).clamp_(0.0, 1.0)

    def __repr__(self) -> str:
        return f"PixelNoise(max_std={self.max_std:.4f})"


def train_transform(spec: PreprocessSpec, aug: AugmentConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Field-photo augmentation. Hue jitter is separate so colour-coded tasks can turn it off."""
    steps: list[Callable] = [
        T.RandomResizedCrop(spec.crop_size, scale=(aug.scale_min, 1.0),
                            interpolation=_INTERP[spec.interpolation]),
    ]
    if aug.rotate_degrees > 0:
        steps.append(T.RandomRotation(aug.rotate_degrees, interpolation=InterpolationMode.BILINEAR))
    if aug.hflip:  # "auto" flips until the run's mirror check has decided (training/head.py)
        steps.append(T.RandomHorizontalFlip())
    if aug.vflip:
        steps.append(T.RandomVerticalFlip())
    if aug.brightness or aug.contrast or aug.saturation or aug.hue:
        steps.append(T.ColorJitter(aug.brightness, aug.contrast, aug.saturation, aug.hue))
    if aug.blur_prob > 0:
        steps.append(T.RandomApply([T.GaussianBlur(5, sigma=(0.1, 1.5))], p=aug.blur_prob))
    steps.append(T.ToTensor())
    if aug.noise > 0:
        steps.append(PixelNoise(aug.noise))
    steps.append(T.Normalize(spec.mean, spec.std))
    return T.Compose(steps)


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency weights normalised to mean 1 (``n / (k * count)``)."""
    c = torch.tensor([max(1, x) for x in counts], dtype=torch.float)
    w = c.sum() / (len(c) * c)
    return w / w.mean()


def imbalance_ratio(counts: Sequence[int]) -> float:
    nz = [c for c in counts if c > 0]
    return max(nz) / min(nz) if nz else math.inf


def default_num_threads() -> int:
    """CPU cores this process may run on (its affinity mask, not the machine's count): training
    loaders and ``fieldid bench``'s "all threads" column both use it."""
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def balanced_sample_weights(counts: list[int], targets: list[int]) -> torch.Tensor:
    """Per-image sampling weights that draw every class equally often (``imbalance: sampler``)."""
    per_class = [1.0 / max(1, c) for c in counts]
    return torch.tensor([per_class[y] for y in targets], dtype=torch.double)
