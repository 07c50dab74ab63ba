"""Frozen backbone features of photos, computed once and cached on disk.

The features are what a backbone hands its classification head (MobileNetV2: 1280 pooled
values) for a photo under the run's *eval* preprocessing: decode with EXIF orientation
(:func:`fieldid.training.images.load_rgb`), resize the shorter side, center-crop, normalise —
exactly :func:`fieldid.training.data.decode_for_cache` followed by
:func:`fieldid.training.data.eval_transform`, so a cached feature equals the one training's
head phase computes for the same photo.

Cache: one ``.npz`` per (backbone, image size), by default ``<dataset root>/.fieldid-cache/
features-<backbone>-<size>.npz`` (hidden, so no scan of the dataset ever sees it). A row is
reused while the photo's (path relative to the root, byte size, mtime) is unchanged and the
file's metadata (preprocessing, weights) matches; anything else is recomputed. ``fieldid data
check`` and training therefore pay the feature pass once between them. Writes are atomic; a
read-only dataset folder only means nothing is cached.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from .data import eval_transform
from .images import load_rgb
from .models import classifier_modules, create_model, fast_layout, get_backbone
from .records import PreprocessSpec, atomic_write_bytes

__all__ = [
    "CACHE_DIR_NAME",
    "FeatureCache",
    "FeatureCollector",
    "FeatureExtractor",
    "cache_file",
    "default_cache_dir",
    "load_or_compute_features",
]

log = logging.getLogger(__name__)

CACHE_DIR_NAME = ".fieldid-cache"
# Bumped whenever what a row means changes (a different hook point, dtype, ...): old files are then ignored.
_SCHEMA = 1

ProgressFn = Callable[[int, int], None]


def default_cache_dir(root: str | os.PathLike) -> Path:
    """``<root>/.fieldid-cache``: beside the photos, hidden from every ImageFolder scan."""
    return Path(root) / CACHE_DIR_NAME


def cache_file(cache_dir: str | os.PathLike, backbone: str, image_size: int) -> Path:
    """The feature file of ``backbone`` at crop ``image_size`` in ``cache_dir``.

    Example:
        >>> cache_file("data/.fieldid-cache", "timm/resnet18.a1_in1k", 224).name
        'features-timm_resnet18.a1_in1k-224.npz'
    """
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", backbone)
    return Path(cache_dir) / f"features-{safe}-{int(image_size)}.npz"


def _common_root(paths: Sequence[Path]) -> Path:
    """The deepest folder holding every path (their parent when there is one photo)."""
    parents = [str(Path(p).resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents)) if parents else Path.cwd()


class FeatureCache:
    """Rows of one feature file, looked up by (relative path, size, mtime).

    Args:
        file: the ``.npz`` file (need not exist).
        root: folder that stored paths are relative to (photos outside it are stored absolute).
        meta: what produced the features; a file written with other metadata is ignored.
    """

    def __init__(self, file: Path, root: Path, meta: dict) -> None:
        self.file, self.root, self.meta = Path(file), Path(root).resolve(), meta
        self._rows: dict[tuple[str, int, int], np.ndarray] = {}
        self.dirty = False
        self._load()

    def _load(self) -> None:
        if not self.file.is_file():
            return
        try:
            with np.load(self.file, allow_pickle=False) as z:
                if json.loads(str(z["meta"])) != self.meta:
                    log.info("feature cache %s was written with other settings; recomputing", self.file)
                    return
                keys = zip(z["paths"].tolist(), z["sizes"].tolist(), z["mtimes"].tolist())
                feats = z["features"]
                self._rows = {(p, int(s), int(m)): feats[i] for i, (p, s, m) in enumerate(keys)}
        except Exception as e:  # noqa: BLE001 - a damaged cache file is only a cache miss
            log.warning("feature cache %s unreadable (%s); recomputing", self.file, type(e).__name__)
            self._rows = {}

    def key(self, path: Path) -> tuple[str, int, int]:
        """(path relative to the root, or absolute; byte size; mtime in ns) of ``path``."""
        p = Path(path).resolve()
        st = p.stat()
        try:
            name = p.relative_to(self.root).as_posix()
        except ValueError:
            name = p.as_posix()
        return name, int(st.st_size), int(st.st_mtime_ns)

    def get(self, key: tuple[str, int, int]) -> np.ndarray | None:
        return self._rows.get(key)

    def put(self, key: tuple[str, int, int], feature: np.ndarray) -> None:
        # A photo edited in place keeps its path: drop its stale rows so the file does not grow.
        stale = [k for k in self._rows if k[0] == key[0] and k != key] if key not in self._rows else []
        for k in stale:
            del self._rows[k]
        self._rows[key] = np.asarray(feature, dtype=np.float32)
        self.dirty = True

    def __len__(self) -> int:
        return len(self._rows)

    def save(self) -> bool:
        """Write the file atomically; False (and one log line) where the folder is not writable."""
        if not self.dirty:
            return True
        keys = list(self._rows)
        dim = len(next(iter(self._rows.values()))) if keys else 0
        buf = io.BytesIO()
        np.savez(buf, meta=np.array(json.dumps(self.meta)),
                 paths=np.array([k[0] for k in keys], dtype=str),
                 sizes=np.array([k[1] for k in keys], dtype=np.int64),
                 mtimes=np.array([k[2] for k in keys], dtype=np.int64),
                 features=np.stack([self._rows[k] for k in keys]) if keys else np.zeros((0, dim), np.float32))
        try:
            atomic_write_bytes(self.file, buf.getvalue())
        except OSError as e:
            log.warning("feature cache not written (%s: %s); the next check computes the features again",
                        self.file, e.strerror or e)
            return False
        self.dirty = False
        return True


class FeatureExtractor:
    """A frozen backbone that turns decoded photos into the features its head would see.

    Args:
        backbone: registry name (``mobilenet_v2``, ``efficientnet_lite0``, ``timm/<name>``).
        image_size: crop size (None: the backbone's native size).
        pretrained: ImageNet weights (the offline packages for the built-ins).
        weights_file: a local state dict instead of the default weights.

    Example:
        >>> ex = FeatureExtractor("mobilenet_v2", 64, pretrained=False)  # doctest: +SKIP
        >>> ex([Image.new("RGB", (80, 80))]).shape  # doctest: +SKIP
        (1, 1280)
    """

    def __init__(self, backbone: str, image_size: int | None = None, *, pretrained: bool = True,
                 weights_file: str | None = None) -> None:
        self.backbone = backbone
        self.spec: PreprocessSpec = get_backbone(backbone).preprocess(image_size)
        self.pretrained, self.weights_file = pretrained, weights_file
        self._transform = eval_transform(self.spec, from_cache=False)
        self._model: torch.nn.Module | None = None  # built on first use: cache hits never load weights
        self._head: torch.nn.Module | None = None

    @property
    def meta(self) -> dict:
        """What a cached row depends on; a cache file written with anything else is not reused."""
        if self.weights_file:
            weights = "file:" + hashlib.sha256(Path(self.weights_file).read_bytes()).hexdigest()[:16]
        else:
            weights = "pretrained" if self.pretrained else "random-init"
        return {"schema": _SCHEMA, "backbone": self.backbone, "weights": weights, "preprocess": self.spec.to_dict()}

    def transform(self, image: Image.Image) -> torch.Tensor:
        """Resize + center-crop + normalise one decoded RGB photo (training's eval pipeline)."""
        return self._transform(image)

    def _ensure_model(self) -> None:
        if self._model is None:
            self._model = fast_layout(create_model(self.backbone, None, pretrained=self.pretrained,
                                                   weights_file=self.weights_file)).eval()
            self._head = self._model.get_submodule(classifier_modules(self._model)[0][0])

    @torch.inference_mode()
    def features(self, batch: torch.Tensor) -> np.ndarray:
        """Features of a preprocessed NCHW batch, float32 ``(n, dim)``."""
        self._ensure_model()
        assert self._model is not None and self._head is not None
        seen: list[torch.Tensor] = []
        # The head's input is the pooled feature vector whatever the architecture calls its layers.
        hook = self._head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].flatten(1)))
        try:
            self._model(batch)
        finally:
            hook.remove()
        return seen[0].float().cpu().numpy()

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.features(torch.stack([self.transform(im) for im in images]))


