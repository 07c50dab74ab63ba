"""The server fallback: send the photo to TorchServe when the device is unsure.

A phone must never hang or crash because the server is away: :func:`ask_server` never raises
for network or HTTP trouble; it returns a :class:`ServerReply` whose ``message`` says what
happened, and the app keeps showing the on-device answer.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SERVER", "DEFAULT_TIMEOUT_S", "ServerReply", "ask_server", "read_inference_key"]

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


def read_inference_key(key_file: str | Path | None) -> str | None:
    """The inference token from TorchServe's ``key_file.json``; None when there is no file.

    Read on every request because TorchServe writes a new key on each start.

    Raises:
        ValueError: the file exists but holds no inference key.

    Example:
        >>> read_inference_key(None) is None
        True
    """
    if key_file is None or not Path(key_file).is_file():
        return None
    try:
        key = json.loads(Path(key_file).read_text())["inference"]["key"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{key_file}: not a TorchServe key file (no inference.key)") from None
    if not isinstance(key, str) or not key:
        raise ValueError(f"{key_file}: empty inference key")
    return key


def _error_text(body: bytes) -> str:
    try:
        d = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:200]
    if isinstance(d, dict):
        return str(d.get("error") or d.get("message") or d)[:200]
    return str(d)[:200]


def _explain(status: int, detail: str, model: str, key_file: str | Path | None) -> str:
    if status == 400 and "token" in detail.lower():
        return f"the server refused the token (HTTP 400); check the key file {key_file or '(none given)'}"
    if status == 404:
        return f"the server has no model named {model!r} (HTTP 404)"
    return f"the server answered HTTP {status}: {detail}"


def _valid_response(d: Any) -> bool:
    return isinstance(d, dict) and isinstance(d.get("top_k"), list) and bool(d["top_k"]) and "confidence" in d


def ask_server(server: str, model: str, image_bytes: bytes, *, key_file: str | Path | None = None,
               timeout: float = DEFAULT_TIMEOUT_S) -> ServerReply:
    """POST the photo to ``{server}/predictions/{model}`` and return what happened.

    Args:
        server: base URL of the TorchServe inference API, e.g. ``http://127.0.0.1:8080``.
        model: the model name on the server (the bundle's manifest name).
        image_bytes: the photo as the user gave it (the server decodes it itself).
        key_file: TorchServe's ``key_file.json``; its inference key is sent as a Bearer token.
        timeout: seconds to wait for connect and for the answer.

    Returns:
        A :class:`ServerReply`; never raises for an unreachable, slow or failing server.

    Example:
        >>> r = ask_server("http://127.0.0.1:9", "reef", b"...", timeout=0.5)  # doctest: +SKIP
        >>> r.ok, r.message
        (False, 'the server at http://127.0.0.1:9 is not reachable (connection refused)')
    """
    import requests  # only needed when the fallback is really used

    try:
        token = read_inference_key(key_file)
    except ValueError as e:
        return ServerReply(ok=False, message=str(e))
    url = f"{server.rstrip('/')}/predictions/{model}"
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    t0 = time.perf_counter()
    try:
        r = requests.post(url, data=image_bytes, headers=headers, timeout=timeout)
    except requests.exceptions.Timeout:
        return ServerReply(ok=False, message=f"the server at {server} did not answer within {timeout:g} s")
    except requests.exceptions.ConnectionError as e:
        why = "connection refused" if "refused" in str(e).lower() else "cannot connect"
        return ServerReply(ok=False, message=f"the server at {server} is not reachable ({why})")
    except requests.exceptions.RequestException as e:
        return ServerReply(ok=False, message=f"request to {server} failed ({type(e).__name__})")
    rtt = round((time.perf_counter() - t0) * 1e3, 3)
    if r.status_code != 200:
        return ServerReply(ok=False, status=r.status_code, round_trip_ms=rtt,
                           message=_explain(r.status_code, _error_text(r.content), model, key_file))
    try:
        d = r.json()
    except ValueError:
        d = None
    if not _valid_response(d):
        return ServerReply(ok=False, status=200, round_trip_ms=rtt, message="the server's answer is not a fieldid prediction")
    return ServerReply(ok=True, status=200, round_trip_ms=rtt, response=d, message="")
