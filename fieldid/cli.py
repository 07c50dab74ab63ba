"""``fieldid`` command line: a thin layer over the fieldid.training, .export, .serve and .edge_demo APIs.

Importing this module must not import torch: ``fieldid demo`` imitates a phone without it.
Each stage's sub-commands come from :mod:`fieldid.commands` (``fieldid.commands.<stage>.register``);
``fieldid predict`` (which reads a bundle and may ask a server, so belongs to no single stage) is
registered here.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from fieldid import __version__
from fieldid.cli_common import (HelpFormatter, Parser, Progress, RedactingFilter, UsageError, first_line, is_bad_input,
                                 check_output_file, redact_url_passwords, refuse_output_inside)
from fieldid.machine import keep_freed_memory

__all__ = ["main", "build_parser"]

# Stages whose sub-commands fieldid.commands holds, in data-flow order.
_COMMAND_MODULES = ("training", "export", "serve", "edge_demo", "app")


def _cmd_predict(args: argparse.Namespace) -> int:
    from fieldid.api import Bundle, predict
    from fieldid.classify import TABLE_FORMATS, write_table

    if (args.run is None) == (args.bundle is None):
        raise UsageError("give exactly one of --run RUN or --bundle DIR")
    if args.out.suffix.lower() not in TABLE_FORMATS:  # before any work: a typo must not cost a whole run
        raise UsageError(f"{args.out}: --out must end in {' or '.join(TABLE_FORMATS)}")
    if args.k < 1:
        raise UsageError(f"--top-k must be >= 1 (got {args.k})")
    _check_predict_out(args)
    bar = Progress("predict", 0, enabled=not args.quiet)
    rows = predict(Bundle(args.run or args.bundle), args.photos, artifact=args.artifact, server=args.server,
                   server_run=args.server_run, key_file=args.key_file, ca_file=args.ca_file, k=args.k, progress=bar)
    write_table(rows, args.out)
    errors = sum(1 for r in rows if r["error"])
    sent = [r for r in rows if r["server"] is not None]
    print(json.dumps({"out": str(args.out), "photos": len(rows), "errors": errors,
                      "needs_fallback": sum(1 for r in rows if r["needs_fallback"]),
                      "unknown": sum(1 for r in rows if r["unknown"]), "sent_to_server": len(sent),
                      "server_errors": sum(1 for r in sent if "error" in r["server"]),
                      "artifact": rows[0]["artifact"] if rows else None}))
    return 0


def _check_predict_out(args: argparse.Namespace) -> None:
    """``--out`` never over what predict reads: the bundle's files, the run's own files, a photo.

    Inside a run (beside its ``export/``) a new file is fine, and so is a table an earlier predict
    wrote there; anything else that exists there belongs to the run.
    """
    from fieldid.classify import is_predict_table
    from fieldid.export.manifest import bundle_dir_of

    for source in (args.run or args.bundle, args.server_run):
        if source is None:
            continue
        bundle = bundle_dir_of(source)
        refuse_output_inside(args.out, bundle, "--out", "the bundle")
        if (bundle.parent / "run.json").is_file():  # a run's export/: the run around it is read too
            refuse_output_inside(args.out, bundle.parent, "--out", "the run",
                                 allowed=lambda t: not t.exists() or is_predict_table(t))
    check_output_file(args.out, "--out")
    out = os.path.realpath(args.out)
    if any(os.path.realpath(p) == out for p in args.photos):
        raise UsageError(f"--out {args.out}: is one of the photos to classify; write it elsewhere")


def _register_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="classify unlabelled photos with a bundle's artifact (and the server) to CSV or JSON",
        formatter_class=HelpFormatter,
        description="Runs every photo (folders are searched recursively) through the phone's preprocessing and "
                    "one exported artifact in its runtime here, and writes one row per photo: path, label, "
                    "probability, top-k, unknown, needs_fallback and, with --server, the server's answer for the "
                    "photos the device was unsure about. Unreadable files are rows with an error.")
    p.add_argument("photos", nargs="+", type=Path, metavar="PHOTO_OR_DIR", help="image files and/or folders")
    p.add_argument("--run", type=Path, default=None, help="run directory (uses its export/ bundle)")
    p.add_argument("--bundle", type=Path, default=None, help="export bundle directory")
    p.add_argument("--out", type=Path, required=True, help="result table: FILE.csv or FILE.json")
    p.add_argument("--artifact", default=None,
                   help="artifact file in the bundle, e.g. model.int8.pte (default: the int8 ONNX model a phone "
                        "ships, else the best other one with a runtime here)")
    p.add_argument("--server", default=None,
                   help="fallback server URL (http://HOST:PORT) for the photos the device is unsure about")
    p.add_argument("--server-run", type=Path, default=None, metavar="RUN_OR_BUNDLE",
                   help="the server model's run or bundle (e.g. runs/reef-server): ask the server for that model, "
                        "after checking its labels are the device's, in the same order")
    p.add_argument("--key-file", type=Path, default=None,
                   help="the server's key_file.json (default: the key of the server `fieldid serve start` "
                        "started for this bundle, sent only when it is the server at --server)")
    p.add_argument("--ca-file", type=Path, default=None,
                   help="PEM certificate to verify an https --server with (default: the system's CAs)")
    p.add_argument("--top-k", dest="k", type=int, default=3, help="classes listed per photo")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    p.set_defaults(func=_cmd_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fieldid",
        description="From a folder of photos to a verified, phone-ready image classifier (offline).",
    )
    parser.add_argument("--version", action="version", version=f"fieldid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for stage in _COMMAND_MODULES:
        importlib.import_module(f"fieldid.commands.{stage}").register(sub)
    _register_predict(sub)
    from fieldid import bench_cli  # every benchmark, across the stages: fieldid bench <what>

    bench_cli.register(sub)
    _verbose_after_the_command(parser)
    return parser


def _verbose_after_the_command(parser: argparse.ArgumentParser) -> None:
    """``fieldid export ... -v`` as well as ``fieldid -v export ...``: people add -v at the end of a
    command that just failed. Each command's own flag has its own ``dest`` (main reads both): a
    sub-parser's defaults are copied over the top-level namespace, so ``dest="verbose"`` with a
    False default would undo ``fieldid -v export``. Only commands, not groups (``bench``,
    ``serve``), get it: a group's flag would be overwritten by its command's default the same way."""
    for action in parser._actions:
        if not isinstance(action, argparse._SubParsersAction):
            continue
        for sub in action.choices.values():
            if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                _verbose_after_the_command(sub)
            elif "--verbose" not in sub._option_string_actions:
                sub.add_argument("-v", "--verbose", dest="verbose_here", action="store_true",
                                 help="debug logging and full tracebacks (also `fieldid -v COMMAND`)")


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="fieldid: %(message)s",
                        stream=sys.stderr)
    for handler in logging.getLogger().handlers:  # e.g. a storage URL in an Optuna or SQLAlchemy line
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
    for noisy in ("torch", "PIL", "matplotlib", "onnxscript", "onnx_ir", "coremltools", "executorch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for own_handler in ("lightning", "lightning.pytorch", "lightning.fabric"):
        # Lightning prints through its own handler; propagating would print every line twice.
        logging.getLogger(own_handler).propagate = False
    if not verbose:
        # Lightning's INFO lines are adverts and device banners; our own log says what matters.
        logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
        logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)
    if not verbose:
        # Third-party deprecation chatter (torch.jit, lightning hints) is not actionable for a user.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*sync_dist=True.*")


def _is_misconfiguration(e: BaseException) -> bool:
    """Lightning's ``MisconfigurationException``, recognised without importing lightning."""
    return any(c.__name__ == "MisconfigurationException" and c.__module__.startswith("lightning")
               for c in type(e).__mro__)


