"""fieldid edge_demo: a Gradio field app that behaves like the phone app it imitates.

The bundle's ONNX model runs on the device through the phone contract
(:class:`fieldid.export.phone.PhoneModel`; this package never imports torch); only when the device is unsure does the photo go to the
TorchServe server. Names are re-exported lazily: importing the package (as ``fieldid --help``
does) loads neither Gradio nor ONNX Runtime.

Example:
    >>> from fieldid.edge_demo import DemoMode, build_app, launch_app  # doctest: +SKIP
    >>> app = build_app([DemoMode("dive", "runs/reef"), DemoMode("shop", "runs/salmon")])  # doctest: +SKIP
    >>> launch_app(app, port=7860)  # doctest: +SKIP
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "DemoError", "bundle_dir_of",
    "ServerConfig", "ServerReply", "ask_server", "find_server",
    "Example", "example_images", "data_origin",
    "DemoMode", "Outcome", "MODES",
    "build_app", "launch_app",
]

_WHERE = {
    "DemoError": "device", "bundle_dir_of": "device",
    "ServerConfig": "fallback", "ServerReply": "fallback", "ask_server": "fallback", "find_server": "fallback",
    "Example": "examples", "example_images": "examples", "data_origin": "examples",
    "DemoMode": "modes", "Outcome": "modes", "MODES": "modes",
    "build_app": "app", "launch_app": "app",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
