"""Start, stop and inspect a TorchServe server for one or more bundles. Torch-free.

What this hides from a user (each one a known TorchServe trap):

* **Java**: checked up front; a missing or old Java is one clear line saying what to install.
* **Token authorization** (on by default, kept on): TorchServe writes ``key_file.json`` to its
  working directory, so the server runs with ``cwd`` = the state directory (and umask 077, so
  the file is owner-only) and the path is printed. ``--no-auth`` is for local development.
* **Readiness**: ``/ping`` says Healthy before any model is loaded; :func:`start_server`
  returns only when every model's workers report READY on the management API.
* **Exposure**: every listener (inference, management, metrics, gRPC) binds 127.0.0.1 unless
  asked otherwise; only the inference API can be moved to another address. The model
  register/delete API stays off and ``allowed_urls`` is limited to the model store.
* **One server per machine temp dir**: TorchServe keeps its pid file and worker sockets in
  the temp dir; each server gets its own (``TEMP``/``TMPDIR`` under its state directory), so
  several servers - and the tests - run side by side.
* **Leftover processes**: the server runs in its own process group; :func:`stop_server`
  ends the group and verifies that no Java frontend or Python worker remains.

Everything a server owns lives in its state directory (default ``RUN/serve``): ``server.json``,
``config.properties``, ``model-store/``, ``logs/``, ``key_file.json``, ``tmp/`` and the marker
``.fieldid-serve-state``. ``start`` clears ``model-store/``, ``tmp/`` and ``key_file.json``, so it
uses only a folder that carries the marker, or a new or empty one (which it marks): never a
folder a user filled (``--state-dir ~`` is refused, nothing deleted). The only thing written
elsewhere: ``served_by.json`` in the default state dir of every other model it serves, so that
``stop``/``status --run B`` find the server started as ``--run A --run B``.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

from fieldid.export.manifest import load_manifest
from fieldid.records import atomic_write_text

from .archive import ServeError, build_model_store, bundle_dir_of, bundle_version
from .client import http_json
from .config import ServeOptions, config_properties, exposure_warning, free_port, log_config
from .state import STATE_FILE, ServerState, load_state, read_server_state

__all__ = [
    "ServeOptions",
    "ServerState",
    "start_server",
    "stop_server",
    "server_status",
    "rotate_key",
    "load_state",
    "default_state_dir",
    "state_dirs_for",
    "find_java",
    "config_properties",
    "free_port",
    "server_processes",
    "model_workers",
    "wait_ready",
    "read_server_state",
    "STATE_FILE",
    "STATE_MARKER",
    "claim_state_dir",
]

log = logging.getLogger("fieldid.serve")

MIN_JAVA = 17
# In RUN/serve of every model served from another state dir: {"state_dirs": [...]}.
POINTER_FILE = "served_by.json"
# In every state folder fieldid made (or adopted empty): only such a folder is ever cleared.
STATE_MARKER = ".fieldid-serve-state"
# Markers of processes that belong to a TorchServe server (launcher, Java frontend, workers).
_TS_MARKERS = ("ts.model_server", "org.pytorch.serve.ModelServer", "model_service_worker")


# --------------------------------------------------------------------------- helpers
def default_state_dir(bundle: str | Path) -> Path:
    """``RUN/serve`` for a run's ``export/`` bundle, else ``<bundle>-serve`` next to the bundle."""
    b = bundle_dir_of(bundle).resolve()
    return b.parent / "serve" if b.name == "export" else b.parent / f"{b.name}-serve"


