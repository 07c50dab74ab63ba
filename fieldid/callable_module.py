"""Subpackages that are also functions: ``fieldid.export(run)`` next to ``fieldid.export.phone``. Stdlib only.

Why: ``fieldid.export`` and ``fieldid.serve`` are both API calls (:mod:`fieldid.api`) and
subpackages. ``import fieldid.export.phone`` sets the attribute ``fieldid.export`` to the
subpackage, so a plain function of that name would be replaced by the module depending on import
order. Giving the subpackage a module class with ``__call__`` makes both uses work, whichever
was imported first.
"""
from __future__ import annotations

import importlib
import sys
import types
from typing import Any

__all__ = ["forward_calls_to"]


def forward_calls_to(module_name: str, target: str) -> None:
    """Make the module ``module_name`` callable as ``target`` (``"package.module:function"``).

    The target is imported at the first call, the way every package here resolves its lazy
    names: the subpackage stays importable without the API layer above it.

    Example:
        >>> import fieldid.export.manifest, fieldid
        >>> callable(fieldid.export), fieldid.export.manifest.MANIFEST_SCHEMA_VERSION
        (True, 1)
    """
    where, _, name = target.partition(":")

    class CallableModule(types.ModuleType):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return getattr(importlib.import_module(where), name)(*args, **kwargs)

    CallableModule.__name__ = CallableModule.__qualname__ = f"CallableModule[{target}]"
    sys.modules[module_name].__class__ = CallableModule
