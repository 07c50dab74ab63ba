"""A real TorchServe for tests: ``torchserve_server(...)`` context manager and the ``served_tiny`` fixture.

Reuse from any test module (conftest.py imports this file)::

    def test_fallback(served_tiny, tiny_bundle):
        ans = served_tiny.predict(jpeg_bytes)               # 200 answer dict, raises PredictionError
        status, body = served_tiny.request(jpeg_bytes)      # (status, parsed JSON) without raising
        served_tiny.url, served_tiny.token, served_tiny.key_file, served_tiny.model

``served_tiny`` is session-scoped (one TorchServe start for the whole run; ~15 s), serves
``tiny_bundle`` on CPU with token auth ON, batching on (batch 4, 20 ms), a 1 MP pixel limit
and a 2 MB request limit, on free loopback ports with its own state directory, and is stopped (all
processes verified gone) at the end of the session. Tests that disturb it (kill a worker)
must leave it READY again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest

__all__ = ["Served", "torchserve_server", "served_tiny", "SERVED_TINY_OPTIONS"]

# Small limits so the bad-input tests need only small files. device="cpu": the tests compare
# answers with fp32 references at 1e-4; on a GPU machine "auto" would serve fp16 (the GPU path
# has its own test, test_serve_unit.py::test_engine_on_cuda_matches_cpu, at its own tolerance).
SERVED_TINY_OPTIONS: dict[str, Any] = {"batch_size": 4, "max_batch_delay_ms": 20, "max_pixels": 1_000_000,
                                       "max_request_mb": 2.0, "workers": 1, "threads": 1, "device": "cpu"}


@dataclass
class Served:
    """A running test server: URLs, model names and credentials."""

    state: Any  # serve.server.ServerState

    @property
    def state_dir(self) -> Path:
        return Path(self.state.state_dir)

    @property
    def base_url(self) -> str:
        """Inference API root, e.g. ``http://127.0.0.1:PORT``."""
        return self.state.inference_url

    @property
    def management_url(self) -> str:
        return self.state.management_url

    @property
    def models(self) -> list[str]:
        return list(self.state.models)

    @property
    def model(self) -> str:
        """The first (usually only) model's name."""
        return self.models[0]

    @property
    def url(self) -> str:
        """Prediction URL of :attr:`model`."""
        return self.state.prediction_url(self.model)

    def url_for(self, model: str) -> str:
        return self.state.prediction_url(model)

    @property
    def key_file(self) -> Path | None:
        return Path(self.state.key_file) if self.state.auth else None

    @property
    def token(self) -> str | None:
        """Current inference key (``None`` when auth is off)."""
        return self.state.token("inference")

    @property
    def management_token(self) -> str | None:
        return self.state.token("management")

    @property
    def ca_file(self) -> Path | None:
        """The server's own (self-signed) certificate when it speaks HTTPS, else ``None``."""
        return Path(self.state.certificate) if getattr(self.state, "tls", False) else None

    def predict(self, data: bytes, model: str | None = None) -> dict[str, Any]:
        from fieldid.serve.client import predict

        return predict(self.url_for(model or self.model), data, token=self.token, timeout=60, ca_file=self.ca_file)

    def request(self, data: bytes, model: str | None = None, content_type: str | None = None) -> tuple[int, Any]:
        from fieldid.serve.client import ServeClient

        with ServeClient(self.url_for(model or self.model), self.token, timeout=60, ca_file=self.ca_file) as c:
            return c.request(data, content_type)


@contextlib.contextmanager
def torchserve_server(bundle_dirs: list[Path], state_dir: Path, **opts: Any) -> Iterator[Served]:
    """Start a real TorchServe for ``bundle_dirs`` on free loopback ports; stop it on exit.

    Args:
        bundle_dirs: export bundles (or run folders) to serve.
        state_dir: the server's own state directory (use a tmp path).
        **opts: :class:`fieldid.serve.server.ServeOptions` fields (e.g. ``auth=False``, ``batch_size=8``).

    Yields:
        :class:`Served`. On exit the server is stopped and no process of it may remain.
    """
    from fieldid.serve.server import ServeOptions, load_state, server_processes, start_server, stop_server

    options = ServeOptions.on_free_ports(**opts)
    state = start_server(list(bundle_dirs), state_dir, options)
    try:
        yield Served(state)
    finally:
        stop_server(state_dir)
        left = server_processes(load_state(state_dir))
        assert not left, f"TorchServe processes left behind: {left}"


@pytest.fixture(scope="session")
def served_tiny(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``tiny_bundle`` behind a real TorchServe (auth on, batching on); see the module docstring."""
    with torchserve_server([tiny_bundle], tmp_path_factory.mktemp("served_tiny"), **SERVED_TINY_OPTIONS) as s:
        yield s