class FeatureCollector:
    """Features for photos handed over one at a time (``add``), batched through the backbone.

    Used where photos are decoded anyway (``fieldid data check`` reads each photo once for its
    hashes, quality measures *and* features); cache hits skip the backbone entirely.
    """

    def __init__(self, extractor: FeatureExtractor, cache: FeatureCache | None, *, batch_size: int = 32) -> None:
        self.extractor, self.cache, self.batch_size = extractor, cache, batch_size
        self._rows: dict[int, np.ndarray] = {}
        self._pending: list[tuple[int, tuple[str, int, int] | None, torch.Tensor]] = []
        self.hits = self.computed = 0

    def cached(self, path: Path) -> tuple[tuple[str, int, int] | None, np.ndarray | None]:
        if self.cache is None:
            return None, None
        key = self.cache.key(path)
        return key, self.cache.get(key)

    def add(self, index: int, path: Path, image: Image.Image | None = None) -> None:
        """Queue photo ``index`` (decoded ``image`` if the caller has it, else decoded here)."""
        key, row = self.cached(path)
        if row is not None:
            self._rows[index] = row
            self.hits += 1
            return
        img = image if image is not None else load_rgb(path)
        self._pending.append((index, key, self.extractor.transform(img)))
        if len(self._pending) >= self.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        feats = self.extractor.features(torch.stack([t for _, _, t in self._pending]))
        for (index, key, _), f in zip(self._pending, feats):
            self._rows[index] = f
            if self.cache is not None and key is not None:
                self.cache.put(key, f)
        self.computed += len(self._pending)
        self._pending = []

    def result(self, indices: Sequence[int]) -> np.ndarray:
        """Stacked features of ``indices`` (all must have been added); the cache is saved."""
        self.flush()
        if self.cache is not None:
            self.cache.save()
        return np.stack([self._rows[i] for i in indices]).astype(np.float32, copy=False)


