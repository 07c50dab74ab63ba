"""What every package's ``cli.py`` shares: help formatting, usage errors, one-line error messages, progress.

Stdlib only and torch-free: ``fieldid --help`` imports every ``cli.py``, and the field demo
imitates a phone without torch.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, NoReturn, TextIO

__all__ = ["HelpFormatter", "Parser", "first_line", "Progress", "redact_url_passwords", "RedactingFilter", "UsageError",
           "is_bad_input", "MissingExtra", "require_extra", "refuse_output_inside", "check_output_file", "http_url", "listen_host",
           "read_yaml", "not_a_folder"]

# scheme://user:PASSWORD@ (SQLAlchemy's rule: the password runs to the next '@'); not across
# white space or quotes, so a URL inside a sentence or a repr() is matched alone.
_URL_PASSWORD = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)[^@\s'\"]*@")


class UsageError(ValueError):
    """Bad input a user can fix (a flag, a path, a file's content) where no more specific fieldid
    error type fits: the CLI prints one ``error:`` line and exits 2.

    A builtin ``ValueError`` (or ``KeyError``, ``IndexError``) is not bad input: raised by a
    library or a slip in fieldid, it is a bug (exit 1). See :func:`is_bad_input`.
    """


def refuse_output_inside(out: str | os.PathLike | None, folder: str | os.PathLike, flag: str, what: str, *,
                         allowed: Callable[[Path], bool] | None = None) -> None:
    """UsageError when the output file ``out`` lies inside ``folder`` (links and ``..`` resolved), unless
    ``allowed(resolved out)`` says it may: a command must never overwrite what it reads (a photo of the
    dataset it checks, the manifest of the bundle it runs, the model of the run it evaluates).

    Example:
        >>> refuse_output_inside("photos/cat/1.jpg", "photos", "--json", "the dataset")
        Traceback (most recent call last):
        ...
        fieldid.cli_common.UsageError: --json photos/cat/1.jpg: inside the dataset photos; write it outside that folder
    """
    if out is None:
        return
    # realpath, not Path.resolve: a symlink loop is then just a path (resolve raises RuntimeError).
    target, root = Path(os.path.realpath(out)), Path(os.path.realpath(folder))
    if (target == root or root in target.parents) and not (allowed and allowed(target)):
        raise UsageError(f"{flag} {out}: inside {what} {folder}; write it outside that folder")


def check_output_file(out: str | os.PathLike, flag: str) -> None:
    """UsageError before any work when the output file ``out`` cannot be written: it is a folder, or
    a folder on its way is a file (was: ``[Errno 17] File exists`` after the whole check or evaluation).

    Example:
        >>> check_output_file(".", "--json")
        Traceback (most recent call last):
        ...
        fieldid.cli_common.UsageError: --json .: is a folder; give a file name
    """
    p = Path(out)
    if p.is_dir():
        raise UsageError(f"{flag} {out}: is a folder; give a file name")
    # absolute(), not abspath(): `f.txt/../o.json` must still meet f.txt; lexists: a dangling link counts.
    for parent in p.absolute().parents:
        if os.path.lexists(parent):
            if not parent.is_dir():
                raise UsageError(f"{flag} {out}: {parent} is not a folder")
            return


def http_url(url: str, flag: str = "URL") -> tuple[str, str, int, str]:
    """``(scheme, host, port, path with query)`` of an http(s) URL, the default port filled in.

    One parser for every URL a user gives (``--server``, ``--proxy``): ``urlsplit`` raises a plain
    ValueError on a broken one (``http://[::1``, port 99999), which would otherwise read as a bug.

    Example:
        >>> http_url("http://127.0.0.1:8080/predictions/reef?x=1")
        ('http', '127.0.0.1', 8080, '/predictions/reef?x=1')
        >>> http_url("http://127.0.0.1:99999", "--server")
        Traceback (most recent call last):
        ...
        fieldid.cli_common.UsageError: --server 'http://127.0.0.1:99999' is not a valid http(s) URL (port out of range 0-65535)
    """
    import urllib.parse

    try:
        u = urllib.parse.urlsplit(url)
        port = u.port
    except ValueError as e:
        raise UsageError(f"{flag} {url!r} is not a valid http(s) URL ({str(e).lower()})") from None
    if u.scheme not in ("http", "https") or not u.hostname:
        raise UsageError(f"{flag} {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8080)")
    if port == 0:  # not "the default port": no server listens on port 0
        raise UsageError(f"{flag} {url!r} is not a valid http(s) URL (port 0)")
    return u.scheme, u.hostname, port if port is not None else (443 if u.scheme == "https" else 80), \
        (u.path or "/") + (f"?{u.query}" if u.query else "")


class MissingExtra(UsageError):
    """An optional package a command needs is not installed; the message names the extra to install."""


# Import name -> the distribution pip installs (where they differ).
_DISTRIBUTIONS = {"sklearn": "scikit-learn", "skimage": "scikit-image"}


def listen_host(host: str, flag: str = "--host") -> str:
    """``host`` when this machine can listen on it (a name is looked up), else one :class:`UsageError`
    naming the flag (a typo'd name was ``[Errno -2] Name or service not known`` after the exposure warning).

    Example:
        >>> listen_host("127.0.0.1")
        '127.0.0.1'
    """
    import socket

    if not host.strip():
        raise UsageError(f"{flag} is empty; give an address to listen on, e.g. 127.0.0.1 (this machine only) or 0.0.0.0")
    try:
        socket.getaddrinfo(host.strip("[]"), None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"{flag} {host}: not an address this machine can listen on ({first_line(e)})") from None
    return host


def require_extra(module: str, extra: str, purpose: str) -> ModuleType:
    """Import ``module``, an optional dependency declared in ``fieldid[extra]``.

    Args:
        module: the import name, e.g. ``"skimage.data"``.
        extra: the extra in pyproject.toml that declares its package, e.g. ``"bench"``.
        purpose: what needs it, for the message, e.g. ``"fieldid data ood"``.

    Raises:
        MissingExtra: one line: what needs which package, and the pip command installing it.

    Example:
        >>> require_extra("json", "bench", "a doctest").__name__
        'json'
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise MissingExtra(f"{purpose} needs {_DISTRIBUTIONS.get(top, top)}, which is not installed: "
                           f"pip install 'fieldid[{extra}]'") from None


def is_bad_input(e: BaseException) -> bool:
    """Is ``e`` bad input (exit 2, HTTP 4xx) rather than a bug (exit 1, HTTP 5xx)?

    Bad input is explicit: fieldid's own error types (:class:`UsageError`, ``DataError``,
    ``ConfigError``, ``RecordError``, ``ServeError``, ... - every one a ``ValueError`` subclass
    defined in a fieldid module) and ``OSError`` (a missing file, a refused permission, a port in
    use, a server that does not answer: the environment the user pointed at). Anything else,
    a builtin ``ValueError``, ``KeyError`` or ``IndexError`` included, is a bug.

    Example:
        >>> is_bad_input(UsageError("--top-k must be >= 1")), is_bad_input(KeyError("labels"))
        (True, False)
    """
    if isinstance(e, OSError):
        return True
    return isinstance(e, ValueError) and any(
        issubclass(c, ValueError) and c.__module__.split(".")[0] == "fieldid" for c in type(e).__mro__)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help shows its default: ``(default: X)``, ``(default: none)`` for an unset value,
    ``(default: off)`` for a switch -- unless the help already says what the default is in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or not action.option_strings or action.required
                or "default" in text.lower() or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        if action.default is None or action.default is False or action.default == []:
            return f"{text} (default: {'off' if action.default is False else 'none'})"
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Usage mistakes as one ``PROG: error: ...`` line and exit code 2, like every other bad input.

    Sub-command parsers are made by ``add_subparsers``, which reuses this class (and its help
    formatter, :class:`HelpFormatter`, unless a parser names another).
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        # No prefixes of long flags: `--epoch 1` was taken as --epochs, and a flag added later
        # could silently change what an old command line means.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        self.exit(2, f"{self.prog.split()[0]}: error: {message} (see `{self.prog} --help`)\n")


def first_line(e: BaseException | str, default: str | None = None) -> str:
    """The first non-empty line of an exception's message (third-party errors carry pages of context).

    Args:
        e: the exception (or its message).
        default: what to say for an empty message (default: the exception's type name).

    Example:
        >>> first_line(ValueError("bad size\\n  at line 3"))
        'bad size'
        >>> first_line(KeyError())
        'KeyError'
    """
    text = str(e).strip()
    if text:
        return text.splitlines()[0].strip()
    return default if default is not None else (type(e).__name__ if isinstance(e, BaseException) else "")


def read_yaml(path: str | os.PathLike, error: Callable[[str], Exception]) -> object:
    """The parsed contents of a YAML file the user named (a config, a search space, app metadata).

    Every way the file can be unreadable is one line naming it, raised as ``error(message)``: the
    callers' own error types keep their exit codes, and the wording is the same for all of them.

    Example:
        >>> import tempfile; f = Path(tempfile.mkdtemp()) / "x.yaml"; _ = f.write_bytes(b"\\xff")
        >>> read_yaml(f, ValueError)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ValueError: ...x.yaml: not valid YAML (not UTF-8 text: byte 0)
    """
    import yaml

    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:  # a binary file where YAML text belongs (a ValueError, not an OSError)
        raise error(f"{path}: not valid YAML (not UTF-8 text: byte {e.start})") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({first_line(e)})") from None


def not_a_folder(path: str | os.PathLike) -> str:
    """Why ``path`` is no folder, for a one-line error: 'is a file, not a folder' or 'no such folder'."""
    return "is a file, not a folder" if Path(path).exists() else "no such folder"


def redact_url_passwords(text: str) -> str:
    """``text`` with the password of every ``scheme://user:password@host`` URL replaced by ``***``.

    Optuna storage URLs (``postgresql://user:password@host/db``) appear in error messages, in
    the JSON ``fieldid tune`` prints and in third-party log lines; none of them may show it.

    Example:
        >>> redact_url_passwords("cannot open 'postgresql://tuner:s3cret@db:5432/tune'")
        "cannot open 'postgresql://tuner:***@db:5432/tune'"
    """
    return _URL_PASSWORD.sub(r"\1***@", text)


class RedactingFilter(logging.Filter):
    """A handler filter that redacts URL passwords (:func:`redact_url_passwords`) in every record,
    whichever library logged it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_url_passwords(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True


class Progress:
    """A counted line on stderr (``label 40/120``) about every 10 % of ``total`` items.

    No dependency on tqdm, and the output reads well in logs as well as in a terminal.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> bar = Progress("predict", 20, stream=out)
        >>> for i in range(1, 21):
        ...     bar(i, 20)
        >>> out.getvalue().splitlines()[:2]
        ['predict 2/20 (10%)', 'predict 4/20 (20%)']
    """

    def __init__(self, label: str, total: int, *, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.label, self.total, self.enabled = label, max(0, int(total)), enabled
        self.stream = stream if stream is not None else sys.stderr
        self._next_pct = 10

    def __call__(self, done: int, total: int | None = None) -> None:
        """Report ``done`` items finished (``total`` may change, e.g. once a folder is listed)."""
        if total is not None:
            self.total = total
        if not self.enabled or not self.total:
            return
        pct = 100 * done // self.total
        if pct >= self._next_pct or done == self.total:
            print(f"{self.label} {done}/{self.total} ({pct}%)", file=self.stream, flush=True)
            self._next_pct = (pct // 10 + 1) * 10
