"""The demo's errors and bundle lookup. The on-device path itself is the phone contract.

Every on-device answer of the demo comes from :class:`fieldid.export.phone.PhoneModel` (decode,
preprocess, the ONNX file :func:`fieldid.export.phone.select_artifact` picks, calibration,
unknown score, fallback decision): the same code the server, the web app's build and
``fieldid predict`` use. Like a phone, this package never imports torch.
"""
from __future__ import annotations

from pathlib import Path

from fieldid.export.manifest import ManifestError

__all__ = ["DemoError", "bundle_dir_of"]


class DemoError(ValueError):
    """The demo cannot run as asked (no bundle, an unknown mode, more models than modes, ...)."""


def bundle_dir_of(path: str | Path) -> Path:
    """A bundle folder, or a run folder -> its ``export/`` bundle (:func:`fieldid.export.manifest.bundle_dir_of`).

    Raises:
        DemoError: neither holds a ``manifest.json``.

    Example:
        >>> bundle_dir_of("runs/reef")  # doctest: +SKIP
        PosixPath('runs/reef/export')
    """
    from fieldid.export.manifest import bundle_dir_of as find_bundle  # torch-free

    try:
        return find_bundle(path)
    except ManifestError as e:
        raise DemoError(str(e)) from None
