"""Example photos for the field demo, copied into the bundle at export.

A bundle must be self-contained: the demo shows held-out photos with their true class, and it
reads them from ``BUNDLE/examples/<label>/<file>`` as listed in the manifest's ``examples``
(``[{"file": "examples/wild/img_3.jpg", "label": "wild"}, ...]``), never from the run's
``split.json`` or the dataset. So a bundle copied to another machine, or into another run's
folder, shows its own photos. The manifest also records ``training_data`` (``root`` as text,
``synthetic``) so the demo can say where the photos came from without looking for them.

Photos a browser shows as they are (JPEG, PNG, WebP up to :data:`COPY_MAX_BYTES` and
:data:`MAX_SIDE`) are copied byte for byte; others (HEIC, TIFF, a 24 MP JPEG) are stored as a
JPEG of at most :data:`MAX_SIDE` px, orientation applied, so the bundle stays small.

Reading and checking entries (:func:`check_entries`, :func:`inside`) is torch- and
training-free: the manifest loader and the demo use them.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Callable

from fieldid.records import confined_path

if TYPE_CHECKING:  # only for annotations: the readers below must not import training
    from PIL import Image

    from .manifest import Manifest

__all__ = ["EXAMPLES_DIR", "PER_CLASS", "MAX_TOTAL", "MAX_SIDE", "COPY_MAX_BYTES", "UNKNOWN_LABEL", "UNKNOWN_KINDS",
           "UNKNOWN_EXAMPLES", "UNKNOWN_DRAWS", "unknown_example_draw", "inside", "check_entries", "add_examples",
           "add_unknown_examples"]

log = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"
PER_CLASS = 2  # held-out photos per class
MAX_TOTAL = 12  # over all classes (the reef set has nine)
MAX_SIDE = 1280  # longer side of a re-encoded example: sharp on a phone, ~0.3 MB
COPY_MAX_BYTES = 1_000_000  # larger files are re-encoded
_SPLITS = ("test", "val")  # held-out splits, preferred first
# Generated "not a fish" examples, listed with this label, which no class can have (parentheses):
# the demo shows them as "must be unknown". Only bundles with an unknown detector get them; without
# one they would read as a species. The kinds are fixed (training.negatives): the colour gradient a
# user first tried (issue 10), and two textures nothing in a photo of a fish looks like.
UNKNOWN_LABEL = "(not a fish)"
UNKNOWN_KINDS = ("gradient", "stripes", "clouds")
UNKNOWN_EXAMPLES = len(UNKNOWN_KINDS)
_UNKNOWN_FOLDER = "not-a-fish"
_UNKNOWN_SEED = 2026  # not the seeds `fieldid bench --ood` and the tests draw from
_UNKNOWN_SIDE = 320
UNKNOWN_DRAWS = 8  # draws per kind at most, until one scores clear of the threshold's band
_BROWSER_FORMATS = ("JPEG", "PNG", "WEBP")


def inside(root: str | Path, rel: object, *, what: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root``.

    Args:
        root: the bundle or dataset folder the path is relative to.
        rel: the path as read from a JSON file.
        what: names the file and field for the error, e.g. ``"manifest.json: examples[3].file"``.

    Raises:
        RecordError: a ValueError: ``rel`` is not a string, is empty, absolute, or contains ``..``
            (:func:`fieldid.records.confined_path`, the rule every record's paths follow).

    Example:
        >>> inside("/b", "examples/cat/1.jpg", what="x").as_posix()
        '/b/examples/cat/1.jpg'
        >>> inside("/b", "../secret", what="manifest.json: examples[0].file")
        Traceback (most recent call last):
        ...
        fieldid.records.RecordError: manifest.json: examples[0].file: '../secret' must stay inside the folder (no absolute path, no '..')
    """
    return confined_path(root, rel, what=what)


