"""TLS, CORS, key scoping and awkward state paths against real TorchServe servers started here.

One server runs with token auth, HTTPS (a self-signed certificate made by the test with the
``openssl`` CLI), ``--cors-origin`` and a state folder whose path has spaces, an accent, a comma
and ``=``: it starting at all proves config.properties is escaped the way Java reads it. A second,
``--no-auth`` server shows the CORS preflight a browser needs. Both are stopped at the end.
"""
from __future__ import annotations

import http.client
import io
import logging
import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest
from PIL import Image

from fieldid.serve.client import KeyFileError, ServeClient, predict, token_for
from fieldid.serve.state import read_server_state

from fixtures_serve import torchserve_server

APP_ORIGIN = "http://localhost:5173"
pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI to make a certificate")


def _jpeg() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A fresh self-signed certificate for 127.0.0.1 / localhost (and its key), PEM."""
    cert, key = folder / "server.crt", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="module")
def tls_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    root = tmp_path_factory.mktemp("tls")
    cert, key = _self_signed(root)
    state_dir = root / "Fotos Zoë, 2026 a=b"  # spaces, an accent, a comma, '='
    with torchserve_server([tiny_bundle], state_dir, device="cpu", certificate=str(cert), private_key=str(key),
                           cors_origin=APP_ORIGIN) as served:
        yield served, cert


def test_state_path_with_spaces_accent_and_comma(tls_server) -> None:
    served, _ = tls_server
    state = read_server_state(served.state_dir / "server.json")
    assert state.state_dir == str(served.state_dir.resolve()) and "ë, " in state.state_dir
    # Java found the model store at that path: the worker is up and answers.
    assert served.predict(_jpeg())["model"] == served.model


def test_tls_is_verified_with_the_ca_file(tls_server) -> None:
    served, cert = tls_server
    assert served.url.startswith("https://127.0.0.1:")
    ans = predict(served.url, _jpeg(), token=served.token, ca_file=cert, timeout=60)
    assert ans["model"] == served.model and ans["source"] == "server"
    with pytest.raises(ssl.SSLCertVerificationError):  # not trusted without the CA file
        predict(served.url, _jpeg(), token=served.token, timeout=60)
    (cert.parent / "other").mkdir(exist_ok=True)
    other_cert, _ = _self_signed(cert.parent / "other")
    with pytest.raises(ssl.SSLCertVerificationError):  # a different certificate is refused
        predict(served.url, _jpeg(), token=served.token, ca_file=other_cert, timeout=60)
    # Plain HTTP to the TLS port gets no prediction in clear text (TorchServe 0.12 answers 403).
    with ServeClient(served.url.replace("https://", "http://"), None, timeout=10) as c:
        status, body = c.request(_jpeg())
    assert status == 403 and "HTTPS" in str(body), body


def test_cors_headers_for_the_app_origin(tls_server) -> None:
    served, cert = tls_server
    host, port = served.base_url.split("//")[1].rsplit(":", 1)
    conn = http.client.HTTPSConnection(host, int(port), timeout=60, context=ssl.create_default_context(cafile=str(cert)))
    conn.request("POST", f"/predictions/{served.model}", body=_jpeg(),
                 headers={"Origin": APP_ORIGIN, "Content-Type": "image/jpeg", "Authorization": f"Bearer {served.token}"})
    resp = conn.getresponse()
    resp.read()
    assert resp.status == 200
    assert resp.getheader("Access-Control-Allow-Origin") == APP_ORIGIN
    assert "Authorization" in resp.getheader("Access-Control-Allow-Headers")


def test_cors_preflight_without_auth(tiny_bundle: Path, tmp_path: Path, caplog) -> None:
    with torchserve_server([tiny_bundle], tmp_path / "state", device="cpu", auth=False, cors_origin=APP_ORIGIN) as s:
        host, port = s.base_url.split("//")[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        conn.request("OPTIONS", f"/predictions/{s.model}", headers={
            "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Access-Control-Allow-Origin") == APP_ORIGIN
        assert "POST" in resp.getheader("Access-Control-Allow-Methods")
    with torchserve_server([tiny_bundle], tmp_path / "plain", device="cpu", auth=False) as plain:
        conn = http.client.HTTPConnection(*plain.base_url.split("//")[1].rsplit(":", 1), timeout=60)
        conn.request("POST", f"/predictions/{plain.model}", body=_jpeg(),
                     headers={"Origin": APP_ORIGIN, "Content-Type": "image/jpeg"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200 and resp.getheader("Access-Control-Allow-Origin") is None  # none by default


def test_key_goes_only_to_its_own_server(tls_server, tmp_path: Path) -> None:
    """The recorded server's key is never sent to another host: seen on the wire with a listening socket."""
    from fieldid.edge_demo.fallback import ServerConfig, ask_server

    served, cert = tls_server
    assert token_for(served.url, served.key_file) == served.token
    seen: list[bytes] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        other = f"http://127.0.0.1:{listener.getsockname()[1]}"

        def accept() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(10)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                seen.append(data)
                body = b'{"code": 400, "message": "Token Authorization failed. Token not provided"}'
                conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

        t = threading.Thread(target=accept, daemon=True)
        t.start()
        with pytest.raises(KeyFileError, match="belongs to the server at https://127.0.0.1"):
            token_for(other, served.key_file)
        reply = ask_server(ServerConfig(other, served.key_file), served.model, _jpeg(), timeout=10)
        t.join(15)
    assert seen and b"authorization" not in seen[0].lower() and served.token.encode() not in seen[0]
    assert not reply.ok and "--key-file" in reply.message and "belongs to the server at" in reply.message
    # Its own server, through the demo's path (certificate recorded in server.json as the CA file):
    from fieldid.edge_demo.fallback import find_server

    found = find_server(served.model, [served.state_dir])
    assert found.ca_file == cert.resolve() and found.url == served.base_url
    ok = ask_server(found, served.model, _jpeg(), timeout=60)
    assert ok.ok, ok.message
    bad = ask_server(ServerConfig(served.base_url, served.key_file), served.model, _jpeg(), timeout=30)
    assert not bad.ok and "--ca-file" in bad.message  # self-signed, no CA file: refused, said so


def test_public_host_without_tls_warns_loudly(tiny_bundle: Path, tmp_path: Path, caplog) -> None:
    from fieldid.serve.server import ServeOptions, start_server
    from fieldid.serve.archive import ServeError

    with caplog.at_level(logging.WARNING, logger="fieldid.serve"):
        with pytest.raises(ServeError, match="nothing to serve"):
            start_server([], tmp_path / "s", ServeOptions(host="0.0.0.0"))
    assert any("NO TLS" in r.getMessage() and "--certfile" in r.getMessage() for r in caplog.records)
    with pytest.raises(ServeError, match="both --certfile FILE and --keyfile FILE"):
        ServeOptions(certificate=str(tmp_path)).validate()
    (tmp_path / "k.pem").write_text("not a key")
    with pytest.raises(ServeError, match="not a PEM certificate"):
        ServeOptions(certificate=str(tmp_path / "k.pem"), private_key=str(tmp_path / "k.pem")).validate()
