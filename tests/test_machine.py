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
    for step in range(20):
        if step == 10:  # after the warm-up steps that grow the heap either way (a few, on a fresh heap)
            f0 = faults()
        conv(x).relu_().sum()
print(kept, faults() - f0)
"""
_OUTPUT_PAGES = 32 * 32 * 112 * 112 * 4 // 4096  # one fresh output in 4 kB page faults


def _probe(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "FIELDID_MALLOC"}
    out = subprocess.run([sys.executable, "-c", _PROBE], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


@glibc
def test_kept_freed_memory_is_reused_without_page_faults() -> None:
    kept, faults = _probe()
    assert kept == "True"
    # Reused from the heap: ten steps cost less than three outputs' pages (the heap may still grow once
    # or twice when another allocation lands above a freed block; it does not fault each step in), where
    # glibc's default (mmap, munmap) faults every step's pages in: about thirty outputs' worth here.
    assert faults < 3 * _OUTPUT_PAGES, faults


@glibc
@pytest.mark.parametrize("env", [{"FIELDID_MALLOC": "system"}, {"MALLOC_MMAP_THRESHOLD_": "65536"}],
                         ids=["asked-for-defaults", "user-tuned-malloc"])
def test_the_user_can_keep_glibcs_own_setting(env: dict[str, str]) -> None:
    kept, faults = _probe(**env)
    assert kept == "False"
    assert faults > 5 * _OUTPUT_PAGES, faults  # glibc maps each output afresh: the faults the setting saves


def test_every_command_line_process_applies_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(fieldid.cli, "keep_freed_memory", lambda: calls.append(1) or True)
    # A command that stops at bad input still ran under the setting: it is applied before any command.
    assert fieldid.cli.main(["predict", "--bundle", str(tmp_path / "none"), "--out", str(tmp_path / "o.csv"),
                             str(tmp_path / "x.jpg")]) == 2
    assert calls == [1]
