"""Fixtures for the edge demo tests: a launched Gradio app fed by ``tiny_bundle`` in both modes.

``demo_app`` (session-scoped) serves Dive from ``tiny_bundle`` (a bundle folder) and Shop from
``tiny_run`` (a run folder, to cover both ways of naming a bundle) on a free loopback port.
Its fallback server is a loopback port nobody listens on, i.e. the "server down" case; tests
that need a real TorchServe use ``served_tiny`` from fixtures_serve. The app is closed at the
end of the session. ``tiny_salmon_run`` is a real two-class run (wild/farmed) on a small copy
of the synthetic salmon set, for what depends on the Shop classes and on synthetic data.
"""
from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

from fieldid.serve.config import free_port

__all__ = ["DemoApp", "demo_app", "unused_port", "demo_client", "tiny_salmon_run"]

# A loopback port with nothing listening: the one free-port helper (see its docstring for why).
unused_port = free_port


@dataclass
class DemoApp:
    app: Any  # gradio.Blocks
    url: str
    modes: dict[str, Any]  # key -> edge_demo.modes.DemoMode


def demo_client(url: str) -> Any:
    """A ``gradio_client.Client`` for a local app: no analytics, no file downloads."""
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False, download_files=False)


@pytest.fixture(scope="session")
def demo_app(tiny_bundle: Path, tiny_run: Path) -> Iterator[DemoApp]:
    from fieldid.edge_demo.app import build_app, launch_app
    from fieldid.edge_demo.fallback import ServerConfig
    from fieldid.edge_demo.modes import DemoMode

    # A port bound but never listening, held for the whole session: connecting is refused, and no
    # server started later in the run can be handed it (a claimed-then-freed port could be).
    hold = socket.socket()
    hold.bind(("127.0.0.1", 0))
    down = ServerConfig(f"http://127.0.0.1:{hold.getsockname()[1]}")
    modes = {"dive": DemoMode("dive", tiny_bundle, server=down, timeout=2.0),
             "shop": DemoMode("shop", tiny_run, server=down, timeout=2.0)}
    try:
        app = build_app(list(modes.values()))
        url = launch_app(app, port=unused_port(), block=False, quiet=True)
        try:
            yield DemoApp(app=app, url=url, modes=modes)
        finally:
            app.close()
    finally:
        hold.close()


@pytest.fixture(scope="session")
def tiny_salmon_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny real run (wild/farmed) on ``fieldid data demo salmon`` data, exported to ONNX."""
    from fieldid.export import export_run
    from fieldid.training import TrainConfig
    from fieldid.training.demo_data import make_demo_dataset
    from fieldid.training.train import train

    root = tmp_path_factory.mktemp("salmon")
    data = make_demo_dataset("salmon", root / "data", scale=0.05, image_size=64, progress=False).out
    run = root / "run"
    train(data, run, TrainConfig(epochs=2, head_epochs=1, image_size=64, batch_size=16, seed=0))
    export_run(run, formats=["onnx"])
    return run
