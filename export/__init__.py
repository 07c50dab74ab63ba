"""fieldid export: run directory -> verified phone artifacts + manifest.json.

Torch-free names (``Manifest``, ``load_manifest``, the numpy preprocessing in ``export.phone``)
can be imported without torch; ``export_run`` imports the exporters lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["export_run", "ExportError", "Manifest", "Artifact", "load_manifest", "ManifestError"]

# Exporter modules register themselves in bundle.EXPORTERS when imported.
_EXPORTER_MODULES = ("onnx_export",)


def __getattr__(name: str) -> Any:
    if name in ("Manifest", "Artifact", "load_manifest", "ManifestError"):
        return getattr(importlib.import_module(".manifest", __name__), name)
    if name in ("export_run", "ExportError"):
        bundle = importlib.import_module(".bundle", __name__)
        for mod in _EXPORTER_MODULES:
            importlib.import_module(f".{mod}", __name__)
        return getattr(bundle, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