def _crash_log(e: BaseException) -> str:
    """Write ``e``'s traceback (URL passwords redacted) to an owner-only file; its path."""
    import tempfile
    import traceback

    fd, path = tempfile.mkstemp(prefix="fieldid-crash-", suffix=".log")  # mode 0600
    with os.fdopen(fd, "w") as fh:
        fh.write(f"fieldid {__version__}: {' '.join(sys.argv)}\n")
        fh.write(redact_url_passwords("".join(traceback.format_exception(e))))
    return path


def main(argv: list[str] | None = None) -> int:
    """Entry point. Bad input (:func:`fieldid.cli_common.is_bad_input`) -> one ``error:`` line on
    stderr and exit code 2; a bug -> one line naming a file with its traceback, exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as typed: a benchmark's page names it
    verbose = args.verbose or getattr(args, "verbose_here", False) or os.environ.get("FIELDID_DEBUG") == "1"
    for stream in (sys.stdout, sys.stderr):
        # A photo's file name that is not UTF-8 (an old camera, a zip from Windows) is printed as
        # \xNN escapes instead of failing the whole command on a strict UTF-8 terminal or pipe.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    _configure_logging(verbose)
    # fieldid's own processes only (never on import): PyTorch's CPU steps stop page-faulting their
    # activations back in each step, at the price of a higher peak RSS (fieldid.machine explains it).
    keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            import traceback

            print(redact_url_passwords("".join(traceback.format_exception(e))), file=sys.stderr, end="")
        if is_bad_input(e) or _is_misconfiguration(e):
            print(f"error: {redact_url_passwords(first_line(e))}", file=sys.stderr)
            return 2
        # A bug, not bad input (a stray KeyError, a library's ValueError): one line, a distinct
        # exit code, and the traceback where a bug report can quote it.
        try:
            where = f"traceback in {_crash_log(e)}"
        except OSError:
            where = "rerun with -v for the traceback"
        print(f"error: internal error {type(e).__name__}: {redact_url_passwords(first_line(e, ''))} "
              f"(a bug in fieldid; {where})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
