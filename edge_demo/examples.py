"""Example photos for the demo, taken from the training run's held-out split.

Only held-out (test, else val) files are offered, so clicking an example shows how the model
does on photos it has not trained on. The run is the one given (``--run``) or, for a bare
bundle, the manifest's ``source_run``. Torch-free: ``split.json`` is read as plain JSON.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fieldid.export.manifest import Manifest
from fieldid.training.demo_data import MARKER_NAME

__all__ = ["Example", "DataOrigin", "example_images", "data_origin"]

_SPLITS = ("test", "val")


@dataclass(frozen=True)
class Example:
    """One example photo and its true class."""

    path: Path
    label: str


@dataclass(frozen=True)
class DataOrigin:
    """Where the model's training photos came from (to say so honestly in the app)."""

    root: Path | None
    synthetic: bool  # written by ``fieldid data demo`` (the built-in synthetic sets)


def _split_file(source: Path, manifest: Manifest) -> Path | None:
    for run in (source, source.parent, Path(manifest.source_run) if manifest.source_run else None):
        if run is not None and (run / "split.json").is_file():
            return run / "split.json"
    return None


def _read_split(source: Path, manifest: Manifest) -> dict | None:
    path = _split_file(source, manifest)
    if path is None:
        return None
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) and isinstance(d.get("files"), dict) else None


def data_origin(source: str | Path, manifest: Manifest) -> DataOrigin:
    """The data root of the run behind ``source`` and whether it is fieldid's synthetic demo data.

    Example:
        >>> data_origin("runs/reef", load_manifest("runs/reef")).synthetic  # doctest: +SKIP
        True
    """
    d = _read_split(Path(source), manifest)
    if d is None or not isinstance(d.get("root"), str):
        return DataOrigin(root=None, synthetic=False)
    root = Path(d["root"])
    return DataOrigin(root=root, synthetic=(root / MARKER_NAME).is_file())


def example_images(source: str | Path, manifest: Manifest, *, per_class: int = 2, max_total: int = 12) -> list[Example]:
    """Up to ``per_class`` held-out photos per class (at most ``max_total``), classes interleaved.

    Args:
        source: the ``--run``/``--bundle`` path the mode was started with.
        manifest: that bundle's manifest (labels, source run).
        per_class: photos per class.
        max_total: cap over all classes (the reef set has nine).

    Returns:
        Existing files only, deterministic order; empty when the run or its data is not here.

    Example:
        >>> [e.label for e in example_images("runs/salmon", load_manifest("runs/salmon"))]  # doctest: +SKIP
        ['wild', 'farmed', 'wild', 'farmed']
    """
    d = _read_split(Path(source), manifest)
    if d is None:
        return []
    root = Path(str(d.get("root", "")))
    labels = d.get("labels") or manifest.labels
    by_class: dict[str, list[Path]] = {name: [] for name in manifest.labels}
    for split in _SPLITS:
        for rel, y in d["files"].get(split, []):
            name = labels[int(y)] if 0 <= int(y) < len(labels) else None
            if name in by_class and len(by_class[name]) < per_class and (root / rel).is_file():
                by_class[name].append(root / rel)
        if all(len(v) >= per_class for v in by_class.values()):
            break
    out: list[Example] = []
    for i in range(per_class):  # interleave: one of each class before a second of any
        out += [Example(paths[i], name) for name, paths in by_class.items() if i < len(paths)]
    return out[:max_total]
