"""`fieldid demo` (the Gradio field demo). Torch-free, and Gradio is imported only when run."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from fieldid.cli_vocabulary import add_renamed
from fieldid.cli_common import HelpFormatter, UsageError, http_url, listen_host

__all__ = ["register", "assign_modes"]

_MODE_ORDER = ("dive", "shop")
_DEFAULT_SERVER = "http://127.0.0.1:8080"  # = edge_demo.fallback.DEFAULT_SERVER (not imported: keep --help fast)
_DEFAULT_PORT = 7860  # = edge_demo.app.DEFAULT_PORT (importing app imports Gradio)


class _SourceAction(argparse.Action):
    """``--run`` and ``--bundle`` append ``(kind, value)`` to one list, keeping command-line order."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        items = list(getattr(namespace, self.dest) or [])
        items.append((self.const, str(values)))
        setattr(namespace, self.dest, items)


def assign_modes(sources: list[tuple[str, str]],
                 mode_of: Callable[[Path], str | None] | None = None) -> dict[str, Path]:
    """``[("run", "dive=runs/reef"), ("run", "runs/salmon")]`` -> ``{"dive": ..., "shop": ...}``.

    A ``MODE=`` prefix names the mode. An unnamed source goes to the mode ``mode_of`` gives it
    (the CLI passes :func:`_mode_by_labels`: salmon's wild/farmed -> Shop) when that mode is
    free; the rest fill the free modes in order Dive, Shop. A run folder means its ``export/``
    bundle.

    Args:
        sources: ``(kind, "[MODE=]PATH")`` pairs in command-line order.
        mode_of: path -> the mode its model belongs to, or None when it cannot tell.

    Raises:
        ValueError: no source, more sources than modes, a mode given twice.

    Example:
        >>> assign_modes([("run", "runs/reef"), ("run", "shop=runs/salmon")])
        {'dive': PosixPath('runs/reef'), 'shop': PosixPath('runs/salmon')}
    """
    if not sources:
        raise UsageError("give a model: --run RUN or --bundle DIR (e.g. --run runs/reef --run runs/salmon)")
    named: dict[str, Path] = {}
    unnamed: list[Path] = []
    for kind, value in sources:
        mode, sep, path = value.partition("=")
        if sep and mode.lower() in _MODE_ORDER:
            mode = mode.lower()
            if mode in named:
                raise UsageError(f"mode {mode!r} is given twice (--{kind} {value})")
            named[mode] = Path(path)
        else:
            unnamed.append(Path(value))
    if len(named) + len(unnamed) > len(_MODE_ORDER):
        raise UsageError(f"{len(sources)} models given but there are only {len(_MODE_ORDER)} modes "
                         f"({', '.join(_MODE_ORDER)})")
    rest = []
    for path in unnamed:
        guess = mode_of(path) if mode_of else None
        if guess in _MODE_ORDER and guess not in named:
            named[guess] = path
        else:
            rest.append(path)
    named.update(zip([m for m in _MODE_ORDER if m not in named], rest))
    return {m: named[m] for m in _MODE_ORDER if m in named}


def _mode_by_labels(path: Path) -> str | None:
    """The mode whose built-in classes the bundle at ``path`` has; None when unknown or unreadable."""
    from fieldid.export.manifest import ManifestError, load_manifest

    from fieldid.appmeta import preset_for_labels

    from fieldid.edge_demo.device import DemoError, bundle_dir_of

    try:
        return preset_for_labels(load_manifest(bundle_dir_of(path)).labels)
    except (DemoError, ManifestError, OSError, ValueError):
        return None  # DemoMode reports a bad source when it loads it


def _state_dirs(args: argparse.Namespace, sources: list[Path]) -> list[Path]:
    """Where ``fieldid serve start`` may have left a ``server.json`` for these models."""
    if args.serve_state is not None:
        return [args.serve_state]
    from fieldid.serve.server import default_state_dir

    dirs = []
    for path in sources:
        try:
            dirs.append(default_state_dir(path))
        except ValueError:
            pass  # not a bundle: DemoMode reports that
    return dirs


