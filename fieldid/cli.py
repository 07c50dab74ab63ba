"""``fieldid`` command line: a thin layer over the fieldid.training, .export, .serve and .edge_demo APIs.

Importing this module must not import torch: ``fieldid demo`` imitates a phone without it.
Each package contributes its sub-commands through ``<package>.cli.register``.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from typing import NoReturn

from fieldid import __version__

__all__ = ["main", "build_parser"]

# Packages that contribute sub-commands, in data-flow order.
_CLI_PACKAGES = ("training", "export", "serve", "edge_demo", "app")


class _Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``fieldid: error: ...`` line and exit code 2, like every other bad input.

    Sub-command parsers are made by ``add_subparsers``, which reuses this class.
    """

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"fieldid: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fieldid",
        description="From a folder of photos to a verified, phone-ready image classifier (offline).",
    )
    parser.add_argument("--version", action="version", version=f"fieldid {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for pkg in _CLI_PACKAGES:
        try:
            mod = importlib.import_module(f"fieldid.{pkg}.cli")
        except ModuleNotFoundError as e:
            if e.name != f"fieldid.{pkg}.cli":
                raise
            continue
        mod.register(sub)
    return parser


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="fieldid: %(message)s",
                        stream=sys.stderr)
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


def main(argv: list[str] | None = None) -> int:
    """Entry point. Bad input -> one ``error:`` line on stderr and exit code 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = args.verbose or os.environ.get("FIELDID_DEBUG") == "1"
    _configure_logging(verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if verbose:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        # Our error types (DataError, ConfigError, ModelError, RunError, ...) are ValueErrors.
        if isinstance(e, (ValueError, OSError, LookupError)) or _is_misconfiguration(e):
            print(f"error: {msg}", file=sys.stderr)
            return 2
        # A bug, not bad input: still one line, but a distinct exit code.
        print(f"error: internal error {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(rerun with -v for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
