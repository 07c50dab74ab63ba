"""fieldid export: run directory -> verified phone artifacts + manifest.json.

Torch-free names (``Manifest``, ``load_manifest``, the numpy preprocessing in ``fieldid.export.phone``)
can be imported without torch; ``export_run`` and ``bench_run`` import the exporters lazily.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["import_exporters", "export_run", "ExportError", "bench_run", "BenchError", "Manifest", "Artifact", "load_manifest",
           "ManifestError"]

# Exporter modules register themselves in bundle.EXPORTERS / RUNTIMES / LABEL_READERS when imported.
_EXPORTER_MODULES = ("onnx_export", "executorch_export", "torchscript_export", "coreml_export")


def import_exporters() -> None:
    """Import every exporter module, so that ``bundle.EXPORTERS`` / ``RUNTIMES`` / ``LABEL_READERS`` are full."""
    for mod in _EXPORTER_MODULES:
        importlib.import_module(f".{mod}", __name__)


_import_exporters = import_exporters  # the name export's own modules use


def __getattr__(name: str) -> Any:
    if name in ("Manifest", "Artifact", "load_manifest", "ManifestError"):
        return getattr(importlib.import_module(".manifest", __name__), name)
    if name in ("export_run", "ExportError"):
        bundle = importlib.import_module(".bundle", __name__)
        _import_exporters()
        return getattr(bundle, name)
    if name in ("bench_run", "BenchError"):
        return getattr(importlib.import_module(".bench", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