def check_entries(entries: object, labels: list[str], source: str) -> None:
    """Validate a manifest's ``examples``: a list of ``{"file", "label"}`` inside ``examples/``.

    Raises:
        ValueError: naming ``source`` and the bad entry.
    """
    if not isinstance(entries, list):
        raise ValueError(f"{source}: examples must be a list, got {type(entries).__name__}")
    for i, e in enumerate(entries):
        where = f"{source}: examples[{i}]"
        if not isinstance(e, dict) or set(e) != {"file", "label"}:
            raise ValueError(f"{where} must be an object with keys file and label")
        inside(".", e["file"], what=f"{where}.file")
        if PurePosixPath(e["file"]).parts[0] != EXAMPLES_DIR:
            raise ValueError(f"{where}.file {e['file']!r} must be under {EXAMPLES_DIR}/")
        if e["label"] not in labels and e["label"] != UNKNOWN_LABEL:
            raise ValueError(f"{where}.label {e['label']!r} is not one of the bundle's labels (nor {UNKNOWN_LABEL!r})")


def _pick(files: dict[str, list[tuple[str, int]]], split_labels: list[str], labels: list[str],
          root: Path) -> list[tuple[Path, str]]:
    """Up to PER_CLASS held-out photos per class (of ``labels``), classes interleaved, at most MAX_TOTAL."""
    by_class: dict[str, list[Path]] = {name: [] for name in labels}
    for split in _SPLITS:
        for rel, y in files.get(split, []):
            name = split_labels[int(y)] if 0 <= int(y) < len(split_labels) else None
            path = root / rel  # load_split refused absolute paths and '..'
            if name in by_class and len(by_class[name]) < PER_CLASS and path.is_file():
                by_class[name].append(path)
        if all(len(v) >= PER_CLASS for v in by_class.values()):
            break
    out: list[tuple[Path, str]] = []
    for i in range(PER_CLASS):  # one of each class before a second of any
        out += [(paths[i], name) for name, paths in by_class.items() if i < len(paths)]
    return out[:MAX_TOTAL]


