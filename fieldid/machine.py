"""What a benchmark ran on: CPU model, cores and the instruction-set features its numbers depend on.

int8 and bf16 speed-ups differ by an order of magnitude between a CPU with AVX-512 VNNI / bf16 /
AMX and one with only AVX2, so every benchmark table prints this line instead of a hard-coded one.
Torch-free and stdlib-only.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["busy_load", "cpu_features", "describe_machine", "git_commit", "keep_freed_memory", "measured_header"]

# /proc/cpuinfo flags that decide int8 / bf16 kernel speed, in the order they are printed.
_FEATURES = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model in ("", platform.machine(), platform.processor()):
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:  # not Linux: the model name from platform is all there is
        pass
    return model, flags


def cpu_features() -> list[str]:
    """The int8/bf16-relevant features this CPU reports (``[]`` where /proc/cpuinfo is absent).

    Example:
        >>> set(cpu_features()) <= set(_FEATURES)
        True
    """
    return _features(_cpuinfo()[1])


def _features(flags: set[str]) -> list[str]:
    return [f for f in _FEATURES if f in flags]


def describe_machine() -> str:
    """One line for a benchmark table, e.g. ``CPU: AMD EPYC 9B14, 2 logical cores; features: avx2 avx512f ...``."""
    model, flags = _cpuinfo()  # one read of /proc/cpuinfo for both
    features = _features(flags)
    return (f"CPU: {model}, {os.cpu_count()} logical cores visible; int8/bf16 features: "
            f"{' '.join(features) if features else 'none of ' + ', '.join(_FEATURES)}"
            f"{'; malloc keeps freed memory (fieldid processes)' if _kept_freed_memory else ''}")


# glibc's mallopt() parameters (malloc.h): M_TRIM_THRESHOLD and M_MMAP_MAX.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_kept_freed_memory = False


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for the process's next allocation; True if it now does.

    PyTorch's CPU allocator keeps no cache: each training or inference step mallocs its activations
    afresh and frees them. glibc serves such large blocks with ``mmap`` and returns them with
    ``munmap``, so the next step page-faults the same megabytes back in, each page zeroed by the
    kernel -- on a virtual machine where faults are dear that is much of a step's time (``fieldid
    bench train choices`` prints the faults, seconds per step and peak RSS both ways). With
    ``mmap`` off and a 1 GB trim threshold, freed blocks stay in the heap and are reused; the price
    is a higher peak RSS, since the heap does not shrink back between steps.

    Only for fieldid's own command-line processes (a library import must not change its host's
    allocator); left alone where the user tuned malloc already (``MALLOC_*_`` or
    ``GLIBC_TUNABLES``), where ``FIELDID_MALLOC=system`` asks for glibc's defaults, and off glibc.
    """
    global _kept_freed_memory
    if _kept_freed_memory:
        return True
    env = os.environ
    if env.get("FIELDID_MALLOC", "").lower() == "system" or "glibc.malloc" in env.get("GLIBC_TUNABLES", "") \
            or any(k.startswith("MALLOC_") and k.endswith("_") for k in env):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        ok = libc.mallopt(_M_MMAP_MAX, 0) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30) == 1
    except (OSError, AttributeError):
        return False
    _kept_freed_memory = ok
    return ok


def busy_load() -> tuple[float, int]:
    """``(1-minute load average, logical cores)``: a benchmark row records them so a table can tell a
    wall time measured beside other work from one on an idle machine (``(0.0, cores)`` where the OS
    has no load average)."""
    try:
        load = os.getloadavg()[0]
    except (OSError, AttributeError):
        load = 0.0
    return round(load, 1), os.cpu_count() or 1


def git_commit(repo: str | os.PathLike | None = None) -> str:
    """The short commit (``+dirty`` with uncommitted changes) a benchmark ran on; ``unknown`` outside git.

    Example:
        >>> isinstance(git_commit(), str)
        True
    """
    import subprocess

    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def measured_header(title: str, command: str, *, measured: str = "") -> str:
    """The head of every measurement page: title, the command that wrote it, date, commit and machine.

    ``measured`` adds when the rows were measured, for pages collected from earlier runs.
    Every number in the docs comes from a page that starts with this, never typed by hand.
    """
    import time

    return (f"# {title}\n\nWritten by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')}, commit {git_commit()}"
            f"{'; ' + measured if measured else ''}.\n\n{describe_machine()}\n\n")
