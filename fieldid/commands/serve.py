"""`fieldid serve archive|start|stop|status|rotate-key`. Torch-free at import time."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fieldid.cli_vocabulary import add_renamed
from fieldid.cli_common import HelpFormatter, UsageError

__all__ = ["register"]


def _bundles(args: argparse.Namespace) -> list[Path]:
    items = list(args.run or []) + list(args.bundle or [])
    if not items:
        raise UsageError("pass --run RUN (or --bundle DIR) at least once")
    return items


def _state_dir(args: argparse.Namespace) -> Path:
    from fieldid.serve.server import default_state_dir

    return args.state_dir or default_state_dir(_bundles(args)[0])


def _cmd_archive(args: argparse.Namespace) -> int:
    from fieldid.serve.archive import build_model_store

    from fieldid.serve.server import claim_state_dir

    # Into a server state folder only when it is one (or new): its model-store/ is replaced.
    store = args.out or claim_state_dir(_state_dir(args)) / "model-store"
    mars = build_model_store(_bundles(args), store, devices=args.device_run)
    for name, path in mars.items():
        print(f"{name}: {path}")
    print(json.dumps({"model_store": str(store), "models": {k: str(v) for k, v in mars.items()}}))
    return 0


def _options(args: argparse.Namespace) -> dict:
    """The ``ServeOptions`` fields the start flags set."""
    return dict(
        host=args.host, port=args.port, management_port=args.management_port, metrics_port=args.metrics_port,
        grpc_inference_port=args.grpc_port,
        grpc_management_port=args.grpc_management_port or args.grpc_port + 1, auth=not args.no_auth,
        token_expiry_min=args.token_expiry_min, workers=args.workers, threads=args.threads,
        batch_size=args.batch_size, max_batch_delay_ms=args.max_batch_delay_ms, max_request_mb=args.max_request_mb,
        max_pixels=args.max_pixels, precision=args.precision, device=args.device,
        response_timeout_s=args.response_timeout, startup_timeout_s=args.timeout, cors_origin=args.cors_origin or "",
        job_queue_size=args.job_queue_size, netty_threads=args.netty_threads,
        netty_client_threads=args.netty_client_threads, certificate=str(args.certificate or ""), private_key=str(args.private_key or ""),
    )


def _cmd_start(args: argparse.Namespace) -> int:
    from fieldid.api import serve_bundles
    from fieldid.cli_common import listen_host

    listen_host(args.host)
    if args.device_run:  # before anything starts: a server that answers with other labels is refused
        from fieldid.serve.archive import check_device_pairs

        check_device_pairs(_bundles(args), args.device_run)
    st = serve_bundles(*_bundles(args), state_dir=args.state_dir, **_options(args))  # warns itself about --host
    for name, info in st.models.items():
        print(f"serving {name} (version {info['version']}): {st.prediction_url(name)}")
    if st.auth:
        print(f"key file: {st.key_file}  (send 'Authorization: Bearer <inference.key>'; keep it private)")
    else:
        print("token authorization is OFF (--no-auth): local development only")
    first = next(iter(st.models))
    auth = ' -H "Authorization: Bearer $KEY"' if st.auth else ""
    ca = f" --cacert {st.certificate}" if st.tls else ""
    print(f"try: curl{auth}{ca} -H 'Content-Type: image/jpeg' --data-binary @photo.jpg {st.prediction_url(first)}")
    print(f"logs: {st.log_dir}")
    print(f"stop: fieldid serve stop --state-dir {st.state_dir}")
    print(json.dumps({"state_dir": st.state_dir, "pid": st.pid, "key_file": st.key_file or None,
                      "urls": {n: st.prediction_url(n) for n in st.models}}))
    return 0


def _servers_per_target(args: argparse.Namespace) -> list[list[Path]]:
    """For each given run/bundle, the state dirs of the servers started with it (``--state-dir``
    instead, when given). A model served from another run's folder is found through the
    ``served_by.json`` that ``start`` left in its own ``RUN/serve``."""
    from fieldid.serve.archive import ServeError
    from fieldid.serve.server import state_dirs_for

    if args.state_dir:
        return [[args.state_dir]]
    groups = [(t, state_dirs_for(t)) for t in _bundles(args)]
    missing = [str(t) for t, dirs in groups if not dirs]
    if len(missing) == len(groups):
        raise ServeError(f"no server was started for {', '.join(missing)} (start one with `fieldid serve start`)")
    for target in missing:
        print(f"note: no server was started for {target}", file=sys.stderr)
    return [dirs for _, dirs in groups]  # [] for a run never served


def _unique(dirs: list[Path]) -> list[Path]:
    return list(dict.fromkeys(dirs))


def _cmd_stop(args: argparse.Namespace) -> int:
    from fieldid.serve.server import stop_server

    results = []
    for state_dir in _unique([d for group in _servers_per_target(args) for d in group]):
        res = stop_server(state_dir, timeout=args.timeout)
        print("stopped" if res["was_running"] else "was not running", f"({res['state_dir']})")
        results.append(res)
    print(json.dumps(results[0] if len(results) == 1 else results))
    return 0


def _running_per_target(args: argparse.Namespace) -> tuple[dict[Path, dict], bool]:
    """Per target its running server(s), else its first (stopped) one, each with its
    :func:`server_status` (computed once per server); and whether every target is served."""
    from fieldid.serve.server import server_status

    status: dict[Path, dict] = {}
    chosen, all_running = [], True
    for group in _servers_per_target(args):
        for d in group:
            if d not in status:
                status[d] = server_status(d)
        running = [d for d in group if status[d]["running"]]
        all_running &= bool(running)  # a run never served counts as not running
        chosen += running or group[:1]
    return {d: status[d] for d in _unique(chosen)}, all_running


def _cmd_status(args: argparse.Namespace) -> int:
    chosen, all_running = _running_per_target(args)
    states = list(chosen.values())
    print(json.dumps(states[0] if len(states) == 1 else states, indent=2))
    return 0 if all_running else 3


def _cmd_key(args: argparse.Namespace) -> int:
    from fieldid.serve.server import rotate_key

    for state_dir in _running_per_target(args)[0]:
        path = rotate_key(state_dir, args.kind)  # a stopped one: one clear error line
        print(f"new {args.kind} key written to {path}")
    return 0


def _add_targets(p: argparse.ArgumentParser, with_devices: bool = False) -> None:
    p.add_argument("--run", type=Path, action="append", help="run directory whose export/ bundle to serve (repeatable)")
    p.add_argument("--bundle", type=Path, action="append", help="export bundle directory (repeatable)")
    if with_devices:
        p.add_argument("--device-run", type=Path, action="append", default=None, metavar="RUN",
                       help="device model (run or bundle) whose fallback the served model answers, one per --run/--bundle "
                            "in the same order; their labels must be identical (default: not checked)")
    p.add_argument("--state-dir", type=Path, default=None,
                   help="where the server keeps config, model store, logs, key file: a new or empty folder, or one "
                        "fieldid made (start clears parts of it) (default: RUN/serve of the first run; "
                        "stop/status/rotate-key without it act on every server started with a given run)")


def register(sub: argparse._SubParsersAction) -> None:
    from fieldid.serve.server import ServeOptions  # torch-free; its defaults are the flags' defaults

    d = ServeOptions()
    p = sub.add_parser("serve", help="full-precision fallback server (TorchServe): archive, start, stop, status, rotate-key",
                       formatter_class=HelpFormatter)
    ssub = p.add_subparsers(dest="serve_command", required=True, metavar="ACTION")

    a = ssub.add_parser("archive", help="build <name>.mar files (torch-model-archiver) into a model store",
                        formatter_class=HelpFormatter)
    _add_targets(a, with_devices=True)
    a.add_argument("--out", type=Path, default=None, help="model store folder (default: STATE_DIR/model-store)")
    a.set_defaults(func=_cmd_archive)

    s = ssub.add_parser("start", help="start TorchServe; returns when every model's workers are READY",
                        formatter_class=HelpFormatter)
    _add_targets(s, with_devices=True)
    s.add_argument("--host", default=d.host,
                   help="address of the inference API (management, metrics and gRPC always stay on 127.0.0.1)")
    s.add_argument("--port", type=int, default=d.port, help="inference API port")
    s.add_argument("--management-port", type=int, default=d.management_port, help="management API port (loopback)")
    s.add_argument("--metrics-port", type=int, default=d.metrics_port, help="metrics API port (loopback)")
    s.add_argument("--grpc-port", type=int, default=d.grpc_inference_port, help="gRPC inference port (loopback)")
    s.add_argument("--grpc-management-port", type=int, default=None,
                   help="gRPC management port (loopback; default: --grpc-port + 1)")
    s.add_argument("--no-auth", action="store_true", help="turn token authorization off (local development only)")
    s.add_argument("--token-expiry-min", type=float, default=d.token_expiry_min, help="minutes until the keys in key_file.json expire (renew: fieldid serve rotate-key)")
    s.add_argument("--workers", type=int, default=d.workers, help="Python workers per model")
    s.add_argument("--threads", type=int, default=d.threads, help="CPU threads per worker (1 is robust on shared CPUs)")
    s.add_argument("--max-batch", dest="batch_size", type=int, default=d.batch_size,
                   help="server-side batch size (1 = batching off)")
    s.add_argument("--max-batch-delay-ms", type=int, default=d.max_batch_delay_ms, help="how long a batch waits to fill up")
    s.add_argument("--max-request-mb", type=float, default=d.max_request_mb, help="larger request bodies are refused (413)")
    s.add_argument("--max-pixels", type=int, default=d.max_pixels, help="larger decoded images are refused (413)")
    s.add_argument("--precision", default=d.precision, choices=("auto", "fp32", "fp16"),
                   help="GPU precision: the bundle's verified ONNX file of it (auto = fp16 on GPU when the bundle "
                        "verified one, else fp32; CPU always runs the verified fp32 file)")
    s.add_argument("--device", default=d.device, choices=("auto", "cpu"), help="auto uses GPUs when present")
    s.add_argument("--response-timeout", type=int, default=d.response_timeout_s, help="seconds before a stuck worker is restarted")
    s.add_argument("--start-timeout", dest="timeout", type=float, default=d.startup_timeout_s,
                   help="seconds to wait for the workers to be READY")
    s.add_argument("--job-queue-size", type=int, default=d.job_queue_size,
                   help="requests queued per model before the server answers 503")
    s.add_argument("--netty-threads", type=int, default=d.netty_threads,
                   help="frontend (Netty) server threads; 0 = TorchServe's default, one per core")
    s.add_argument("--netty-client-threads", type=int, default=d.netty_client_threads,
                   help="frontend threads talking to the workers; 0 = TorchServe's default")
    s.add_argument("--certfile", dest="certificate", type=Path, default=None, metavar="FILE",
                   help="PEM certificate: the inference API speaks HTTPS (with --keyfile; default: plain HTTP)")
    s.add_argument("--keyfile", dest="private_key", type=Path, default=None, metavar="FILE",
                   help="PEM private key of --certfile")
    s.add_argument("--cors-origin", default=None, metavar="ORIGIN",
                   help="browser origin allowed to call the inference API, e.g. https://app.example.org "
                        "(the field app's; none: no CORS headers)")
    add_renamed(s, "serve start")
    s.set_defaults(func=_cmd_start)

    t = ssub.add_parser("stop", help="stop the server(s) of the given runs and every process they started",
                        formatter_class=HelpFormatter)
    _add_targets(t)
    t.add_argument("--stop-timeout", dest="timeout", type=float, default=30.0,
                   help="seconds of graceful shutdown before SIGKILL")
    add_renamed(t, "serve stop")
    t.set_defaults(func=_cmd_stop)

    u = ssub.add_parser("status", help="running?, URLs, key file, worker states as JSON (a list when the runs are "
                        "on several servers; exit 3 when a given run is not served)",
                        formatter_class=HelpFormatter)
    _add_targets(u)
    u.set_defaults(func=_cmd_status)

    k = ssub.add_parser("rotate-key", help="replace an expiring key of a running server (rewrites key_file.json)",
                        formatter_class=HelpFormatter)
    _add_targets(k)
    k.add_argument("--kind", default="inference", choices=("inference", "management"), help="which key")
    k.set_defaults(func=_cmd_key)