def claim_state_dir(state_dir: str | Path, *, create: bool = True) -> Path:
    """``state_dir`` resolved, as a server state folder fieldid may clear: one that carries
    :data:`STATE_MARKER`, or a new or empty folder (created owner-only and marked now).

    Args:
        state_dir: the folder given (``--state-dir``) or the default ``RUN/serve``.
        create: create (and mark) a new or empty folder now; False only checks.

    Returns:
        The resolved folder.

    Raises:
        ServeError: it is a file, or a non-empty folder without the marker (nothing is touched).

    Example:
        >>> claim_state_dir("runs/reef/serve")  # doctest: +SKIP
        PosixPath('/.../runs/reef/serve')
    """
    d = Path(state_dir).expanduser().resolve()
    if (d / STATE_MARKER).is_file():
        return d
    if d.exists() and not d.is_dir():
        raise ServeError(f"state folder {d} is a file; give a new or empty folder with --state-dir")
    if d.is_dir() and any(d.iterdir()):
        raise ServeError(f"{d} is not a fieldid server state folder (no {STATE_MARKER}) and is not empty; "
                         f"a server clears model-store/, tmp/ and key_file.json in its folder, so give a new "
                         f"or empty one with --state-dir")
    if not create:
        return d
    d.mkdir(mode=0o700, parents=True, exist_ok=True)  # never chmod a folder the user already had
    atomic_write_text(d / STATE_MARKER, json.dumps({"what": "fieldid serve state folder"}) + "\n")
    return d


def _is_marked(state_dir: Path) -> bool:
    return (state_dir / STATE_MARKER).is_file()


