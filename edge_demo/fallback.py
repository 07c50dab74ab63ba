"""The server fallback: send the photo to TorchServe when the device is unsure.

A phone must never hang or crash because the server is away: :func:`ask_server` never raises
for network or HTTP trouble; it returns a :class:`ServerReply` whose ``message`` says what
happened, and the app keeps showing the on-device answer. The HTTP call is
:func:`fieldid.serve.client.predict` (stdlib only, torch-free); :func:`find_server` reads the state a
``fieldid serve start`` left behind, so the demo finds the server's URL and key file itself.
"""
from __future__ import annotations

import http.client
import socket
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
    """Where a mode's fallback goes: inference API root and the key file (None: no token)."""

    url: str
    key_file: Path | None = None


def find_server(model: str, state_dirs: Iterable[str | Path]) -> ServerConfig | None:
    """The server started by ``fieldid serve start`` that serves ``model``, from its ``server.json``.

    Args:
        model: the model name on the server (the bundle's manifest name).
        state_dirs: server state directories to look in, first match wins.

    Returns:
        URL and key file of the first state directory whose server serves ``model``, or None.
        The server need not be running now: a stopped one is reported when asked.

    Example:
        >>> find_server("reef", ["runs/reef/serve"])  # doctest: +SKIP
        ServerConfig(url='http://127.0.0.1:8080', key_file=PosixPath('runs/reef/serve/key_file.json'))
    """
    from fieldid.serve.server import STATE_FILE, load_state

    for d in state_dirs:
        if not (Path(d) / STATE_FILE).is_file():
            continue
        try:
            state = load_state(d)
        except ValueError:
            continue
        if model in state.models:
            return ServerConfig(state.inference_url, Path(state.key_file) if state.auth and state.key_file else None)
    return None


def _explain(e: Any, model: str, key_file: Path | None) -> str:
    body = e.body if isinstance(e.body, dict) else {}
    detail = str(body.get("error") or body.get("message") or e.body)[:200]
    if e.status in (400, 401, 403) and "token" in detail.lower():
        return f"the server refused the token (HTTP {e.status}); check the key file {key_file or '(none given)'}"
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
    from fieldid.serve.client import PredictionError, predict, read_token

    token = None
    if server.key_file is not None:
        if not server.key_file.is_file():  # sending no token would only earn "refused the token"
            return ServerReply(ok=False, message=f"key file {server.key_file} not found; start the server with "
                                                 f"`fieldid serve start` or give --key-file")
        try:
            token = read_token(server.key_file)
        except (ValueError, OSError) as e:
            return ServerReply(ok=False, message=f"cannot read the key file: {e}")
    url = f"{server.url.rstrip('/')}/predictions/{model}"
    t0 = time.perf_counter()
    try:
        d = predict(url, image_bytes, token=token, timeout=timeout)
    except PredictionError as e:
        return ServerReply(ok=False, status=e.status, round_trip_ms=_ms_since(t0),
                           message=_explain(e, model, server.key_file))
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
