"""TorchServe's ``key_file.json``: read one key. Stdlib only (used by the client and the server state)."""
from __future__ import annotations

import json
from pathlib import Path

from fieldid.cli_common import UsageError

__all__ = ["read_token"]


def read_token(key_file: str | Path, kind: str = "inference") -> str:
    """The ``inference`` (or ``management`` / ``API``) key from TorchServe's ``key_file.json``.

    Raises:
        UsageError: not JSON (e.g. half-written while TorchServe starts), or no such key.
        OSError: the file cannot be read.
    """
    try:
        keys = json.loads(Path(key_file).read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"{key_file}: not a TorchServe key file ({e})") from None
    try:
        return str(keys[kind]["key"])
    except (KeyError, TypeError):
        names = ", ".join(map(str, keys)) if isinstance(keys, dict) else type(keys).__name__
        raise UsageError(f"{key_file}: no {kind!r} key (has: {names})") from None