def load_or_compute_features(paths: Sequence[str | os.PathLike], backbone: str = "mobilenet_v2",
                             image_size: int | None = None, *, root: str | os.PathLike | None = None,
                             cache_dir: str | os.PathLike | None = None, use_cache: bool = True,
                             pretrained: bool = True, weights_file: str | None = None, batch_size: int = 32,
                             progress: ProgressFn | None = None) -> np.ndarray:
    """Backbone features of ``paths`` (rows in order), reusing the on-disk cache.

    Args:
        paths: photo files.
        backbone: registry name, as ``fieldid train --model`` takes it.
        image_size: crop size (None: the backbone's native size). Use the run's size so the
            rows equal what its head phase sees.
        root: folder cached paths are stored relative to (default: the deepest folder holding
            all ``paths``; pass the dataset root so ``check`` and ``train`` share one file).
        cache_dir: where the ``.npz`` lives (default ``<root>/.fieldid-cache``).
        use_cache: False computes every row and writes nothing.
        pretrained, weights_file: the backbone's weights, as for :func:`create_model`.
        batch_size: photos per backbone call.
        progress: called as ``progress(done, total)`` after every batch.

    Returns:
        float32 array ``(len(paths), feature_dim)``.

    Raises:
        ImageError: a photo that cannot be decoded (training's cache skips those first).

    Example:
        >>> feats = load_or_compute_features(split.paths("train"), "mobilenet_v2", 160,
        ...                                  root=split.root)  # doctest: +SKIP
        >>> feats.shape  # doctest: +SKIP
        (1071, 1280)
    """
    paths = [Path(p) for p in paths]
    extractor = FeatureExtractor(backbone, image_size, pretrained=pretrained, weights_file=weights_file)
    cache = None
    if use_cache:
        base = Path(root) if root is not None else _common_root(paths)
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir(base)
        cache = FeatureCache(cache_file(folder, backbone, extractor.spec.crop_size), base, extractor.meta)
    collector = FeatureCollector(extractor, cache, batch_size=batch_size)
    for i, p in enumerate(paths):
        collector.add(i, p)
        if progress is not None and (i + 1) % batch_size == 0:
            progress(i + 1, len(paths))
    out = collector.result(range(len(paths))) if paths else np.zeros((0, 0), np.float32)
    if progress is not None:
        progress(len(paths), len(paths))
    log.debug("features: %d from cache, %d computed", collector.hits, collector.computed)
    return out