def _server_for(model: str, args: argparse.Namespace, state_dirs: list[Path]):  # -> ServerConfig | None
    """--server/--key-file when given, else the server found in a state dir, else the default URL."""
    from fieldid.edge_demo.fallback import DEFAULT_SERVER, ServerConfig, find_server

    if args.no_server:
        return None
    found = None if args.server and args.key_file else find_server(model, state_dirs)
    url = args.server or (found.url if found else DEFAULT_SERVER)
    # The recorded server's key file goes along; fallback.ask_server sends its key only to the
    # server that key file belongs to (serve.client.token_for), never to another --server.
    # Never ./key_file.json from the working directory: a key is attached only when named.
    key_file = args.key_file or (found.key_file if found else None)
    ca_file = getattr(args, "ca_file", None) or (found.ca_file if found and found.url == url else None)
    return ServerConfig(url, key_file, ca_file)


def _warn_exposure(host: str, modes: list) -> None:
    """Say it when the demo listens beyond this machine; above all when its fallback attaches a key:
    anyone who reaches the page can then use that server with this user's inference key."""
    import logging

    from fieldid.serve.config import exposure_warning

    keyed = [m.server for m in modes if m.server is not None and m.server.key_file is not None]
    consequence = "".join(f"; anyone who reaches it can make it ask {s.url} with the inference key in {s.key_file}"
                          for s in dict.fromkeys(keyed))
    exposed = exposure_warning("the demo", host, consequence)
    if exposed:
        logging.getLogger("fieldid.edge_demo").warning("%s", exposed)


def _check_flags(args: argparse.Namespace) -> None:
    """Flag values out of range and a --host this machine cannot listen on, before a bundle is loaded
    (Gradio cannot bind port 0: it probes the port)."""
    if not 1 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port number (1-65535)")
    if args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1 (got {args.top_k})")
    if not args.timeout > 0:
        raise UsageError(f"--timeout must be > 0 seconds (got {args.timeout})")
    if args.threads < 1:
        raise UsageError(f"--threads must be >= 1 (got {args.threads})")
    listen_host(args.host)