def _pointer_targets(own: Path) -> list[str]:
    try:
        dirs = json.loads((own / POINTER_FILE).read_text()).get("state_dirs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [d for d in dirs if isinstance(d, str)]


def _serves(state_dir: Path, bundle: Path) -> bool:
    """Does the server state in ``state_dir`` (running or not) include ``bundle``?"""
    try:
        state = load_state(state_dir)
    except (ServeError, OSError, ValueError, TypeError):
        return False
    return any(Path(m.get("bundle", "")) == bundle for m in state.models.values())


def _write_pointers(bundles: list[Path], state_dir: Path) -> None:
    """Record in every other bundle's default state dir that ``state_dir`` serves it, so that
    ``fieldid serve stop|status --run B`` finds a server started as ``start --run A --run B``."""
    for b in bundles:
        own = default_state_dir(b)
        if own == state_dir:
            continue
        b = b.resolve()
        keep = [d for d in _pointer_targets(own) if d != str(state_dir) and _serves(Path(d), b)]
        try:
            try:
                claim_state_dir(own)  # created here: `serve start --run B` may use it as its own later
            except ServeError:
                pass  # a folder the user filled: the pointer is added, nothing in it is cleared
            atomic_write_text(own / POINTER_FILE, json.dumps({"state_dirs": keep + [str(state_dir)]}) + "\n")
        except OSError as e:  # e.g. a read-only bundle: serving still works, only the lookup does not
            log.warning("cannot record the server in %s (%s); stop it with --state-dir %s", own, e, state_dir)


def state_dirs_for(target: str | Path) -> list[Path]:
    """State directories of every server that was started with ``target`` among its models.

    Its own default state dir (``RUN/serve``) when that server serves it, plus each server
    recorded in ``RUN/serve/served_by.json`` (written by :func:`start_server` for every model
    but the one whose folder holds the state). Stopped servers are included; ``[]`` if none.

    Example:
        >>> start_server(["runs/reef", "runs/salmon"])  # doctest: +SKIP
        >>> state_dirs_for("runs/salmon")  # doctest: +SKIP
        [PosixPath('/.../runs/reef/serve')]
    """
    b = bundle_dir_of(target).resolve()
    own = default_state_dir(b)
    out: list[Path] = []
    for d in [own, *map(Path, _pointer_targets(own))]:
        if d not in out and _serves(d, b):
            out.append(d)
    return out


def _warn_exposure(opts: ServeOptions) -> None:
    clear = ("" if opts.tls else "; NO TLS: tokens and photos cross the network in clear text "
             "(give --certfile FILE --keyfile FILE)")
    exposed = exposure_warning("the inference API", opts.host,
                               ("" if opts.auth else " WITHOUT token authorization") + clear)
    if exposed:
        log.warning("%s", exposed)
    if opts.cors_origin and opts.auth:
        # Measured on TorchServe 0.12: the token check runs before CORS, so a browser's preflight
        # (OPTIONS, which never carries the Authorization header) gets HTTP 400 and the browser
        # then refuses to send the real request.
        log.warning("--cors-origin with token authorization: TorchServe 0.12 answers the browser's CORS "
                    "preflight with 400 (it wants the token there too), so a browser page on %s cannot reach "
                    "this server; browser apps need --no-auth (behind a trusted network or proxy)", opts.cors_origin)


def find_java(env: dict[str, str] | None = None) -> str:
    """The ``java`` TorchServe will run (``JAVA_HOME/bin/java`` or ``PATH``), checked to be >= 17.

    Raises:
        ServeError: one line saying what to install.
    """
    env = dict(os.environ if env is None else env)
    install = (f"TorchServe needs Java {MIN_JAVA}+: install it (Debian/Ubuntu: sudo apt-get install "
               f"openjdk-17-jre-headless) or set JAVA_HOME")
    home = env.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java", path=env.get("PATH", ""))
    if not java or not os.access(java, os.X_OK):
        where = f"JAVA_HOME={home}" if home else "PATH"
        raise ServeError(f"java not found ({where}); {install}")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30, env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise ServeError(f"cannot run {java} ({e}); {install}") from None
    m = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(m.group(1)) if m else 0
    if major == 1 and m and m.group(2):  # "1.8.0" style
        major = int(m.group(2))
    if major < MIN_JAVA:
        raise ServeError(f"{java} is Java {major or 'unknown'}; {install}")
    return java


def _check_port(host: str, port: int, what: str) -> None:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Netty does: TIME_WAIT is fine
        try:
            s.bind((host, port))
        except OSError:
            flag = {"inference": "--port", "management": "--management-port", "metrics": "--metrics-port",
                    "grpc_inference": "--grpc-port", "grpc_management": "--grpc-management-port"}[what]
            raise ServeError(f"{what} port {host}:{port} is in use; pick another with {flag}") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- processes
def _is_ts_process(p: Any) -> bool:
    try:
        cmd = " ".join(p.cmdline())
    except Exception:  # psutil.Error: gone or not ours to read
        return False
    return any(m in cmd for m in _TS_MARKERS)


def server_processes(state: ServerState) -> list[Any]:
    """Live TorchServe processes of this server: its process group, filtered to TorchServe
    command lines started no earlier than the server (a reused group id is never touched)."""
    import psutil

    out = []
    for p in psutil.process_iter(["pid", "create_time"]):
        try:
            if os.getpgid(p.pid) != state.pid:
                continue
        except OSError:
            continue
        if p.info["create_time"] + 1.0 >= state.create_time and _is_ts_process(p):
            out.append(p)
    return out


def _launcher_alive(state: ServerState) -> bool:
    import psutil

    try:
        p = psutil.Process(state.pid)
        return abs(p.create_time() - state.create_time) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_running(state: ServerState) -> bool:
    """Launcher alive, or (if it died) the Java frontend / workers it started still are."""
    return state.status == "running" and (_launcher_alive(state) or bool(server_processes(state)))


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return " | ".join(lines[-n:])


# --------------------------------------------------------------------------- readiness
def model_workers(state: ServerState, model: str, timeout: float = 5.0) -> list[dict[str, Any]]:
    """The management API's worker list for ``model`` (``[]`` while the server is not answering)."""
    try:
        # TorchServe writes key_file.json during start-up: absent or half-written means "not yet".
        token = state.token("management")
    except (OSError, ValueError):
        return []
    try:
        status, body = http_json("GET", f"{state.management_url}/models/{model}", token=token, timeout=timeout)
    except OSError:
        return []
    if status != 200 or not isinstance(body, list):
        return []
    return [w for entry in body for w in entry.get("workers", [])]


def _all_ready(state: ServerState, workers: int) -> bool:
    for name in state.models:
        ws = model_workers(state, name)
        if len([w for w in ws if w.get("status") == "READY"]) < workers:
            return False
    return True


def wait_ready(state: ServerState, timeout: float, poll_s: float = 0.25) -> None:
    """Block until every model has its workers READY (not merely ``/ping`` Healthy).

    Raises:
        ServeError: the server exited or the timeout passed; the message quotes its log.
    """
    workers = int(state.options.get("workers", 1))
    deadline = time.monotonic() + timeout
    console, ts_log = Path(state.log_dir) / "console.log", Path(state.log_dir) / "ts_log.log"
    while time.monotonic() < deadline:
        if not _launcher_alive(state):
            raise ServeError(f"TorchServe exited during start-up: {_tail(console) or _tail(ts_log) or 'no output'} "
                             f"(logs: {state.log_dir})")
        if _all_ready(state, workers):
            return
        time.sleep(poll_s)
    raise ServeError(f"models not READY after {timeout:.0f} s: {_tail(Path(state.log_dir) / 'model_log.log')} "
                     f"(logs: {state.log_dir})")


# --------------------------------------------------------------------------- start / stop / status
def start_server(bundles: list[str | Path], state_dir: str | Path | None = None,
                 opts: ServeOptions | None = None) -> ServerState:
    """Archive ``bundles``, start TorchServe on them, return when every worker is READY.

    Args:
        bundles: export bundles or run folders (several models at once, distinct names).
        state_dir: where this server keeps everything (default: ``RUN/serve`` of the first).
        opts: settings; default :class:`ServeOptions` (loopback, token auth on, 1 worker).

    Returns:
        The :class:`ServerState` (also in ``STATE_DIR/server.json``).

    Raises:
        ServeError: no Java, port taken, a server already running there (or being started there by
            another ``start`` right now), start-up failure.

    Example:
        >>> st = start_server(["runs/reef", "runs/salmon"])  # doctest: +SKIP
        >>> st.prediction_url("reef"), st.key_file  # doctest: +SKIP
        ('http://127.0.0.1:8080/predictions/reef', '/.../runs/reef/serve/key_file.json')
    """
    opts = opts or ServeOptions()
    opts.validate()
    _warn_exposure(opts)  # first, so it is said even when start-up fails (and testable without Java)
    if not bundles:
        raise ServeError("nothing to serve: pass --run RUN (or --bundle DIR) at least once")
    bundles = [bundle_dir_of(b) for b in bundles]
    # First: a folder fieldid may clear, or one line and nothing touched (created further down).
    state_dir = claim_state_dir(state_dir or default_state_dir(bundles[0]), create=False)
    # "Is one running? No: start one" holds only if no other start runs between the two.
    with _start_lock(state_dir):
        return _start_locked(bundles, state_dir, opts)


def _start_lock_path(state_dir: Path) -> Path:
    """The lock a start of ``state_dir`` holds: in the user's temp folder, so a start that fails
    early (no Java, a port taken) leaves no trace in a state folder it never created."""
    import hashlib
    import tempfile

    folder = Path(tempfile.gettempdir()) / f"fieldid-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)
    return folder / f"serve-start-{hashlib.sha256(str(state_dir).encode()).hexdigest()[:20]}.lock"


@contextlib.contextmanager
def _start_lock(state_dir: Path) -> Iterator[None]:
    """Hold the start lock of ``state_dir`` (resolved) for the ``with`` block, or refuse at once.

    Raises:
        ServeError: another ``fieldid serve start`` of the same folder holds it.
    """
    import fcntl

    fd = os.open(_start_lock_path(state_dir), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with fd, also if this process dies
        except BlockingIOError:
            raise ServeError(f"another `fieldid serve start` is starting a server from {state_dir} right now; "
                             f"when it is done: fieldid serve status --state-dir {state_dir}") from None
        yield
    finally:
        os.close(fd)


def _start_locked(bundles: list[Path], state_dir: Path, opts: ServeOptions) -> ServerState:
    """:func:`start_server` once the state folder is checked and its start lock held."""
    if (state_dir / STATE_FILE).is_file():
        old = load_state(state_dir)
        if _is_running(old):
            raise ServeError(f"a server is already running from {state_dir} (pid {old.pid}); "
                             f"stop it first: fieldid serve stop --state-dir {state_dir}")
    java = find_java()
    for what, port in opts.ports().items():
        _check_port(opts.host if what == "inference" else "127.0.0.1", port, what)

    claim_state_dir(state_dir)
    store = state_dir / "model-store"
    shutil.rmtree(store, ignore_errors=True)  # only the requested models, freshly archived
    mars = build_model_store(bundles, store)
    versions = {name: {"version": bundle_version(load_manifest(b)), "bundle": str(b.resolve())}
                for name, b in zip(mars, bundles)}
    log_dir, tmp = state_dir / "logs", state_dir / "tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in (log_dir, tmp):
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_file = state_dir / "key_file.json"
    key_file.unlink(missing_ok=True)
    cfg_path = state_dir / "config.properties"
    atomic_write_text(cfg_path, config_properties(store, {n: v["version"] for n, v in versions.items()}, opts))
    log_cfg = atomic_write_text(state_dir / "log4j2.xml", log_config())

    env = dict(os.environ)
    for k in [k for k in env if k.startswith("TS_")]:
        del env[k]  # e.g. TS_DISABLE_TOKEN_AUTHORIZATION must not override this server's config
    env.update({
        "TEMP": str(tmp), "TMPDIR": str(tmp),  # own pid file, worker sockets and unpacked archives
        "LOG_LOCATION": str(log_dir), "METRICS_LOCATION": str(log_dir),
        "JAVA_HOME": str(Path(java).resolve().parent.parent),
        "FIELDID_SERVE_THREADS": str(opts.threads), "FIELDID_SERVE_MAX_PIXELS": str(opts.max_pixels),
        "FIELDID_SERVE_PRECISION": opts.precision,
        "OMP_NUM_THREADS": str(opts.threads),
    })
    if opts.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    # The launcher, run by *this* Python, passes its interpreter to the workers, so they import
    # the fieldid installed here. --foreground keeps it as the leader of a fresh process group.
    cmd = [sys.executable, "-c", "import sys; from ts.model_server import start; sys.exit(start())",
           "--start", "--foreground", "--ts-config", str(cfg_path), "--model-store", str(store), "--ncs",
           "--log-config", str(log_cfg)]
    if not opts.auth:
        cmd.append("--disable-token-auth")
    _write_pointers(bundles, state_dir)
    console = open(log_dir / "console.log", "ab")
    try:
        # umask 077: the key file, logs and sockets TorchServe creates are readable by this user only.
        proc = subprocess.Popen(cmd, cwd=state_dir, env=env, stdin=subprocess.DEVNULL, stdout=console,
                                stderr=subprocess.STDOUT, start_new_session=True, umask=0o077)
    finally:
        console.close()
    import psutil

    state = ServerState(
        pid=proc.pid, create_time=psutil.Process(proc.pid).create_time(), state_dir=str(state_dir),
        host=opts.host, ports=opts.ports(), models=versions, auth=opts.auth,
        key_file=str(key_file) if opts.auth else "", config=str(cfg_path), log_dir=str(log_dir),
        started=_now(), options=asdict(opts), tls=opts.tls,
        certificate=str(Path(opts.certificate).resolve()) if opts.tls else "",
    )
    state.to_json(state_dir / STATE_FILE)
    log.info("starting TorchServe (pid %d) for %s; logs in %s", proc.pid, ", ".join(versions), log_dir)
    try:
        wait_ready(state, opts.startup_timeout_s)
    except BaseException:
        stop_server(state_dir)
        raise
    return state


def stop_server(state_dir: str | Path, timeout: float = 30.0) -> dict[str, Any]:
    """Stop the server of ``state_dir``: its whole process group, verified gone.

    Only ``state_dir`` itself is cleaned up (its ``tmp/`` and ``key_file.json``; ``server.json``
    marked stopped), and only when it carries :data:`STATE_MARKER`; never the folder named
    inside ``server.json``.

    Returns:
        ``{"state_dir", "was_running", "stopped_pids"}``.

    Raises:
        ServeError: no server state there, or a process survived SIGKILL.
    """
    import psutil

    given = Path(state_dir)
    sd = (given.parent if given.name == STATE_FILE or given.is_file() else given).resolve()
    state = load_state(sd)
    procs = server_processes(state)
    was_running = bool(procs)
    if procs:
        for p in procs:
            try:
                p.send_signal(signal.SIGTERM)  # Java's shutdown hook stops its workers cleanly
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=timeout)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(alive, timeout=10)
    # Workers spawned while we were stopping would show up here too.
    left = server_processes(state)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=10)
    left = server_processes(state)
    if left:
        raise ServeError(f"processes {', '.join(str(p.pid) for p in left)} of the server in {state_dir} survived SIGKILL")
    if _is_marked(sd):
        (sd / "key_file.json").unlink(missing_ok=True)  # its keys died with the server
        shutil.rmtree(sd / "tmp", ignore_errors=True)
        state.status = "stopped"
        state.to_json(sd / STATE_FILE)
    else:
        log.warning("%s has no %s: %s, left the folder as it is", sd, STATE_MARKER,
                    "stopped the server" if was_running else "no server of it was running")
    return {"state_dir": str(sd), "was_running": was_running, "stopped_pids": sorted(p.pid for p in procs)}


