"""Memory and time of an export: measured per format, and checked before a step needs more than is free.

Linux keeps a process's peak resident set size (``VmHWM`` in ``/proc/self/status``) and lets the
process reset it (writing ``5`` to ``/proc/self/clear_refs``), so each format's own peak can be read
in one process without a sampling thread. Elsewhere the lifetime peak (``ru_maxrss``) is reported,
and the record says so.

The free-memory check reads ``MemAvailable`` from ``/proc/meminfo``; ``FIELDID_MEMORY_LIMIT_MB``
(or the ``memory_limit_mb`` argument of :func:`export_run`) replaces it, so a test, a container
or a user who wants headroom for other jobs can state how much the export may use.
"""
from __future__ import annotations

import contextlib
import gc
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

__all__ = ["MEMORY_LIMIT_ENV", "FormatStats", "measure", "rss_mb", "available_mb", "MemoryRefusal",
           "check_memory", "free_memory"]

log = logging.getLogger("fieldid.export")
MEMORY_LIMIT_ENV = "FIELDID_MEMORY_LIMIT_MB"


class MemoryRefusal(ValueError):
    """A step would need more memory than the machine has free (a one-line message: what to lower)."""


def _status_kb(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_mb() -> float:
    """Current resident set size of this process in MB (0 where it cannot be read)."""
    kb = _status_kb("VmRSS")
    return kb / 1024 if kb is not None else 0.0


def _reset_peak() -> bool:
    """Start a new peak-RSS window; False where the OS keeps only the lifetime peak."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmHWM") is not None
    except OSError:
        return False


def _peak_mb() -> float:
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KB on Linux, bytes on macOS
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


@dataclass
class FormatStats:
    """One step's wall time and peak resident memory (what ``export_stats`` in the manifest holds)."""

    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    peak_scope: str = "step"  # "step": peak of this step alone; "process": lifetime peak (no reset here)
    estimate_mb: float | None = None  # what :func:`check_memory` expected the step to add, if it was asked
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = {"seconds": round(self.seconds, 1), "peak_rss_mb": round(self.peak_rss_mb),
             "rss_before_mb": round(self.rss_before_mb), "rss_after_mb": round(self.rss_after_mb),
             "peak_scope": self.peak_scope}
        if self.estimate_mb is not None:
            d["estimate_mb"] = round(self.estimate_mb)
        return {**d, **self.extra}


@contextlib.contextmanager
def measure(name: str) -> Iterator[FormatStats]:
    """Time a step and record its peak RSS; frees what it left behind before measuring ``rss_after``.

    Example:
        >>> with measure("onnx") as st:  # doctest: +SKIP
        ...     export_onnx(ctx)
        >>> st.peak_rss_mb  # doctest: +SKIP
        812.0
    """
    free_memory()
    st = FormatStats(rss_before_mb=rss_mb())
    st.peak_scope = "step" if _reset_peak() else "process"
    t0 = time.perf_counter()
    try:
        yield st
    finally:
        st.seconds = time.perf_counter() - t0
        st.peak_rss_mb = _peak_mb()
        free_memory()
        st.rss_after_mb = rss_mb()
        log.info("%s: %.1f s, peak RSS %.0f MB (%s), RSS %.0f -> %.0f MB", name, st.seconds, st.peak_rss_mb,
                 st.peak_scope, st.rss_before_mb, st.rss_after_mb)


def free_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS, so the next step starts low."""
    gc.collect()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)  # glibc keeps freed arenas otherwise


def available_mb(limit_mb: float | None = None) -> float | None:
    """Memory this export may still use: the stated limit minus what it holds, else ``MemAvailable``.

    Args:
        limit_mb: a cap for the whole process (beats ``FIELDID_MEMORY_LIMIT_MB``).

    Returns:
        MB, or ``None`` where nothing is known (no /proc, no limit): then no check is made.
    """
    if limit_mb is None:
        env = os.environ.get(MEMORY_LIMIT_ENV, "").strip()
        if env:
            try:
                limit_mb = float(env)
            except ValueError:
                raise MemoryRefusal(f"{MEMORY_LIMIT_ENV}={env!r} is not a number of MB") from None
    if limit_mb is not None:
        return limit_mb - rss_mb()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(step: str, need_mb: float, *, lower: str, limit_mb: float | None = None) -> None:
    """Refuse ``step`` in one line when it needs more than is free, naming what to lower.

    Args:
        step: what is about to run (``"onnx int8 calibration"``).
        need_mb: estimated extra MB the step will hold at its peak.
        lower: the options that reduce it (``"--calibration-size"``, ``"--formats"``).
        limit_mb: see :func:`available_mb`.

    Raises:
        MemoryRefusal: estimated need > available.
    """
    free = available_mb(limit_mb)
    if free is None:
        return
    log.debug("%s: needs ~%.0f MB, %.0f MB available", step, need_mb, free)
    if need_mb > free:
        raise MemoryRefusal(f"{step} needs about {need_mb:.0f} MB but only {max(free, 0):.0f} MB is free; "
                            f"lower {lower} (or free memory / raise {MEMORY_LIMIT_ENV})")
