"""A tiny torch-free client for a fieldid TorchServe server (stdlib only).

Always sends an explicit ``Content-Type`` (``image/jpeg|png|webp`` from the bytes, else
``application/octet-stream``): TorchServe's frontend parses a POST *without* one as a form and
answers 500 before the handler ever sees the image.

Example:
    >>> from fieldid.serve.client import predict, read_token
    >>> ans = predict("http://127.0.0.1:8080/predictions/reef", open("fish.jpg", "rb").read(),
    ...               token=read_token("runs/reef/serve/key_file.json"))  # doctest: +SKIP
    >>> ans["top_k"][0]["label"], ans["source"]  # doctest: +SKIP
    ('parrotfish', 'server')
"""
from __future__ import annotations

import http.client
import json
import ssl
from pathlib import Path
from typing import Any

from fieldid.cli_common import UsageError, http_url

# read_token lives in keys.py so that state.py (ServerState.token) and this module, which asks
# state.py which server issued a key file, do not import each other.
from .keys import read_token

__all__ = ["PredictionError", "ServeClient", "predict", "read_token", "image_content_type", "http_json",
           "token_for", "KeyFileError", "CertificateError", "origin", "tls_context", "NEEDS_KEY_FILE"]

# What a client says when a server wants a token it was not given one for.
NEEDS_KEY_FILE = "this server needs its own key: give --key-file (the key_file.json of that server)"


class KeyFileError(ValueError):
    """A key file cannot be used for this server (unreadable, or it belongs to another server)."""


class CertificateError(ValueError):
    """The CA file given to verify the server (``--ca-file``) cannot be read as one."""


class PredictionError(ValueError):
    """The server answered with an error status; ``status`` and ``body`` (parsed JSON or text) say why."""

    def __init__(self, status: int, body: Any) -> None:
        msg = (body.get("error") or body.get("message")) if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {msg}")
        self.status = status
        self.body = body


def image_content_type(data: bytes) -> str:
    """MIME type from the first bytes (JPEG, PNG, WEBP), else ``application/octet-stream``."""
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def origin(url: str) -> tuple[str, str, int]:
    """``(scheme, host, port)`` of an http(s) URL, with the default port filled in and the host
    lower-cased (``localhost`` and ``127.0.0.1`` stay different servers: no guessing).

    Example:
        >>> origin("http://LocalHost:8080/predictions/reef")
        ('http', 'localhost', 8080)
    """
    scheme, host, port, _ = http_url(url, "server")
    return scheme, host.lower(), port


def token_for(url: str, key_file: str | Path | None = None, kind: str = "inference") -> str | None:
    """The key to send to the server at ``url``: only the one its own key file holds.

    A ``key_file.json`` written by ``fieldid serve start`` sits in the server's state folder next
    to its ``server.json``, which says which server (scheme, host, port) issued it. The key goes
    only to that server; sent anywhere else it would hand the token to a stranger.

    Args:
        url: the server's inference URL (any path).
        key_file: the key file to use (``None``: no token).

    Returns:
        The key, or ``None`` when no key file is given.

    Raises:
        KeyFileError: the key file is missing or unreadable, or its ``server.json`` names another
            server than ``url`` (the message says so; send nothing).

    Example:
        >>> token_for("http://other-host:8080", "runs/reef/serve/key_file.json")  # doctest: +SKIP
        Traceback (most recent call last):
        KeyFileError: ... belongs to the server at http://127.0.0.1:8080, not http://other-host:8080 ...
    """
    if key_file is None:
        return None
    key_file = Path(key_file)
    want = origin(url)
    if (key_file.parent / "server.json").is_file():
        from .state import read_server_state  # the documented state file of the server that wrote the keys

        try:
            issued_by = read_server_state(key_file.parent).inference_url
        except ValueError as e:
            raise KeyFileError(f"cannot tell which server {key_file} belongs to: {e}") from None
        if origin(issued_by) != want:
            raise KeyFileError(f"{key_file} belongs to the server at {issued_by}, not {want[0]}://{want[1]}:{want[2]}; "
                               f"not sending its key there. {NEEDS_KEY_FILE}")
    if not key_file.is_file():
        raise KeyFileError(f"key file {key_file} not found; start the server with `fieldid serve start` "
                           f"or give --key-file")
    try:
        return read_token(key_file, kind)
    except (OSError, ValueError) as e:
        raise KeyFileError(f"cannot read the key file: {e}") from None


