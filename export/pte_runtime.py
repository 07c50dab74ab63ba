"""ExecuTorch's process-wide XNNPACK threadpool, and ``.pte`` methods that cannot outlive it.

``_unsafe_reset_threadpool`` *replaces* the pool. A method loaded before a reset that runs after
it uses the freed pool: a use-after-free, which segfaults on some machines and passes silently on
others (CI crashed inside ``fieldid predict``, which loaded a ``.pte``'s unknown-score method and
then let the logits runner reset the pool). So here the pool is reset only when its size changes,
every method remembers the pool it was loaded under, and running it under a newer pool raises a
clear error instead of crashing.

Import-light on purpose: ``unknown.py`` and ``executorch_export.py`` both load methods through it.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

__all__ = ["load_pte_method", "native_stderr_silenced", "pool_threads", "set_threads"]

log = logging.getLogger("fieldid.export")
_pool_generation = 0  # bumped by every real reset; a method loaded under an older one must not run


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """XNNPACK's cpuinfo prints "[cpuinfo_utils.cpp] ..." lines from C++ on first use; hide them.

    Works on file descriptor 2 (C++ does not go through ``sys.stderr``). Failures still raise
    Python exceptions, so nothing actionable is lost; debug logging keeps everything.
    """
    if log.isEnabledFor(logging.DEBUG):
        yield
        return
    try:
        saved = os.dup(2)
    except OSError:
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def pool_threads() -> int:
    """Threads of ExecuTorch's XNNPACK pool now."""
    from executorch.extension.pybindings.portable_lib import _threadpool_get_thread_count

    return int(_threadpool_get_thread_count())


def set_threads(threads: int) -> None:
    """Give ExecuTorch's process-wide pool ``threads`` threads (0 = leave it as it is).

    A no-op when the pool already has that many, so loading a second ``.pte`` with the same
    setting does not invalidate the first. A real change invalidates every method loaded before:
    set threads first, then load.
    """
    global _pool_generation
    if not threads or pool_threads() == threads:
        return
    from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool

    with native_stderr_silenced():  # "[threadpool.cpp] Resetting threadpool to N threads."
        _unsafe_reset_threadpool(threads)
    _pool_generation += 1


def load_pte_method(path: str | Path, name: str = "forward") -> Callable[[list[Any]], list[Any]]:
    """``execute(inputs) -> outputs`` of method ``name`` of a ``.pte``, bound to the current pool.

    Raises:
        RuntimeError: when called after :func:`set_threads` replaced the pool it was loaded under.
    """
    from executorch.runtime import Runtime

    path = Path(path)
    with native_stderr_silenced():
        method = Runtime.get().load_program(path).load_method(name)
    loaded_under = _pool_generation

    def execute(inputs: list[Any]) -> list[Any]:
        if loaded_under != _pool_generation:
            raise RuntimeError(f"{path.name}: ExecuTorch's threadpool was replaced after this method was loaded "
                               f"(running it would use the freed pool); load it again after setting threads")
        return method.execute(inputs)

    return execute
