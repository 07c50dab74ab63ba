"""fieldid: a folder of photos in, a verified phone-ready image classifier out.

One import name. The stages live in subpackages, in data-flow order:
:mod:`fieldid.training` (dataset -> run directory), :mod:`fieldid.export` (run -> bundle with
``manifest.json``), :mod:`fieldid.serve` (bundle -> TorchServe fallback server),
:mod:`fieldid.edge_demo` (bundle -> field demo) and :mod:`fieldid.app` (bundle -> phone web app).
The Python API (:mod:`fieldid.api`) is five plain functions and two handles::

    run = fieldid.train("photos/", "runs/fish", epochs=10)    # -> Run
    fieldid.evaluate(run)                                      # held-out metrics
    bundle = fieldid.export_bundle(run)                        # -> Bundle (verified artifacts)
    fieldid.predict(bundle, ["photo.jpg"])                     # answers, as the phone gives them
    fieldid.serve_bundles(bundle)                              # TorchServe fallback server

``import fieldid`` stays torch-free: every name below is imported on first use (type checkers
see the real definitions through the ``TYPE_CHECKING`` imports).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

if TYPE_CHECKING:  # what type checkers and IDEs resolve; at run time __getattr__ imports on first use
    from fieldid.api import Bundle, Run, evaluate, export_bundle, predict, serve_bundles, train
    from fieldid.cli import build_parser, main

__all__ = ["__version__", "main", "build_parser", "train", "evaluate", "export_bundle", "predict", "serve_bundles",
           "Run", "Bundle"]

# name -> module that defines it; resolved lazily so `import fieldid` never pulls in torch.
_LAZY = {
    "main": "fieldid.cli",
    "build_parser": "fieldid.cli",
    "train": "fieldid.api", "evaluate": "fieldid.api", "export_bundle": "fieldid.api", "predict": "fieldid.api",
    "serve_bundles": "fieldid.api", "Run": "fieldid.api", "Bundle": "fieldid.api",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
