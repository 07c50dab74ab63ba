"""``fieldid app serve``: a small static server for an app build, with the headers the app wants.

* ``Cross-Origin-Opener-Policy: same-origin`` + ``Cross-Origin-Embedder-Policy: require-corp``
  make the page cross-origin isolated, which is what lets onnxruntime-web use WebAssembly
  threads (SharedArrayBuffer). Without them the app still works, on one thread.
* ``Cache-Control: no-cache`` on the files that decide the version (page, ``config.json``,
  ``sw.js``), so a phone notices a new build; the service worker does the offline caching.
* The right MIME types for ``.mjs``, ``.wasm`` and ``.webmanifest``.

* ``--proxy URL``: ``POST /predictions/<model>`` is forwarded to that TorchServe (Authorization and
  Content-Type passed through), so an app built with ``--server same-origin`` reaches a server that
  keeps token authorization on. A browser on another origin cannot: TorchServe 0.12 answers the
  CORS preflight (which never carries the token) with 400. In production a reverse proxy (nginx,
  Caddy) does the same forwarding (README).

For testing on this machine (127.0.0.1 by default). A phone on the network needs HTTPS for the
service worker: give ``--certfile/--keyfile``, or host the folder on any HTTPS static host that
sends the same headers (README).
"""
from __future__ import annotations

import contextlib
import functools
import http.client
import http.server
import ipaddress
import socket
import ssl
import threading
import urllib.parse
from pathlib import Path
from typing import Iterator

from .build import AppBuildError, check_server_url, load_app_config

__all__ = ["ISOLATION_HEADERS", "AppServer", "make_server", "is_loopback", "running_app_server"]

# Sent with every response (a static host must send the first two for WASM threads).
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
}
_NO_CACHE = ("/", "/index.html", "/config.json", "/sw.js", "/manifest.webmanifest")
_TYPES = {".mjs": "text/javascript", ".js": "text/javascript", ".wasm": "application/wasm",
          ".webmanifest": "application/manifest+json", ".onnx": "application/octet-stream",
          ".json": "application/json", ".css": "text/css", ".png": "image/png"}


_PROXY_HEADERS = ("Authorization", "Content-Type")
_MAX_PROXY_BYTES = 30_000_000  # = the app's own file limit (edge_demo.modes.MAX_FILE_BYTES)


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files from the build folder (SimpleHTTPRequestHandler keeps requests inside it)."""

    extensions_map = {**http.server.SimpleHTTPRequestHandler.extensions_map, **_TYPES}
    quiet = True
    proxy = ""  # TorchServe inference root that POST /predictions/... goes to ("" = none)
    proxy_timeout_s = 60.0

    def do_POST(self) -> None:
        path = self.path.split("?", 1)[0]
        if not self.proxy:
            self._reply(405, b'{"error": "this server only serves the app (no --proxy)"}')
            return
        if not path.startswith("/predictions/"):
            self._reply(405, b'{"error": "only POST /predictions/<model> is forwarded to the server"}')
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= _MAX_PROXY_BYTES:
            self._reply(413 if length > 0 else 400, b'{"error": "send the photo with a Content-Length up to 30 MB"}')
            return
        body = self.rfile.read(length)
        u = urllib.parse.urlsplit(self.proxy)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        conn = cls(u.hostname, u.port or (443 if u.scheme == "https" else 80), timeout=self.proxy_timeout_s)
        try:
            conn.request("POST", u.path.rstrip("/") + path, body=body,
                         headers={k: self.headers[k] for k in _PROXY_HEADERS if self.headers.get(k)})
            resp = conn.getresponse()
            self._reply(resp.status, resp.read(), resp.getheader("Content-Type") or "application/json")
        except (OSError, http.client.HTTPException) as e:
            self._reply(502, ('{"error": "the fieldid server behind this proxy is not reachable (%s)"}'
                              % type(e).__name__).encode())
        finally:
            conn.close()

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def end_headers(self) -> None:
        for k, v in ISOLATION_HEADERS.items():
            self.send_header(k, v)
        path = self.path.split("?", 1)[0]
        self.send_header("Cache-Control", "no-cache" if path in _NO_CACHE else "max-age=3600")
        super().end_headers()

    def list_directory(self, path):  # type: ignore[override]
        self.send_error(404, "not found")  # the app's files are known; no folder listings
        return None

    def log_message(self, format: str, *args: object) -> None:
        if not self.quiet:
            super().log_message(format, *args)


class AppServer(http.server.ThreadingHTTPServer):
    """The HTTP(S) server; ``url`` is where the app is."""

    daemon_threads = True
    scheme = "http"
    app_dir: Path = Path(".")  # the build folder being served

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        host = f"[{host}]" if ":" in str(host) else host
        return f"{self.scheme}://{host}:{port}/"


def make_server(app_dir: str | Path, host: str = "127.0.0.1", port: int = 8000, *, certfile: str | None = None,
                keyfile: str | None = None, quiet: bool = True, proxy: str = "") -> AppServer:
    """A server (not yet serving) for the build in ``app_dir``.

    Args:
        proxy: TorchServe inference root (``http://127.0.0.1:8080``) that ``POST /predictions/...``
            is forwarded to, for apps built with ``--server same-origin``; "" = no forwarding.

    Raises:
        AppBuildError: ``app_dir`` is not an app build, or the certificate cannot be loaded.
        OSError: the address is taken or cannot be bound.

    Example:
        >>> srv = make_server("build/app", port=0)  # doctest: +SKIP
        >>> threading.Thread(target=srv.serve_forever, daemon=True).start()  # doctest: +SKIP
    """
    app_dir = Path(app_dir)
    load_app_config(app_dir)
    proxy = check_server_url(proxy, "--proxy") if proxy else ""
    handler = functools.partial(type("Handler", (_Handler,), {"quiet": quiet, "proxy": proxy}), directory=str(app_dir))
    cls = type("AppServer6", (AppServer,), {"address_family": socket.AF_INET6}) if ":" in host else AppServer
    srv = cls((host, port), handler)
    srv.app_dir = app_dir
    if certfile:
        try:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(certfile, keyfile)
        except (OSError, ssl.SSLError) as e:
            srv.server_close()
            raise AppBuildError(f"cannot load the certificate {certfile}: {e}") from None
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
        srv.scheme = "https"
    return srv


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and ``localhost``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def running_app_server(app_dir: str | Path, host: str = "127.0.0.1", port: int = 0, *,
                       proxy: str = "") -> Iterator[AppServer]:
    """Serve ``app_dir`` in a background thread for the ``with`` block (tests, benchmarks).

    Example:
        >>> with running_app_server("build/app") as srv:  # doctest: +SKIP
        ...     print(srv.url)
    """
    srv = make_server(app_dir, host, port, proxy=proxy)
    t = threading.Thread(target=srv.serve_forever, name="fieldid-app-server", daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)
