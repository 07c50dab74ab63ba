"""fieldid: a folder of photos in, a verified phone-ready image classifier out.

One import name. The stages live in subpackages, in data-flow order:
:mod:`fieldid.training` (dataset -> run directory), :mod:`fieldid.export` (run -> bundle with
``manifest.json``), :mod:`fieldid.serve` (bundle -> TorchServe fallback server) and
:mod:`fieldid.edge_demo` (bundle -> field app). The Python API (:mod:`fieldid.api`) is five calls::

    run = fieldid.train("photos/", "runs/fish", epochs=10)    # -> Run
    run.evaluate()                                             # held-out metrics
    bundle = fieldid.export(run)                               # -> Bundle (verified artifacts)
    bundle.predict(["photo.jpg"])                              # answers, as the phone gives them
    fieldid.serve(bundle)                                      # TorchServe fallback server

``import fieldid`` stays torch-free: every name below is imported on first use.
``fieldid.export`` and ``fieldid.serve`` are the subpackages, made callable as the API functions
(see :mod:`fieldid.callable_module`).
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

__all__ = ["__version__", "main", "build_parser", "train", "evaluate", "export", "predict", "serve", "Run", "Bundle"]

# name -> module that defines it; resolved lazily so `import fieldid` never pulls in torch.
_LAZY = {
    "main": "fieldid.cli",
    "build_parser": "fieldid.cli",
    "train": "fieldid.api", "evaluate": "fieldid.api", "predict": "fieldid.api", "Run": "fieldid.api",
    "Bundle": "fieldid.api",
}
# Subpackages that are also API calls: the (callable) subpackage itself is the name.
_CALLABLE_SUBPACKAGES = ("export", "serve")


def __getattr__(name: str) -> Any:
    if name in _CALLABLE_SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY) | set(_CALLABLE_SUBPACKAGES))
