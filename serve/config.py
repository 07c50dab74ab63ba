"""What a fieldid TorchServe server is configured with: :class:`ServeOptions` (the
``fieldid serve start`` flags) and the files rendered from them (``config.properties``, the
log4j2 config). Pure functions, no processes: :mod:`fieldid.serve.server` supervises those.
"""
from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fieldid.export.phone import DEFAULT_MAX_PIXELS

from .archive import ServeError

__all__ = ["ServeOptions", "config_properties", "log_config", "free_port", "url_host", "is_loopback",
           "exposure_warning", "CORS_METHODS", "CORS_HEADERS"]

# One browser origin (RFC 6454 serialisation: scheme://host[:port], no path), or "*".
_CORS_ORIGIN_RE = re.compile(r"\*|https?://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(:\d{1,5})?")
# What the field app sends: a POST of the photo with its bearer token (preflighted by browsers).
CORS_METHODS = "GET, POST, OPTIONS"
CORS_HEADERS = "Authorization, Content-Type"


def url_host(host: str) -> str:
    """``host`` as it goes into a URL (IPv6 literals in brackets)."""
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    """Is ``host`` this machine only (127.0.0.0/8, ::1, localhost)?"""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warning(what: str, host: str, consequence: str = "") -> str | None:
    """The one warning for a listener on an address other machines can reach (``None`` on
    loopback): ``fieldid serve start``, ``fieldid app serve`` and ``fieldid demo`` all say it.

    Args:
        what: the listener, e.g. ``"the inference API"``.
        host: the address it binds.
        consequence: what that exposes, appended as it is (e.g. ``" WITHOUT token authorization"``).

    Example:
        >>> exposure_warning("the demo", "0.0.0.0")
        'binding the demo to 0.0.0.0: it is reachable from other machines'
        >>> exposure_warning("the demo", "127.0.0.1") is None
        True
    """
    if is_loopback(host):
        return None
    return f"binding {what} to {host}: it is reachable from other machines{consequence}"


