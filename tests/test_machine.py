"""fieldid's own processes keep freed memory (:func:`fieldid.machine.keep_freed_memory`): a training or
inference step's large blocks are reused instead of being handed back to the OS and page-faulted in again.
Each check runs in a fresh process, since glibc's malloc settings hold for a whole process."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

import fieldid.cli

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="the setting is glibc's mallopt()")

# A convolution's forward pass, as a training or inference step makes it: its 51 MB output is above the
# largest block glibc's defaults keep in the heap (32 MB), so by default each pass maps it afresh.
_PROBE = """
import resource, torch
from fieldid.machine import keep_freed_memory
kept = keep_freed_memory()
def faults(): return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
conv, x = torch.nn.Conv2d(32, 32, 3, padding=1), torch.randn(32, 32, 112, 112)
with torch.no_grad():
    for step in range(7):
        if step == 2:  # after the warm-up steps that grow the heap either way
            f0 = faults()
        conv(x).relu_().sum()
print(kept, faults() - f0)
"""
_PAGES = 5 * 32 * 32 * 112 * 112 * 4 // 4096  # five fresh outputs in 4 kB page faults


def _probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FIELDID_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_kept_freed_memory_is_reused_without_page_faults() -> None:
    kept, faults = _probe()
    assert kept == "True"
    # Reused from the heap: a few pages at most, where glibc's default (mmap, munmap) faults every page in.
    assert faults < _PAGES // 20, faults


@glibc
@pytest.mark.parametrize("env", [{"FIELDID_MALLOC": "system"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}],
                         ids=["asked-for-defaults", "user-tuned-malloc"])
def test_the_user_can_keep_glibcs_own_setting(env: dict[str, str]) -> None:
    kept, faults = _probe(**env)
    assert kept == "False"
    assert faults > _PAGES // 2, faults  # glibc's mmap for each block: the faults the setting saves


def test_every_command_line_process_applies_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(fieldid.cli, "keep_freed_memory", lambda: calls.append(1) or True)
    # A command that stops at bad input still ran under the setting: it is applied before any command.
    assert fieldid.cli.main(["predict", "--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "o.csv"),
                             str(tmp_path / "x.jpg")]) == 2
    assert calls == [1]