def _cmd_demo(args: argparse.Namespace) -> int:
    from fieldid.edge_demo.modes import DemoMode

    if args.key_file is not None and not args.key_file.is_file():
        raise UsageError(f"--key-file {args.key_file} not found")
    if args.ca_file is not None and not args.ca_file.is_file():
        raise UsageError(f"--ca-file {args.ca_file} not found")
    if args.ca_file is not None:  # read now: a YAML or key file given by mistake is one line, not an error per photo
        from fieldid.serve.client import CertificateError, tls_context

        try:
            tls_context(args.ca_file)
        except CertificateError as e:
            raise UsageError(f"--ca-file: {e}") from None
    _check_flags(args)
    if args.server:
        http_url(args.server, "--server")  # a broken URL now, not as "Server unavailable" on every photo
    sources = assign_modes(args.sources or [], _mode_by_labels)
    # A stronger server model per mode (--server-run), matched to modes by the same rules.
    server_sources = assign_modes(args.server_sources, _mode_by_labels) if args.server_sources else {}
    if set(server_sources) - set(sources):
        extra = ", ".join(sorted(set(server_sources) - set(sources)))
        raise UsageError(f"--server-run for mode {extra}, which has no device model (--run)")
    modes = [DemoMode(key, path, precision=args.precision, timeout=args.timeout, threads=args.threads,
                      top_k=args.top_k) for key, path in sources.items()]
    for m in modes:  # labels must match, else the server's answers cannot stand in: one line, exit 2
        if m.key in server_sources:
            m.use_server_model(server_sources[m.key])
    state_dirs = [] if args.no_server else _state_dirs(args, [*server_sources.values(), *sources.values()])
    for m in modes:  # the server's model name is a manifest's, known once the bundles are loaded
        m.server = _server_for(m.server_model_name, args, state_dirs)
    from fieldid.edge_demo.app import build_app, launch_app  # Gradio: seconds to import, so only now

    app = build_app(modes)
    summary = {m.key: {"bundle": str(m.bundle_dir), "precision": m.default_precision,
                       "size_mb": round(m.model().size_bytes / 1e6, 2), "examples": len(m.examples),
                       "server": m.server.url if m.server else None, "server_model": m.server_model_name,
                       "key_file": str(m.server.key_file) if m.server and m.server.key_file else None}
               for m in modes}
    print(json.dumps({"modes": summary}), flush=True)
    for m in modes:
        if m.notice:
            print(f"note: {m.notice}", file=sys.stderr, flush=True)
    import logging

    _warn_exposure(args.host, modes)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes, one line each
    url = launch_app(app, host=args.host, port=args.port, block=False, quiet=True)
    print(f"fieldid demo running at {url} (Ctrl-C to stop)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", formatter_class=HelpFormatter,
        help="Gradio field app (Dive: reef fish, Shop: salmon): on-device ONNX, server fallback",
        description=("Field app imitating a phone: the bundle's ONNX model runs on this machine "
                     "(ONNX Runtime, no PyTorch) and the photo goes to TorchServe only when the "
                     "device is unsure. Modes: a model whose classes are the built-in reef fish goes "
                     "to Dive, one with wild/farmed to Shop; any other fills Dive first, then Shop; "
                     "or name them: --run dive=runs/reef --run shop=runs/salmon."),
    )
    p.add_argument("--run", dest="sources", action=_SourceAction, const="run", metavar="[MODE=]RUN", default=None,
                   help="run folder whose export/ bundle feeds a mode; MODE is dive or shop "
                        "(default: chosen by the model's classes, else Dive first, then Shop); "
                        "repeatable")
    p.add_argument("--bundle", dest="sources", action=_SourceAction, const="bundle", metavar="[MODE=]DIR", default=None,
                   help="export bundle folder (with manifest.json) feeding a mode; same rules as --run")
    p.add_argument("--server-run", dest="server_sources", action=_SourceAction, const="server-run",
                   metavar="[MODE=]RUN", default=None,
                   help="server model (run or bundle folder, e.g. runs/reef-server) that a mode's fallback asks "
                        "for instead of its own model; its labels must equal the device model's (checked at "
                        "start); modes assigned as for --run; repeatable (default: each mode asks for its own model)")
    p.add_argument("--precision", choices=["auto", "int8", "fp32"], default="auto",
                   help="on-device ONNX model; auto = the phone's choice, the verified int8 model else fp32 "
                        "(as `fieldid app build` and `fieldid predict`; switchable in the app)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="TorchServe inference URL asked when the device is unsure (default: the server "
                        f"`fieldid serve start` recorded in RUN/serve, else {_DEFAULT_SERVER})")
    p.add_argument("--key-file", type=Path, default=None,
                   help="TorchServe key_file.json with the inference token (default: the key of the server "
                        "`fieldid serve start` recorded, else none); its key is sent only to the server it "
                        "belongs to")
    p.add_argument("--ca-file", type=Path, default=None, metavar="FILE",
                   help="PEM CA (or the server's self-signed certificate) to verify an https --server "
                        "with (default: the recorded server's certificate, else the system's CAs)")
    p.add_argument("--state-dir", dest="serve_state", type=Path, default=None, metavar="DIR",
                   help="state directory of a `fieldid serve start` server to use (default: each "
                        "mode's RUN/serve)")
    p.add_argument("--no-server", action="store_true", help="never ask a server (on-device answers only)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the server")
    p.add_argument("--host", default="127.0.0.1", help="address the app listens on")
    p.add_argument("--port", type=int, default=_DEFAULT_PORT, help="port the app listens on")
    p.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads (a phone uses few)")
    p.add_argument("--top-k", type=int, default=3, help="classes shown per answer")
    add_renamed(p, "demo")
    p.set_defaults(func=_cmd_demo)