def tls_context(ca_file: str | Path | None = None) -> ssl.SSLContext:
    """A verifying TLS context: the system's trusted CAs, or ``ca_file`` (PEM: a CA, or the
    server's own self-signed certificate). Hostnames are always checked.

    Example:
        >>> tls_context().verify_mode == ssl.CERT_REQUIRED
        True
    """
    try:
        ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (ssl.SSLError, OSError) as e:  # a typo'd path, a key or a YAML file instead of a PEM certificate
        raise CertificateError(f"CA file {ca_file}: not a PEM certificate this machine can read "
                               f"({getattr(e, 'reason', None) or getattr(e, 'strerror', None) or e})") from None
    if ca_file:
        # Trust the given certificate itself even when it is a leaf, not a CA (a pinned server).
        ctx.verify_flags |= getattr(ssl, "VERIFY_X509_PARTIAL_CHAIN", 0)
    return ctx


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()


class ServeClient:
    """Keeps one HTTP/1.1 connection to ``url`` open across calls (not thread-safe: one per thread).

    Args:
        url: the prediction URL, e.g. ``http://127.0.0.1:8080/predictions/reef``.
        token: the inference key (``None`` when the server runs with ``--no-auth``).
        timeout: seconds per request.
        ca_file: for ``https``: the CA (or the server's self-signed certificate) to verify it
            with; default: the system's trusted CAs. The certificate is always verified.
    """

    def __init__(self, url: str, token: str | None = None, timeout: float = 30.0,
                 ca_file: str | Path | None = None) -> None:
        scheme, host, port, self._path = http_url(url, "server")
        self.url, self.token, self.timeout = url, token, timeout
        self._tls = tls_context(ca_file) if scheme == "https" else None
        self._conn_args = (host, port)
        self._https = scheme == "https"
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            if self._https:
                self._conn = http.client.HTTPSConnection(*self._conn_args, timeout=self.timeout, context=self._tls)
            else:
                self._conn = http.client.HTTPConnection(*self._conn_args, timeout=self.timeout)
        return self._conn

    def request(self, data: bytes, content_type: str | None = None) -> tuple[int, Any]:
        """POST ``data``; returns ``(status, parsed body)`` without raising for HTTP errors."""
        headers = {"Content-Type": content_type or image_content_type(data)}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        for attempt in (0, 1):
            conn = self._connection()
            try:
                conn.request("POST", self._path, body=data, headers=headers)
                resp = conn.getresponse()
                return resp.status, _parse(resp.read())
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.close()  # the server closed an idle keep-alive connection: retry once on a new one
                if attempt:
                    raise
            except BaseException:
                # Refused, timed out, half-sent: the connection is in an unknown state, and reusing it
                # would fail the next photo too (http.client's CannotSendRequest). Start afresh.
                self.close()
                raise
        raise AssertionError("unreachable")

    def predict(self, data: bytes) -> dict[str, Any]:
        """One image's answer (the shared response schema). Raises :class:`PredictionError` on 4xx/5xx."""
        status, body = self.request(data)
        if status != 200:
            raise PredictionError(status, body)
        return body

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> "ServeClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def predict(url: str, image_bytes: bytes, *, token: str | None = None, timeout: float = 30.0,
            ca_file: str | Path | None = None) -> dict[str, Any]:
    """Classify one image on the server.

    Args:
        url: prediction URL, e.g. ``http://127.0.0.1:8080/predictions/reef``.
        image_bytes: a JPEG, PNG or WEBP file's bytes.
        token: inference key (see :func:`read_token`); ``None`` for a ``--no-auth`` server.
        timeout: seconds.
        ca_file: for ``https``: CA or the server's self-signed certificate (see :class:`ServeClient`).

    Returns:
        The answer: ``top_k`` labels with calibrated probabilities, ``model``, ``version``,
        ``latency_ms`` (server side), ``needs_fallback`` ... (``fieldid.export.phone.prediction``).

    Raises:
        PredictionError: the server refused (400 empty, 413 too large, 415 not an image, 4xx auth ...).
        OSError: the server cannot be reached.
    """
    with ServeClient(url, token, timeout, ca_file) as c:
        return c.predict(image_bytes)


def http_json(method: str, url: str, *, token: str | None = None, timeout: float = 5.0) -> tuple[int, Any]:
    """A body-less request (management/status calls); returns ``(status, parsed body)``."""
    _, host, port, path = http_url(url)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path,
                     headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, _parse(resp.read())
    finally:
        conn.close()
