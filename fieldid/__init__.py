"""fieldid: a folder of photos in, a verified phone-ready image classifier out.

One import name. The stages live in subpackages, in data-flow order:
:mod:`fieldid.training` (dataset -> run directory), :mod:`fieldid.export` (run -> bundle with
``manifest.json``), :mod:`fieldid.serve` (bundle -> TorchServe fallback server) and
:mod:`fieldid.edge_demo` (bundle -> field app). ``import fieldid`` stays torch-free: every name
below is imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

__all__ = ["__version__", "main", "build_parser"]

# name -> module that defines it; resolved lazily so `import fieldid` never pulls in torch.
_LAZY = {
    "main": "fieldid.cli",
    "build_parser": "fieldid.cli",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
