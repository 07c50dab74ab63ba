"""`fieldid app build` and `fieldid app serve` (the phone web app). Torch-free."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fieldid.cli_common import HelpFormatter, UsageError, listen_host

__all__ = ["register"]


def _cmd_build(args: argparse.Namespace) -> int:
    from fieldid.app.build import build_app, resolve_modes

    modes = resolve_modes(args.sources or [], meta=args.meta, title=args.title, description=args.description)
    build_app(modes, args.out, server=args.server or "", precision=args.precision, ort_dir=args.ort_dir,
              top_k=args.top_k, timeout_s=args.timeout)
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from fieldid.serve.config import exposure_warning

    from fieldid.app.server import make_server

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number (0-65535)")
    if args.keyfile and not args.certfile:
        raise UsageError("--keyfile needs --certfile")
    listen_host(args.host)
    exposed = exposure_warning("the app", args.host, " (it holds no secrets: the token stays on each phone)")
    if exposed:
        print(f"warning: {exposed}", file=sys.stderr, flush=True)
    srv = make_server(args.dir, args.host, args.port, certfile=args.certfile, keyfile=args.keyfile,
                      quiet=not args.log, proxy=args.proxy or "")
    via = f"; POST /predictions/ -> {args.proxy.rstrip('/')}" if args.proxy else ""
    try:  # Ctrl-C right after the banner (a script that waits for it, then stops us) is a clean stop too
        print(f"fieldid app at {srv.url} (COOP/COEP sent: WebAssembly threads on{via}; Ctrl-C to stop)", flush=True)
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


def _source(kind: str):
    """``--run`` and ``--bundle`` both append ``(kind, value)`` to one list, in command-line order."""
    def convert(value: str) -> tuple[str, str]:
        return kind, value
    convert.__name__ = kind  # argparse names the type in its error messages
    return convert


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "app", formatter_class=HelpFormatter,
        help="installable phone web app: the model runs in the phone's browser (offline), server fallback",
        description=("Build a static, installable web app (PWA) from export bundles: the ONNX model runs in the "
                     "phone's browser with onnxruntime-web (WebAssembly), offline after the first visit; "
                     "unsure answers go to the TorchServe server."),
    )
    cmds = p.add_subparsers(dest="app_command", required=True, metavar="{build,serve}")
    b = cmds.add_parser("build", formatter_class=HelpFormatter, help="bundle(s) -> static app folder",
                        description=("Write the app (page, service worker, onnxruntime-web, the bundles' ONNX "
                                     "models and their manifest settings) into --out. Each model is a tab with "
                                     "its own words: title and description from the model (its name and classes), "
                                     "app.yaml in its bundle or run folder, --meta FILE, or --title/--description. "
                                     "The two demo models (reef, salmon) get the demo's Dive and Shop words."))
    b.add_argument("--run", dest="sources", action="append", type=_source("run"), metavar="[KEY=]RUN", default=None,
                   help="run folder whose export/ bundle is a tab of the app; KEY names the tab (default: dive/shop "
                        "for the demo models, else the model's name); repeatable")
    b.add_argument("--bundle", dest="sources", action="append", type=_source("bundle"), metavar="[KEY=]DIR",
                   default=None, help="export bundle folder (with manifest.json) that is a tab of the app; as --run")
    b.add_argument("--meta", action="append", default=None, metavar="[KEY=]FILE",
                   help="YAML file of the words a tab shows: title, description, summary, cue, class_notes "
                        "(label: note); KEY may be left out with one model; repeatable")
    b.add_argument("--title", default=None, help="the app's title for its one model (default: the model's name)")
    b.add_argument("--description", default=None,
                   help="the line under the title for its one model (default: the classes it tells apart)")
    b.add_argument("--out", type=Path, required=True, help="build folder (replaced when it holds an earlier build)")
    b.add_argument("--server", default=None, metavar="URL",
                   help="TorchServe asked when the device is unsure: its inference API root, e.g. "
                        "https://gpu-box:8080 (started with `fieldid serve start --cors-origin APP_ORIGIN "
                        "--no-auth`), or 'same-origin': the app's own host, whose reverse proxy forwards "
                        "/predictions/ (`fieldid app serve --proxy`, nginx; keeps token auth). Default: none, "
                        "settable in the app. The token is pasted in the app, never built in")
    b.add_argument("--precision", choices=["auto", "fp32", "int8"], default="auto",
                   help="default in-browser model; auto = the phone's choice, the verified int8 model else fp32 "
                        "(as the demo and `fieldid predict`); the other stays selectable")
    b.add_argument("--top-k", type=int, default=3, help="classes shown per answer")
    b.add_argument("--timeout", type=float, default=5.0, help="seconds the app waits for the server")
    b.add_argument("--ort-dir", type=Path, default=None,
                   help="onnxruntime-web dist/ folder (default: app/node_modules/onnxruntime-web/dist, "
                        "installed by `make app-deps`)")
    b.set_defaults(func=_cmd_build)
    s = cmds.add_parser("serve", formatter_class=HelpFormatter, help="serve an app build for local testing",
                        description=("Serve a build folder with the headers the app wants (COOP/COEP for "
                                     "WebAssembly threads, no-cache on the version files)."))
    s.add_argument("dir", type=Path, help="the app build folder")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on (0 = any free port)")
    s.add_argument("--certfile", default=None, help="TLS certificate (PEM): serve HTTPS, which a phone on the "
                                                     "network needs for offline use")
    s.add_argument("--keyfile", default=None, help="TLS private key (PEM) for --certfile")
    s.add_argument("--proxy", default=None, metavar="URL",
                   help="forward POST /predictions/... to this TorchServe inference root (for apps built with "
                        "--server same-origin; the token passes through, auth stays on)")
    s.add_argument("--log", action="store_true", help="log every request")
    s.set_defaults(func=_cmd_serve)
