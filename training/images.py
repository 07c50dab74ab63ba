"""Finding and decoding photos in ImageFolder trees. Torch-free.

Which files are photos and how they decode is :mod:`fieldid.intake`, the one policy every part
uses (formats incl. HEIC, the pixel limit, EXIF orientation); this module applies it to folders.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from fieldid.intake import EXTENSIONS, MAX_PIXELS, ImageInputError, is_image_path, open_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_PIXELS",
    "SPLIT_NAMES",
    "DataError",
    "ImageError",
    "load_rgb",
    "is_image_file",
    "class_folders",
    "list_images",
    "list_other_files",
    "ImageFolderListing",
    "scan_image_folder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = EXTENSIONS  # incl. .heic/.heif: iPhone photos train like any other
SPLIT_NAMES = ("train", "val", "test")


class DataError(ValueError):
    """A dataset folder that cannot be used (missing, empty, a single class, ...)."""


# A file that is not a usable image: the intake policy's error (``.status``, ``.reason``).
ImageError = ImageInputError


def is_image_file(path: Path) -> bool:
    """A visible file with a photo extension (:func:`fieldid.intake.is_image_path`)."""
    return is_image_path(path) and path.is_file()


def load_rgb(path: str | Path, *, target: int | None = None) -> Image.Image:
    """Decode ``path`` as RGB with EXIF orientation applied (:func:`fieldid.intake.open_image`).

    Args:
        target: the shorter side the caller resizes to; JPEGs then decode at reduced size.

    Raises:
        ImageError: unsupported format, unreadable (truncated, malformed EXIF, unreadable
            file), or over the pixel limit; the message starts with the path.
    """
    try:
        return open_image(Path(path), target=target)
    except OSError as e:  # the file itself: permissions, vanished, a folder named *.jpg
        raise ImageError(f"{path}: {type(e).__name__}: {e.strerror or e}", 415, "unreadable") from None


def class_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that name classes (sorted; hidden folders ignored)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted for determinism)."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def list_other_files(folder: Path) -> list[Path]:
    """Visible entries below ``folder`` that training does not read: files that are not photos by
    their name (``.gif``, ``.txt``, RAW, ...), and anything that is neither a file nor a folder
    (a broken link, a FIFO), whatever its name.

    ``fieldid data check`` lists them as skipped. Hidden files (``.DS_Store``, ``._IMG_1.jpg``) and
    files in hidden folders are system clutter, not photos.
    """
    return sorted(p for p in folder.rglob("*")
                  if not p.is_dir() and (not p.is_file() or not is_image_path(p))
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


@dataclass
class ImageFolderListing:
    """What is on disk: per split (``"all"`` when not pre-split) the class -> files map."""

    root: Path
    presplit: bool
    splits: dict[str, dict[str, list[Path]]]
    # Files in class folders that are not photos by name (see list_other_files), in listing order.
    others: list[Path] = field(default_factory=list)

    @property
    def labels(self) -> list[str]:
        names: set[str] = set()
        for classes in self.splits.values():
            names.update(classes)
        return sorted(names)


def scan_image_folder(root: str | Path, *, require_images: bool = True, min_classes: int = 2) -> ImageFolderListing:
    """List an ImageFolder tree, pre-split (``train/`` [``val/``, ``test/``]) or flat.

    ``min_classes``: 2 to train on; 1 to evaluate on (field photos of one species are a fair test).

    Raises:
        DataError: missing/empty directory, a class folder without images, fewer than ``min_classes`` classes.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    presplit = (root / "train").is_dir()
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()} if presplit else {"all": root}
    if presplit:
        # Photo folders beside train/ (valid/, unlabelled/, a stray class) are not read: say so, once.
        # any(): one photo says a folder holds photos; listing all of an unlabelled/ folder would not.
        stray = sorted(f.name for f in class_folders(root)
                       if f.name not in SPLIT_NAMES and any(is_image_file(p) for p in f.rglob("*")))
        if stray:
            hint = "; fieldid reads val/, not valid/ or validation/" if {"valid", "validation"} & set(stray) else ""
            log.warning("%s: photo folder(s) %s beside train/ are not used (splits: %s)%s", root,
                        ", ".join(stray[:5]), ", ".join(SPLIT_NAMES), hint)
    splits: dict[str, dict[str, list[Path]]] = {}
    others: list[Path] = []
    for split, sdir in split_dirs.items():
        folders = class_folders(sdir)
        if not folders:
            raise DataError(f"{sdir}: no class folders (expected {sdir}/<class>/<image files>)")
        classes = {}
        for f in folders:
            files, rest = list_images(f), list_other_files(f)
            if require_images and not files:
                found = (f"; found {len(rest)} other files ({', '.join(sorted({p.suffix.lower() or p.name for p in rest}))})"
                         if rest else "")
                raise DataError(f"{f}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)}){found}")
            classes[f.name] = files
            others += rest
        splits[split] = classes
    listing = ImageFolderListing(root=root, presplit=presplit, splits=splits, others=others)
    main = splits["train" if presplit else "all"]
    if len(main) < min_classes:
        raise DataError(f"{root}: found {len(main)} class{'' if len(main) == 1 else 'es'} ({', '.join(main)}); "
                        f"need at least {min_classes} class{'' if min_classes == 1 else 'es'}")
    if presplit:
        for split, classes in splits.items():
            extra = sorted(set(classes) - set(main))
            if extra:
                raise DataError(f"{root}/{split}: classes {', '.join(extra)} are not in train/")
    return listing
