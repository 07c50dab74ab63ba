"""Finding and decoding photos in ImageFolder trees. Torch-free.

Phone photos carry their rotation in EXIF; we apply it on load everywhere (training, data
check, export calibration, serving) so the model sees what the user saw.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

__all__ = [
    "IMAGE_EXTENSIONS",
    "SPLIT_NAMES",
    "DataError",
    "ImageError",
    "load_rgb",
    "is_image_file",
    "class_folders",
    "list_images",
    "ImageFolderListing",
    "scan_image_folder",
]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "val", "test")
# Decompression-bomb guard: a 100 MP phone photo is the largest we accept.
MAX_PIXELS = 100_000_000


class DataError(ValueError):
    """A dataset folder that cannot be used (missing, empty, a single class, ...)."""


class ImageError(ValueError):
    """A file that is not a readable image."""


def is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode ``path`` fully as RGB with EXIF orientation applied.

    Raises:
        ImageError: unreadable, truncated, or absurdly large.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > MAX_PIXELS:
                    raise ImageError(f"{path}: {im.width}x{im.height} exceeds {MAX_PIXELS} pixels")
                im.load()
                im = ImageOps.exif_transpose(im)
                return im.convert("RGB")
    except ImageError:
        raise
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        raise ImageError(f"{path}: {type(e).__name__}: {e}") from None


def class_folders(root: Path) -> list[Path]:
    """Sub-folders of ``root`` that name classes (sorted; hidden folders ignored)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted for determinism)."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


@dataclass
class ImageFolderListing:
    """What is on disk: per split (``"all"`` when not pre-split) the class -> files map."""

    root: Path
    presplit: bool
    splits: dict[str, dict[str, list[Path]]]

    @property
    def labels(self) -> list[str]:
        names: set[str] = set()
        for classes in self.splits.values():
            names.update(classes)
        return sorted(names)


def scan_image_folder(root: str | Path, *, require_images: bool = True) -> ImageFolderListing:
    """List an ImageFolder tree, pre-split (``train/`` [``val/``, ``test/``]) or flat.

    Raises:
        DataError: missing/empty directory, a class folder without images, fewer than 2 classes.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"{root}: no such directory")
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    presplit = (root / "train").is_dir()
    split_dirs = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()} if presplit else {"all": root}
    splits: dict[str, dict[str, list[Path]]] = {}
    for split, sdir in split_dirs.items():
        folders = class_folders(sdir)
        if not folders:
            raise DataError(f"{sdir}: no class folders (expected {sdir}/<class>/<image files>)")
        classes = {}
        for f in folders:
            files = list_images(f)
            if require_images and not files:
                raise DataError(f"{f}: class folder has no images ({', '.join(IMAGE_EXTENSIONS)})")
            classes[f.name] = files
        splits[split] = classes
    listing = ImageFolderListing(root=root, presplit=presplit, splits=splits)
    main = splits["train" if presplit else "all"]
    if len(main) < 2:
        raise DataError(f"{root}: found {len(main)} class ({', '.join(main)}); need at least 2 classes")
    if presplit:
        for split, classes in splits.items():
            extra = sorted(set(classes) - set(main))
            if extra:
                raise DataError(f"{root}/{split}: classes {', '.join(extra)} are not in train/")
    return listing
