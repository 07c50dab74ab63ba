"""TorchServe's ``key_file.json``: read one key. Stdlib only (used by the client and the server state)."""
from __future__ import annotations

import json
from pathlib import Path

__all__ = ["read_token"]


def read_token(key_file: str | Path, kind: str = "inference") -> str:
    """The ``inference`` (or ``management`` / ``API``) key from TorchServe's ``key_file.json``."""
    keys = json.loads(Path(key_file).read_text())
    try:
        return str(keys[kind]["key"])
    except (KeyError, TypeError):
        raise ValueError(f"{key_file}: no {kind!r} key (has: {', '.join(keys)})") from None
