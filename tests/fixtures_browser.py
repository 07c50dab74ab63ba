"""One real Debian Chromium per test module, shared by the demo's and the phone app's browser tests."""
from __future__ import annotations

import shutil
from typing import Any, Iterator

import pytest

__all__ = ["CHROMIUM_ARGS", "browser"]

# Headless as root, and quiet on this closed network (no background lookups of Google's hosts).
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    exe = shutil.which("chromium")
    if exe is None:
        pytest.skip("Debian's chromium is not installed (`make test` installs it: apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()
