"""``STATE_DIR/server.json``: the documented file that says what a running fieldid server is
and how to reach it, written by ``fieldid serve start`` and read by :func:`read_server_state`
(the one function the demo and other clients use; they never parse the file themselves).

Fields (schema_version 1; every later field has a default, so older files stay readable):

* ``pid``, ``create_time`` - the launcher process (leader of the server's process group);
* ``state_dir``, ``config``, ``log_dir`` - where the server keeps its files;
* ``host``, ``ports`` (``inference``, ``management``, ``metrics``, ``grpc_*``) - where it listens;
* ``tls`` + ``certificate`` - the inference API speaks HTTPS with this certificate file;
* ``models`` - ``{name: {"version", "bundle"}}``;
* ``auth`` + ``key_file`` - token authorization and the ``key_file.json`` holding its keys;
* ``started``, ``options`` (the :class:`~fieldid.serve.config.ServeOptions`), ``status``
  (``running`` | ``stopped``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fieldid.records import Record, RecordError

from .archive import ServeError
from .keys import read_token
from .config import url_host

__all__ = ["ServerState", "STATE_FILE", "read_server_state", "load_state"]

STATE_FILE = "server.json"


@dataclass
class ServerState(Record):
    """``STATE_DIR/server.json``: what a running server is and how to reach it."""

    pid: int  # the launcher: leader of the server's process group
    create_time: float  # the launcher's start time (guards against a reused pid)
    state_dir: str
    host: str
    ports: dict[str, int]
    models: dict[str, dict[str, str]]  # name -> {"version", "bundle"}
    auth: bool
    key_file: str  # "" when auth is off
    config: str
    log_dir: str
    started: str
    options: dict[str, Any] = field(default_factory=dict)
    status: str = "running"  # running | stopped
    tls: bool = False  # the inference API speaks HTTPS
    certificate: str = ""  # its certificate (PEM): what a client verifies a self-signed server with

    SCHEMA_VERSION = 1

    def validate(self, source: str = "server.json") -> None:
        """The pid every command reads (stop needs only it); the ports are checked where a URL is made."""
        if isinstance(self.pid, bool) or not isinstance(self.pid, int) or self.pid <= 0:
            raise RecordError(f"{source}: pid must be a positive integer (got {self.pid!r})")

    def _port(self, name: str) -> int:
        port = self.ports.get(name) if isinstance(self.ports, dict) else None
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ServeError(f"{self.state_dir}/{STATE_FILE}: ports.{name} must be a port number (got {port!r}); "
                             "restart the server with `fieldid serve start`")
        return port

    @property
    def inference_url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{'https' if self.tls else 'http'}://{url_host(host)}:{self._port('inference')}"

    @property
    def management_url(self) -> str:
        return f"http://127.0.0.1:{self._port('management')}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self._port('metrics')}"

    def prediction_url(self, model: str) -> str:
        """``http://HOST:PORT/predictions/<model>``."""
        return f"{self.inference_url}/predictions/{model}"

    def token(self, kind: str = "inference") -> str | None:
        """The current key of ``kind`` (``None`` without auth)."""
        return read_token(self.key_file, kind) if self.auth else None


def read_server_state(path: str | Path) -> ServerState:
    """The server described by ``path``: a ``server.json`` file or the state folder holding one.

    Args:
        path: ``STATE_DIR`` or ``STATE_DIR/server.json``.

    Returns:
        The :class:`ServerState` (``.inference_url``, ``.prediction_url(model)``, ``.key_file``,
        ``.tls``, ``.certificate``, ``.models``, ``.status``).

    Raises:
        ServeError: no server was ever started there, or the file is not a server state.

    Example:
        >>> st = read_server_state("runs/reef/serve")  # doctest: +SKIP
        >>> st.prediction_url("reef")  # doctest: +SKIP
        'http://127.0.0.1:8080/predictions/reef'
    """
    p = Path(path)
    file = p if p.name == STATE_FILE or p.is_file() else p / STATE_FILE
    if not file.is_file():
        raise ServeError(f"no server state in {p} (start one with `fieldid serve start`)")
    try:
        return ServerState.from_json(file)
    except (ValueError, TypeError, KeyError) as e:
        raise ServeError(f"{file}: not a fieldid server state ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


def load_state(state_dir: str | Path) -> ServerState:
    """``STATE_DIR/server.json`` (same as :func:`read_server_state`)."""
    return read_server_state(state_dir)