@dataclass
class ServeOptions:
    """Server settings (``fieldid serve start`` flags). Defaults are the safe, local ones.

    Example:
        >>> ServeOptions(batch_size=8, max_batch_delay_ms=5).batch_size
        8
    """

    host: str = "127.0.0.1"  # inference API only; management/metrics/gRPC always stay on loopback
    port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    auth: bool = True
    token_expiry_min: float = 1440.0
    workers: int = 1
    threads: int = 1  # CPU threads per worker; more than one per core collapses under contention
    batch_size: int = 1
    max_batch_delay_ms: int = 5
    max_request_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    precision: str = "auto"  # fp16 on CUDA where the bundle verified an fp16 ONNX file, else fp32
    device: str = "auto"  # auto (GPU when present) | cpu
    response_timeout_s: int = 60
    job_queue_size: int = 100
    # Netty frontend threads (0 = TorchServe's default: one per core). Accepting/parsing HTTP
    # is cheap next to the model, so on a small CPU fewer threads leave the cores to the worker.
    netty_threads: int = 0
    netty_client_threads: int = 0
    startup_timeout_s: float = 180.0
    # Browser origin allowed to call the inference API (e.g. the field app's
    # ``https://app.example.org``); "" = no CORS headers at all, TorchServe's default.
    cors_origin: str = ""
    # HTTPS for the inference API (TorchServe's certificate_file / private_key_file, PEM);
    # both or neither. Management, metrics and gRPC stay plain on loopback.
    certificate: str = ""
    private_key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.certificate)

    def validate(self) -> None:
        for name in ("port", "management_port", "metrics_port", "grpc_inference_port", "grpc_management_port"):
            if not 0 < getattr(self, name) < 65536:
                raise ServeError(f"{name} {getattr(self, name)} is not a TCP port")
        ports = self.ports()
        if len(set(ports.values())) != len(ports):
            raise ServeError(f"ports must differ: {ports}")
        if self.netty_threads < 0 or self.netty_client_threads < 0 or self.job_queue_size < 1:
            raise ServeError("netty threads must be >= 0 (0 = TorchServe's default) and the job queue >= 1")
        if self.workers < 1 or self.threads < 1 or self.batch_size < 1 or self.max_batch_delay_ms < 0:
            raise ServeError("workers, threads and batch size must be >= 1, batch delay >= 0")
        if self.precision not in ("auto", "fp32", "fp16"):
            raise ServeError(f"precision {self.precision!r}: use auto, fp32 or fp16")
        if self.device not in ("auto", "cpu"):
            raise ServeError(f"device {self.device!r}: use auto (GPU when present) or cpu")
        if not self.max_request_mb > 0 or self.max_pixels < 1:
            raise ServeError("max request size and pixel limit must be positive")
        if self.cors_origin and not _CORS_ORIGIN_RE.fullmatch(self.cors_origin):
            raise ServeError(f"--cors-origin {self.cors_origin!r}: give one origin as scheme://host[:port] "
                             f"(no path), or * for any origin")
        if bool(self.certificate) != bool(self.private_key):
            raise ServeError("TLS needs both --certfile FILE and --keyfile FILE")
        for what, f in (("--certfile", self.certificate), ("--keyfile", self.private_key)):
            if f and not Path(f).is_file():
                raise ServeError(f"{what} {f}: no such file")
        if self.certificate and "BEGIN CERTIFICATE" not in Path(self.certificate).read_text(errors="replace"):
            raise ServeError(f"--certfile {self.certificate}: not a PEM certificate")
        if self.private_key and "PRIVATE KEY" not in Path(self.private_key).read_text(errors="replace"):
            raise ServeError(f"--keyfile {self.private_key}: not a PEM private key")
        if self.token_expiry_min < 5:  # keys must outlive start-up, or start can never see READY
            raise ServeError("token expiry must be at least 5 minutes")

    @classmethod
    def on_free_ports(cls, **kw: Any) -> "ServeOptions":
        """Options whose five ports are free loopback ports right now (tests, benchmarks).

        Example:
            >>> o = ServeOptions.on_free_ports(batch_size=4)
            >>> len(set(o.ports().values()))
            5
        """
        ports: set[int] = set()
        while len(ports) < 5:
            ports.add(free_port())
        p = sorted(ports)
        return cls(**{"port": p[0], "management_port": p[1], "metrics_port": p[2], "grpc_inference_port": p[3],
                      "grpc_management_port": p[4], **kw})

    def ports(self) -> dict[str, int]:
        return {"inference": self.port, "management": self.management_port, "metrics": self.metrics_port,
                "grpc_inference": self.grpc_inference_port, "grpc_management": self.grpc_management_port}


# A port handed out is not handed out again (to any fieldid process of this user) for this long:
# longer than a server takes to start and bind it.
_PORT_CLAIM_S = 600.0
_PORT_FLOOR = 10000  # below: well-known services' registered ports