def server_status(state_dir: str | Path) -> dict[str, Any]:
    """Is the server of ``state_dir`` running; its URLs, key file and each model's workers.

    Example:
        >>> server_status("runs/reef/serve")["models"]["reef"]["workers"]  # doctest: +SKIP
        ['READY']
    """
    state = load_state(state_dir)
    launcher = _launcher_alive(state)
    procs = server_processes(state) if state.status == "running" else []
    # The Java frontend and its workers keep serving if only the launcher died: still running.
    running = state.status == "running" and (launcher or bool(procs))
    models = {}
    for name, info in state.models.items():
        ws = model_workers(state, name) if running else []
        models[name] = {**info, "url": state.prediction_url(name), "workers": [w.get("status") for w in ws]}
    out: dict[str, Any] = {
        "state_dir": state.state_dir, "running": running, "pid": state.pid if running else None,
        "launcher_alive": launcher, "process_pids": sorted(p.pid for p in procs),
        "started": state.started, "inference_url": state.inference_url, "management_url": state.management_url,
        "auth": state.auth, "key_file": state.key_file or None, "log_dir": state.log_dir, "models": models,
        "tls": state.tls, "certificate": state.certificate or None,
    }
    if running and state.auth:
        try:
            keys = json.loads(Path(state.key_file).read_text())
        except (OSError, ValueError):
            keys = {}
        for kind in ("inference", "management"):
            out[f"{kind}_key_expires"] = keys.get(kind, {}).get("expiration time")
    return out


def rotate_key(state_dir: str | Path, kind: str = "inference") -> str:
    """Replace the ``inference`` or ``management`` key of a running server (they expire after
    ``--token-expiry-min``); TorchServe rewrites ``key_file.json`` in place.

    Returns:
        The key file's path.

    Example:
        >>> rotate_key("runs/reef/serve")  # doctest: +SKIP
        '/.../runs/reef/serve/key_file.json'
    """
    if kind not in ("inference", "management"):
        raise ServeError(f"key kind {kind!r}: use inference or management")
    state = load_state(state_dir)
    if not state.auth:
        raise ServeError(f"the server in {state.state_dir} runs without token authorization (--no-auth)")
    if not _is_running(state):
        raise ServeError(f"no server running from {state.state_dir}")
    # The API key never expires; it is only good for this call.
    status, body = http_json("POST", f"{state.management_url}/token?type={kind}", token=state.token("API"))
    if status != 200:
        raise ServeError(f"TorchServe refused to rotate the {kind} key: HTTP {status} {body}")
    return state.key_file
