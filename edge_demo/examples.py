"""Example photos for the demo, read from the bundle only.

The export copies a few held-out (test, else val) photos into ``BUNDLE/examples/`` and lists
them with their true class in the manifest's ``examples`` (:mod:`fieldid.export.examples`).
Clicking one shows how the model does on a photo it has not trained on. Nothing here reads a
run's ``split.json`` or the dataset: a bundle copied elsewhere, or into another run's folder,
shows its own photos. Torch- and training-free.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fieldid.export.examples import UNKNOWN_LABEL, inside
from fieldid.export.manifest import Manifest

from .device import bundle_dir_of

__all__ = ["UNKNOWN_LABEL", "Example", "DataOrigin", "example_images", "unknown_examples", "data_origin"]


@dataclass(frozen=True)
class Example:
    """One example photo and its true class."""

    path: Path
    label: str  # a class, or UNKNOWN_LABEL for a generated non-photo

    @property
    def unknown(self) -> bool:
        """True for a generated "not a fish" example: the right answer is "unknown"."""
        return self.label == UNKNOWN_LABEL


@dataclass(frozen=True)
class DataOrigin:
    """Where the model's training photos came from (to say so honestly in the app)."""

    root: Path | None
    synthetic: bool  # written by ``fieldid data demo`` (the built-in synthetic sets)


def data_origin(source: str | Path, manifest: Manifest) -> DataOrigin:
    """The training data's folder (as recorded at export) and whether it was fieldid's synthetic data.

    Example:
        >>> data_origin("runs/reef", load_manifest("runs/reef")).synthetic  # doctest: +SKIP
        True
    """
    d = manifest.training_data
    root = d.get("root")
    return DataOrigin(root=Path(root) if isinstance(root, str) and root else None,
                      synthetic=d.get("synthetic") is True)


def example_images(source: str | Path, manifest: Manifest) -> list[Example]:
    """The bundle's held-out example photos, in manifest order (classes interleaved at export).

    Args:
        source: the ``--run``/``--bundle`` path the mode was started with.
        manifest: that bundle's manifest (already validated: every file is under ``examples/``).

    Returns:
        Existing files only; empty for a bundle exported without examples.

    Example:
        >>> [e.label for e in example_images("runs/salmon", load_manifest("runs/salmon"))]  # doctest: +SKIP
        ['wild', 'farmed', 'wild', 'farmed']
    """
    return [e for e in _all_examples(source, manifest) if not e.unknown]


def unknown_examples(source: str | Path, manifest: Manifest) -> list[Example]:
    """The bundle's generated "not a fish" examples (label :data:`UNKNOWN_LABEL`): each must come
    out as unknown. Empty for a bundle without an unknown detector (none are exported)."""
    return [e for e in _all_examples(source, manifest) if e.unknown]


def _all_examples(source: str | Path, manifest: Manifest) -> list[Example]:
    bundle = bundle_dir_of(source)
    out = []
    for i, e in enumerate(manifest.examples):
        path = inside(bundle, e["file"], what=f"{bundle}/manifest.json: examples[{i}].file")
        # A symlink planted in the bundle must not show a file from elsewhere on this machine.
        if path.is_file() and path.resolve().is_relative_to(bundle.resolve()):
            out.append(Example(path, e["label"]))
    return out
