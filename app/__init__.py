"""fieldid app: the phone's own browser runs the bundle's ONNX model (onnxruntime-web), offline.

``fieldid app build`` turns one or two export bundles into a static, installable web app (PWA);
``fieldid app serve`` serves such a folder for testing. Names are re-exported lazily (the package
stays cheap to import for ``fieldid --help``).

Example:
    >>> from fieldid.app import build_app, resolve_modes  # doctest: +SKIP
    >>> build_app(resolve_modes([("run", "runs/reef"), ("run", "runs/salmon")]), "build/app")  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["AppBuildError", "AppMode", "build_app", "resolve_modes", "load_app_config", "make_server",
           "running_app_server", "ISOLATION_HEADERS"]

_WHERE = {"AppBuildError": "build", "AppMode": "build", "build_app": "build", "resolve_modes": "build",
          "load_app_config": "build", "make_server": "server", "running_app_server": "server",
          "ISOLATION_HEADERS": "server"}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
