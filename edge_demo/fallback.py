"""The server fallback: send the photo to TorchServe when the device is unsure.

A phone must never hang or crash because the server is away: :func:`ask_server` never raises
for network or HTTP trouble; it returns a :class:`ServerReply` whose ``message`` says what
happened, and the app keeps showing the on-device answer. The HTTP call is
:func:`fieldid.serve.client.predict` (stdlib only, torch-free); :func:`find_server` reads the state a
``fieldid serve start`` left behind (through :func:`fieldid.serve.state.read_server_state`, the one
documented reader of ``server.json``), so the demo finds the server's URL, key file and certificate.

A key goes only to the server its key file belongs to (:func:`fieldid.serve.client.token_for`):
asked to use another server, the demo sends no token and says that server needs ``--key-file``.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

__all__ = ["DEFAULT_SERVER", "DEFAULT_TIMEOUT_S", "ServerReply", "ServerConfig", "ask_server", "find_server"]

DEFAULT_SERVER = "http://127.0.0.1:8080"  # TorchServe's default inference address
DEFAULT_TIMEOUT_S = 5.0


@dataclass
class ServerReply:
    """What came back from the server.

    ``ok`` is True only when ``response`` holds a valid answer in the shared schema.
    ``round_trip_ms`` is what the user waited (network + server), measured here.
    """

    ok: bool
    message: str
    response: dict[str, Any] | None = None
    status: int | None = None
    round_trip_ms: float | None = None


@dataclass(frozen=True)
class ServerConfig:
    """Where a mode's fallback goes: inference API root, the key file (None: no token) and, for an
    ``https`` server, the CA file to verify it with (None: the system's trusted CAs)."""

    url: str
    key_file: Path | None = None
    ca_file: Path | None = None


def find_server(model: str, state_dirs: Iterable[str | Path]) -> ServerConfig | None:
    """The server started by ``fieldid serve start`` that serves ``model``, from its ``server.json``.

    Args:
        model: the model name on the server (the bundle's manifest name).
        state_dirs: server state directories to look in, first match wins.

    Returns:
        URL, key file and (for a TLS server) its certificate as the CA file, of the first state
        directory whose server serves ``model``, or None. The server need not be running now: a
        stopped one is reported when asked.

    Example:
        >>> find_server("reef", ["runs/reef/serve"])  # doctest: +SKIP
        ServerConfig(url='http://127.0.0.1:8080', key_file=PosixPath('runs/reef/serve/key_file.json'))
    """
    from fieldid.serve.state import read_server_state

    for d in state_dirs:
        try:
            state = read_server_state(d)
        except ValueError:  # ServeError: no server was started there (or not a server state)
            continue
        if model in state.models:
            return ServerConfig(state.inference_url, Path(state.key_file) if state.auth and state.key_file else None,
                                Path(state.certificate) if state.tls and state.certificate else None)
    return None


def _explain(e: Any, model: str, key_file: Path | None, note: str = "") -> str:
    body = e.body if isinstance(e.body, dict) else {}
    detail = str(body.get("error") or body.get("message") or e.body)[:200]
    if e.status in (400, 401, 403) and "token" in detail.lower():
        if note or key_file is None:  # no token was sent
            from fieldid.serve.client import NEEDS_KEY_FILE

            return f"the server wants a token (HTTP {e.status}): {note or NEEDS_KEY_FILE}"
        return f"the server refused the token (HTTP {e.status}); check the key file {key_file}"
    if e.status == 404:
        return f"the server has no model named {model!r} (HTTP 404)"
    return f"the server answered HTTP {e.status}: {detail}"


def _valid_response(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("top_k"), list) and bool(d["top_k"]) and "confidence" in d


def ask_server(server: ServerConfig, model: str, image_bytes: bytes, *,
               timeout: float = DEFAULT_TIMEOUT_S) -> ServerReply:
    """POST the photo to ``{server.url}/predictions/{model}`` and say what happened.

    Args:
        server: inference API root and key file (its inference key is read on every call:
            TorchServe writes new keys whenever it starts).
        model: the model name on the server (the bundle's manifest name).
        image_bytes: the photo as the user gave it (the server decodes it itself).
        timeout: seconds to wait for connect and for the answer.

    Returns:
        A :class:`ServerReply`; never raises for an unreachable, slow or failing server.

    Example:
        >>> r = ask_server(ServerConfig("http://127.0.0.1:9"), "reef", b"...", timeout=0.5)  # doctest: +SKIP
        >>> r.ok, r.message  # doctest: +SKIP
        (False, 'the server at http://127.0.0.1:9 is not reachable (connection refused)')
    """
    from fieldid.serve.client import KeyFileError, PredictionError, predict, token_for

    url = f"{server.url.rstrip('/')}/predictions/{model}"
    note = ""
    try:
        token = token_for(url, server.key_file)
    except KeyFileError as e:
        if server.key_file is not None and not server.key_file.is_file():
            return ServerReply(ok=False, message=str(e))  # sending no token would only earn "refused"
        token, note = None, str(e)  # another server's key: ask without one (it may need none)
    except ValueError as e:  # not an http(s) URL
        return ServerReply(ok=False, message=str(e))
    t0 = time.perf_counter()
    try:
        d = predict(url, image_bytes, token=token, timeout=timeout, ca_file=server.ca_file)
    except PredictionError as e:
        return ServerReply(ok=False, status=e.status, round_trip_ms=_ms_since(t0),
                           message=_explain(e, model, server.key_file, note))
    except ssl.SSLCertVerificationError as e:
        return ServerReply(ok=False, message=f"the certificate of {server.url} could not be verified "
                                             f"({e.verify_message}); give --ca-file with its CA or certificate")
    except (socket.timeout, TimeoutError):
        return ServerReply(ok=False, message=f"the server at {server.url} did not answer within {timeout:g} s")
    except ConnectionRefusedError:
        return ServerReply(ok=False, message=f"the server at {server.url} is not reachable (connection refused)")
    except (OSError, http.client.HTTPException) as e:
        return ServerReply(ok=False, message=f"the server at {server.url} is not reachable ({type(e).__name__})")
    except ValueError as e:  # not an http(s) URL
        return ServerReply(ok=False, message=str(e))
    if not _valid_response(d):
        return ServerReply(ok=False, status=200, round_trip_ms=_ms_since(t0),
                           message="the server's answer is not a fieldid prediction")
    return ServerReply(ok=True, status=200, round_trip_ms=_ms_since(t0), response=d, message="")


def _ms_since(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1e3, 3)
