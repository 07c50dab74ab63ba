"""The demo in a real browser: Debian's Chromium driven by Playwright (no browser download).

A photo is uploaded in each mode and the prediction is read from the page, at phone width and
at desktop width; screenshots go to the test's tmp_path and one per mode to test-output/.
The page must work offline: no request may leave the app's own address.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Iterator

import pytest

from fieldid.edge_demo.modes import pretty_label

pytestmark = pytest.mark.browser

OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "edge_demo"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1100, "height": 1000}




def _open(browser, url: str, viewport: dict) -> tuple[object, list[str]]:
    page = browser.new_page(viewport=viewport)
    outside: list[str] = []
    base = url.rstrip("/")
    page.on("request", lambda r: None if r.url.startswith((base, "data:", "blob:")) else outside.append(r.url))
    page.goto(url)
    page.wait_for_selector("#dive-photo", timeout=60_000)
    return page, outside


def _identify_by_upload(page, key: str, photo: Path) -> tuple[str, str]:
    """Upload ``photo`` in mode ``key``; returns (top label shown or "", device info text)."""
    page.get_by_role("tab", name=key.capitalize()).click()
    info = page.locator(f"#{key}-device-info")
    before = info.inner_text()
    page.set_input_files(f"#{key}-photo input[type=file]", str(photo))
    page.wait_for_function(
        # While the request runs Gradio overlays its status tracker ("queue: 1/1 | 0.1s") on the old
        # text, which may already say "ms on this device": wait for the tracker to hide, too.
        "([sel, before]) => { const el = document.querySelector(sel); const t = el.innerText;"
        " const st = el.querySelector('[data-testid=\"status-tracker\"]');"
        " return (!st || st.classList.contains('hide')) && t !== before"
        " && (t.includes('ms on this device') || t.includes('⚠')); }",
        arg=[f"#{key}-device-info", before], timeout=60_000)
    # The label renders after the info text: wait for it (shown for an answer, cleared for a bad file).
    answered = "ms on this device" in info.inner_text()
    page.wait_for_function(
        "([sel, answered]) => { const el = document.querySelector(sel);"
        " const t = el ? el.innerText.trim() : ''; return answered ? t !== '' : t === ''; }",
        arg=[f"#{key}-device-label [data-testid='label-output-value']", answered], timeout=30_000)
    label = page.locator(f"#{key}-device-label [data-testid='label-output-value']")
    return (label.first.inner_text().strip() if label.count() else ""), info.inner_text()


@pytest.mark.parametrize("key", ["dive", "shop"])
def test_upload_in_each_mode_shows_the_prediction(browser, demo_app, key: str, tmp_path: Path) -> None:
    mode = demo_app.modes[key]
    photo = mode.examples[-1].path
    expected = mode.identify(photo.read_bytes()).device.response["top_k"][0]["label"]
    OUTPUT.mkdir(parents=True, exist_ok=True)
    for name, viewport in (("phone", PHONE), ("desktop", DESKTOP)):
        page, outside = _open(browser, demo_app.url, viewport)
        try:
            shown, info = _identify_by_upload(page, key, photo)
            assert shown == pretty_label(expected), info
            assert "ms on this device" in info and "ONNX" in info and "MB" in info
            # Phone width: nothing wider than the screen (no sideways scrolling).
            if name == "phone":
                assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
            shot = tmp_path / f"{key}_{name}.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 10_000
            shutil.copy(shot, OUTPUT / shot.name)
            assert outside == [], f"the page reached outside the app: {outside[:5]}"
        finally:
            page.close()


def test_example_click_and_bad_file_in_the_browser(browser, demo_app, tmp_path: Path) -> None:
    page, outside = _open(browser, demo_app.url, PHONE)
    try:
        # Tapping an example runs it and shows its true class beside the answer.
        info = page.locator("#dive-device-info")
        page.locator("#tab-dive button.gallery-item").first.click()
        page.wait_for_function("document.querySelector('#dive-device-info').innerText.includes('Held-out example')",
                               timeout=60_000)
        assert pretty_label(demo_app.modes["dive"].examples[0].label) in info.inner_text()
        # A file that is not a photo: a friendly message, then the next photo works again.
        bad = tmp_path / "notes.png"
        bad.write_text("this is not a photo")
        shown, text = _identify_by_upload(page, "dive", bad)
        assert "not a photo this app can read" in text and shown == ""
        page.screenshot(path=str(tmp_path / "bad_file.png"), full_page=True)
        shown, text = _identify_by_upload(page, "dive", demo_app.modes["dive"].examples[1].path)
        assert "ms on this device" in text and shown
        assert outside == [], outside[:5]
    finally:
        page.close()