def _ephemeral_range() -> tuple[int, int]:
    """The ports the kernel picks from for ``bind(port 0)`` and outgoing connections."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 49152, 65535  # IANA's dynamic range (macOS, Windows)


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` now, for a server that binds it a little later (tests,
    benchmarks, ``ServeOptions.on_free_ports``): the one free-port helper.

    A port found free and released before Java binds it can be taken in between. Two things
    narrow that window to other programs binding that exact port on purpose: the port comes from
    *outside* the kernel's ephemeral range (where ``bind(0)`` and every outgoing connection get
    their ports), and it is recorded in a per-user claims file (under an ``fcntl`` lock) so no
    other fieldid process - a parallel test, a benchmark - is handed it for ten minutes.

    Example:
        >>> lo, hi = _ephemeral_range()
        >>> not lo <= free_port() <= hi
        True
    """
    import fcntl  # POSIX, as TorchServe's process handling here is
    import random
    import tempfile
    import time

    lo, hi = _ephemeral_range()
    pool = [r for r in (range(_PORT_FLOOR, min(lo, 65536)), range(max(hi + 1, _PORT_FLOOR), 65536)) if r]
    pool = pool or [range(_PORT_FLOOR, 65536)]  # the ephemeral range covers everything: claims still help
    claims = Path(tempfile.gettempdir()) / f"fieldid-ports-{os.getuid()}.json"
    fd = os.open(claims, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # released when fd is closed
        now = time.time()
        try:
            taken = {int(p): float(t) for p, t in json.loads(os.read(fd, 1 << 20) or b"{}").items() if float(t) > now}
        except (ValueError, AttributeError):
            taken = {}  # a damaged claims file: start over
        rng = random.Random()
        for _ in range(1000):
            port = rng.choice(rng.choices(pool, weights=[len(r) for r in pool])[0])
            if port not in taken and _bindable(host, port):
                taken[port] = now + _PORT_CLAIM_S
                os.lseek(fd, 0, os.SEEK_SET)
                os.ftruncate(fd, 0)
                os.write(fd, json.dumps(taken).encode())
                return port
    finally:
        os.close(fd)
    raise ServeError(f"no free TCP port on {host} found outside the ephemeral range {lo}-{hi}")


def _prop(value: str) -> str:
    r"""``value`` escaped for Java's ``Properties.load``, which TorchServe reads as ISO-8859-1.

    Backslashes, line breaks, ``=``, ``:`` and ``,`` are escaped (the last three are harmless to
    escape and keep a path like ``/data/a=b, c`` readable as one value), leading spaces kept, and
    every non-ASCII character written as ``\uXXXX`` (UTF-16 surrogate pairs beyond the BMP), so a
    state folder named ``Fotos Zoë, 2026`` is the same path to Java as to Python.

    Example:
        >>> _prop("/srv/Zoë, a=b")
        '/srv/Zo\\u00eb\\, a\\=b'
    """
    out = []
    for i, ch in enumerate(value):
        if ch == "\\":
            out.append("\\\\")
        elif ch in "=:,#!":
            out.append("\\" + ch)
        elif ch == " " and i == 0:
            out.append("\\ ")  # Properties.load strips leading white space of a value
        elif ch in "\n\r\t\f":
            out.append({"\n": "\\n", "\r": "\\r", "\t": "\\t", "\f": "\\f"}[ch])
        elif 0x20 <= ord(ch) < 0x7F:
            out.append(ch)
        else:
            data = ch.encode("utf-16-be")
            out.extend(f"\\u{data[j] << 8 | data[j + 1]:04x}" for j in range(0, len(data), 2))
    return "".join(out)


def config_properties(store: Path, models: dict[str, str], opts: ServeOptions) -> str:
    """The ``config.properties`` text for ``models`` (name -> version) in ``store``.

    Example:
        >>> "enable_model_api=false" in config_properties(Path("/s"), {"reef": "abc"}, ServeOptions())
        True
    """
    store = store.resolve()
    lo = "127.0.0.1"
    model_cfg = {
        name: {version: {"defaultVersion": True, "marName": f"{name}.mar", "minWorkers": opts.workers,
                         "maxWorkers": opts.workers, "batchSize": opts.batch_size,
                         "maxBatchDelay": opts.max_batch_delay_ms, "responseTimeout": opts.response_timeout_s}}
        for name, version in models.items()
    }
    # Only files in the model store may ever be loaded, even if the register API were turned on.
    # TorchServe splits allowed_urls on commas: a comma of the path is written as the regex \x2c.
    allowed = "file://" + re.escape(store.as_posix()).replace(",", "\\x2c") + "/.*"
    lines = {
        "inference_address": f"{'https' if opts.tls else 'http'}://{url_host(opts.host)}:{opts.port}",
        "management_address": f"http://{lo}:{opts.management_port}",
        "metrics_address": f"http://{lo}:{opts.metrics_port}",
        "grpc_inference_address": lo,
        "grpc_inference_port": str(opts.grpc_inference_port),
        "grpc_management_address": lo,
        "grpc_management_port": str(opts.grpc_management_port),
        "model_store": store.as_posix(),
        "load_models": ",".join(f"{n}.mar" for n in models),
        "models": json.dumps(model_cfg, separators=(",", ":")),
        "enable_model_api": "false",
        "allowed_urls": allowed,
        "disable_token_authorization": "false" if opts.auth else "true",
        "token_expiration_min": repr(float(opts.token_expiry_min)),
        "max_request_size": str(int(opts.max_request_mb * 1024 * 1024)),
        "max_response_size": str(1024 * 1024),
        "default_workers_per_model": str(opts.workers),
        "job_queue_size": str(opts.job_queue_size),
        "default_response_timeout": str(opts.response_timeout_s),
        "install_py_dep_per_model": "false",
        "disable_system_metrics": "true",  # a psutil subprocess per minute we do not need
        "enable_envvars_config": "false",  # TS_* variables in a user's shell must not loosen this file
    }
    if opts.device == "cpu":
        lines["number_of_gpu"] = "0"
    if opts.netty_threads:
        lines["number_of_netty_threads"] = str(opts.netty_threads)
    if opts.netty_client_threads:
        lines["netty_client_threads"] = str(opts.netty_client_threads)
    if opts.tls:
        lines.update({"certificate_file": str(Path(opts.certificate).resolve()),
                      "private_key_file": str(Path(opts.private_key).resolve())})
    if opts.cors_origin:
        lines.update({"cors_allowed_origin": opts.cors_origin, "cors_allowed_methods": CORS_METHODS,
                      "cors_allowed_headers": CORS_HEADERS})
    header = "# Written by `fieldid serve start`; regenerated on every start.\n"
    return header + "".join(f"{k}={_prop(v)}\n" for k, v in lines.items())


def log_config() -> str:
    """log4j2 config: TorchServe's files, rolled at 20 MB (5 kept), and only warnings on the
    console (the stock config copies every request's DEBUG lines to stdout, unbounded)."""
    appenders = "".join(
        f'<RollingFile name="{f}" fileName="${{env:LOG_LOCATION:-logs}}/{f}.log" '
        f'filePattern="${{env:LOG_LOCATION:-logs}}/{f}.%i.log.gz"><PatternLayout pattern="%d{{ISO8601}} '
        f'[%-5p] %t %c - %m%n"/><Policies><SizeBasedTriggeringPolicy size="20 MB"/></Policies>'
        f'<DefaultRolloverStrategy max="5"/></RollingFile>\n'
        for f in ("access_log", "model_log", "model_metrics", "ts_log", "ts_metrics"))
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n<Configuration>\n<Appenders>\n'
        '<Console name="STDOUT" target="SYSTEM_OUT"><PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>'
        '</Console>\n' + appenders + '</Appenders>\n<Loggers>\n'
        '<Logger name="ACCESS_LOG" level="info"><AppenderRef ref="access_log"/></Logger>\n'
        '<Logger name="io.netty" level="error"/>\n'
        '<Logger name="MODEL_LOG" level="info"><AppenderRef ref="model_log"/></Logger>\n'
        '<Logger name="MODEL_METRICS" level="info"><AppenderRef ref="model_metrics"/></Logger>\n'
        '<Logger name="org.apache" level="off"/>\n'
        '<Logger name="org.pytorch.serve" level="info"/>\n'
        '<Logger name="TS_METRICS" level="info"><AppenderRef ref="ts_metrics"/></Logger>\n'
        '<Root level="info"><AppenderRef ref="STDOUT" level="warn"/><AppenderRef ref="ts_log"/></Root>\n'
        '</Loggers>\n</Configuration>\n'
    )
