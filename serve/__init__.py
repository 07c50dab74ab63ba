"""fieldid serve: the full-precision fallback server (TorchServe) for export bundles.

* :mod:`fieldid.serve.engine` - ``ClassifierEngine``: bytes -> answer with ONNX Runtime on the
  bundle's verified ONNX file, independent of TorchServe (no torch, no ``fieldid.training``).
* :mod:`fieldid.serve.fieldid_handler` - the thin TorchServe adapter packed into every ``.mar``.
* :mod:`fieldid.serve.archive` - bundle -> ``<name>.mar``.
* :mod:`fieldid.serve.config` - ``ServeOptions`` and the ``config.properties`` rendered from them.
* :mod:`fieldid.serve.state` - ``server.json``, the documented server state; ``read_server_state``.
* :mod:`fieldid.serve.server` - start/stop/status (process supervision) with safe defaults.
* :mod:`fieldid.serve.client` - ``predict(url, image_bytes, token=..., ca_file=...)``,
  ``token_for(url, key_file)`` (stdlib only).

Names are imported lazily, so ``import fieldid.serve`` never pulls in torch or onnxruntime.
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "ClassifierEngine", "archive_bundle", "build_model_store", "ServeError", "ServeOptions", "ServerState",
    "start_server", "stop_server", "server_status", "predict", "PredictionError", "ServeClient", "read_token",
    "token_for", "KeyFileError", "read_server_state",
]

_WHERE = {
    "ClassifierEngine": "engine",
    "archive_bundle": "archive", "build_model_store": "archive", "ServeError": "archive",
    "ServeOptions": "config", "ServerState": "state", "read_server_state": "state", "start_server": "server", "stop_server": "server",
    "server_status": "server",
    "predict": "client", "PredictionError": "client", "ServeClient": "client", "read_token": "client",
    "token_for": "client", "KeyFileError": "client",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