def _store(src: Path, folder: Path) -> Path | None:
    """Copy or re-encode ``src`` into ``folder``; None when it is not a readable photo."""
    from PIL import Image

    from fieldid.intake import ImageInputError, open_image

    try:
        img = open_image(src, target=MAX_SIDE // 2)
        with Image.open(src) as head:
            fmt, size, orientation = head.format, head.size, head.getexif().get(0x0112, 1)
    except (ImageInputError, OSError) as e:
        log.warning("example photo skipped: %s", e)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    as_is = (fmt in _BROWSER_FORMATS and orientation == 1 and src.stat().st_size <= COPY_MAX_BYTES
             and max(size) <= MAX_SIDE)
    name = src.name if as_is else src.stem + ".jpg"
    dest, n = folder / name, 1
    while dest.exists():  # two held-out files of one class may share a name (sub-folders)
        dest, n = folder / f"{Path(name).stem}_{n}{Path(name).suffix}", n + 1
    if as_is:
        shutil.copyfile(src, dest)
    else:
        img.thumbnail((MAX_SIDE, MAX_SIDE), Image.Resampling.LANCZOS)
        img.save(dest, "JPEG", quality=90)
    return dest


def add_examples(manifest: Manifest, run_dir: str | Path, stage: str | Path, *, data_root: str | Path | None = None,
                 split_file: str = "split.json") -> None:
    """Copy the run's held-out example photos into ``stage/examples/`` and list them in ``manifest``.

    The bundle writer calls this once, before writing ``manifest.json``. A run whose dataset
    is not on this machine gets no examples (and a note saying so), never an error.

    Args:
        manifest: the manifest being written; ``examples`` and ``training_data`` are set. With
            the generated non-photos come from :func:`add_unknown_examples`.
        run_dir: the run folder (its ``split_file`` names the held-out files).
        stage: the bundle folder being written.
        data_root: the dataset folder, when it is not where ``split.json`` says (``--data``).

    Raises:
        DataError: a malformed ``split.json``, or a path in it that is absolute or leaves the
            dataset (``..``), from :func:`fieldid.training.data.load_split`.
    """
    from fieldid.training.data import load_split
    from fieldid.training.demo_data import MARKER_NAME

    split = load_split(Path(run_dir) / split_file)
    root = Path(data_root) if data_root is not None else Path(split.root)
    manifest.training_data = {"root": str(root), "synthetic": (root / MARKER_NAME).is_file()}
    entries: list[dict[str, Any]] = []
    for src, label in _pick(split.files, split.labels, manifest.labels, root):
        dest = _store(src, Path(stage) / EXAMPLES_DIR / label)
        if dest is not None:
            entries.append({"file": dest.relative_to(stage).as_posix(), "label": label})
    manifest.examples = entries
    if not entries:
        manifest.notes.append(f"no example photos: the held-out photos under {root} are not on this machine")
    log.info("example photos: %d copied into %s/", len(entries), EXAMPLES_DIR)


def unknown_example_draw(kind_index: int, draw: int) -> Image.Image:
    """Draw ``draw`` of the generated non-photo of kind ``UNKNOWN_KINDS[kind_index]`` (seeded: the same
    image on every machine; draw 0 is the one bundles before the draws carried)."""
    import numpy as np

    from fieldid.training.negatives import generated_unknown

    seed = [_UNKNOWN_SEED, kind_index, *([draw] if draw else [])]
    return generated_unknown(UNKNOWN_KINDS[kind_index], np.random.default_rng(seed), _UNKNOWN_SIDE)


def add_unknown_examples(manifest: Manifest, stage: str | Path, score: Callable[[Image.Image], float] | None = None,
                         clear_factor: float = 1.0) -> None:
    """Add the generated non-photos of :data:`UNKNOWN_KINDS` (``stage/examples/not-a-fish/*.png``) to
    ``manifest.examples``, labelled :data:`UNKNOWN_LABEL`, when the bundle has an unknown detector.

    The demo offers them as "not a fish" examples that must come out as unknown; without a
    detector (``manifest.unknown == {}``) they would read as a species, so none are added. With
    ``score`` (the fp32 model's ``unknown_score`` of an image), each kind is drawn up to
    :data:`UNKNOWN_DRAWS` times until one scores more than ``clear_factor x threshold`` (the export
    passes ``1 + INT8_THRESHOLD_BAND``):
    near the threshold, the int8 file may decide either way within its own bar (export/unknown.py),
    and an example the phone's file calls a fish there would show the demo failing where it does not.
    When no draw clears it, the highest-scoring one is kept and the log says so. The
    bundle writer calls this after :func:`add_examples`. The demo never imports training: the
    images are files in the bundle, made here by ``fieldid.training.negatives``.

    Example:
        >>> add_unknown_examples(manifest, stage)  # doctest: +SKIP
        >>> [e["file"] for e in manifest.examples if e["label"] == UNKNOWN_LABEL]  # doctest: +SKIP
        ['examples/not-a-fish/gradient.png', 'examples/not-a-fish/stripes.png', 'examples/not-a-fish/clouds.png']
    """
    import io

    from fieldid.records import atomic_write_bytes

    if not manifest.unknown:
        return
    stage = Path(stage)
    threshold = float(manifest.unknown["threshold"])
    clear = clear_factor * threshold
    entries = []
    for i, kind in enumerate(UNKNOWN_KINDS):
        best: tuple[float, Any] | None = None
        for draw in range(UNKNOWN_DRAWS):
            img = unknown_example_draw(i, draw)
            value = score(img) if score is not None else float("inf")  # no scorer: the first draw is kept
            if best is None or value > best[0]:
                best = (value, img)
            if value > clear:
                break
        value, img = best
        if value <= clear:
            log.warning("example non-photo %s: none of %d draws scores clear of the threshold's band (best %.3g, "
                        "threshold %.3g): the phone's int8 file may call it a fish", kind, UNKNOWN_DRAWS, value,
                        threshold)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        dest = atomic_write_bytes(stage / EXAMPLES_DIR / _UNKNOWN_FOLDER / f"{kind}.png", buf.getvalue())
        entries.append({"file": dest.relative_to(stage).as_posix(), "label": UNKNOWN_LABEL})
    manifest.examples = [e for e in manifest.examples if e["label"] != UNKNOWN_LABEL] + entries
    log.info("example non-photos: %d generated into %s/%s/", len(entries), EXAMPLES_DIR, _UNKNOWN_FOLDER)
