"""What a benchmark ran on: CPU model, cores and the instruction-set features its numbers depend on.

int8 and bf16 speed-ups differ by an order of magnitude between a CPU with AVX-512 VNNI / bf16 /
AMX and one with only AVX2, so every benchmark table prints this line instead of a hard-coded one.
Torch-free and stdlib-only.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["busy_load", "cpu_features", "describe_machine", "git_commit", "measured_header"]

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
            f"{' '.join(features) if features else 'none of ' + ', '.join(_FEATURES)}")


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
