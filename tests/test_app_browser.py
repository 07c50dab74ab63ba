"""The phone app in a real browser: Debian's Chromium (Playwright, no browser download) emulating a phone.

The bundle's ONNX model runs *in the page* (onnxruntime-web, WebAssembly). Every answer read from
the page is held against ONNX Runtime in Python on the same file (top-1 equal, each probability
within 1e-3); the JavaScript preprocessing against ``fieldid.export.phone.preprocess``. Requests
may only go to the app's own origin (or the configured server). Offline use, the fallback to a real
TorchServe and a server that is down are exercised for real. One screenshot per mode goes to
test-output/app/.
"""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from PIL import Image

from fieldid.app.build import ORT_FILES, build_app, default_ort_dir, resolve_modes
from fieldid.app.server import running_app_server
from fieldid.export.manifest import load_manifest
from fieldid.export.phone import decode_image, preprocess, softmax
from fieldid.training.records import PreprocessSpec

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not (default_ort_dir() / ORT_FILES[0]).is_file(),
                                 reason="onnxruntime-web not installed: run `make app-deps` (npm ci in app/)")]

OUTPUT = Path(__file__).resolve().parents[1] / "test-output" / "app"
# A mid-size Android phone: viewport, touch, device scale, mobile user agent.
PHONE: dict[str, Any] = {
    "viewport": {"width": 393, "height": 851}, "screen": {"width": 393, "height": 851}, "device_scale_factor": 2.75,
    "is_mobile": True, "has_touch": True,
    "user_agent": ("Mozilla/5.0 (Linux; Android 14; Pixel 7) AppleWebKit/537.36 (KHTML, like Gecko) "
                   "Chrome/131.0.0.0 Mobile Safari/537.36"),
}
PROB_TOL = 1e-3


# ---------- photos (scikit-image's real photos, as phone-like files) ----------
def _encode(arr: np.ndarray, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt, **kw)
    return buf.getvalue()


def _rotated_jpeg(arr: np.ndarray) -> bytes:
    """A JPEG stored sideways with EXIF orientation 6, as phones write portrait photos."""
    im = Image.fromarray(arr)
    exif = im.getexif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from skimage import data

    d = tmp_path_factory.mktemp("photos")
    files = {
        "chelsea.jpg": _encode(data.chelsea(), "JPEG", quality=90),
        "coffee.jpg": _encode(data.coffee(), "JPEG", quality=75),
        "astronaut.png": _encode(data.astronaut(), "PNG"),
        "rocket.webp": _encode(data.rocket(), "WEBP", quality=85),
        "chelsea_portrait.jpg": _rotated_jpeg(data.chelsea()),
    }
    for name, b in files.items():
        (d / name).write_bytes(b)
    return {name: d / name for name in files}


# ---------- Python reference ----------
def python_ort(bundle: Path, precision: str, data: bytes) -> np.ndarray:
    """Calibrated probabilities from ONNX Runtime in Python: the app must agree with this."""
    return python_ort_outputs(bundle, precision, data)[0]


def python_ort_outputs(bundle: Path, precision: str, data: bytes) -> tuple[np.ndarray, float | None]:
    """(probabilities, unknown_score or None when the file has no unknown detector), ONNX Runtime in Python."""
    from fieldid.export.phone import onnx_session  # the sessions fieldid makes: exact int8 on every x86

    m = load_manifest(bundle)
    art = m.find("onnx", precision)
    unknown_output = next(a for a in m.artifacts if a["file"] == art.file).get("unknown_output") or ""
    sess = onnx_session(Path(bundle) / art.file, threads=None)
    x = preprocess(decode_image(data), m.preprocess_spec)
    names = [art.output_name] + ([unknown_output] if unknown_output else [])
    outs = sess.run(names, {art.input_name: x})
    return softmax(outs[0][0], m.temperature), (float(np.asarray(outs[1]).reshape(-1)[0]) if unknown_output else None)


def assert_matches_python(shown: dict[str, Any], probs: np.ndarray, labels: list[str]) -> None:
    assert shown["top1"] == labels[int(np.argmax(probs))]
    assert abs(shown["top1_prob"] - probs.max()) <= PROB_TOL
    page_probs = np.asarray(shown["raw"]["device"]["probabilities"])
    assert page_probs.shape == probs.shape and np.abs(page_probs - probs).max() <= PROB_TOL
    for t in shown["raw"]["device"]["answer"]["top_k"]:
        assert abs(t["probability"] - probs[t["index"]]) <= PROB_TOL and t["label"] == labels[t["index"]]


# ---------- browser and page helpers ----------


class AppPage:
    """One phone (browser context) with the app open; records every request the page makes."""

    def __init__(self, browser: Any, url: str, allowed: tuple[str, ...] = ()) -> None:
        self.context = browser.new_context(**PHONE)
        self.url = url
        self.requests: list[str] = []
        self.errors: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.allowed = (url.rstrip("/"), "data:", "blob:", *allowed)
        self.open()

    def open(self) -> None:
        self.page.goto(self.url)
        self.wait_ready()

    def wait_ready(self) -> None:
        self.page.wait_for_function("['idle', 'done', 'error'].includes(document.getElementById('app').dataset.state)"
                                    " && window.fieldid !== undefined", timeout=120_000)

    def wait_offline_ready(self) -> None:
        self.page.wait_for_function("document.getElementById('offline-status').dataset.ready === 'true' && "
                                    "navigator.serviceWorker.controller !== null", timeout=120_000)

    def mode(self, key: str) -> None:
        self.page.get_by_test_id(f"mode-{key}").tap()
        self.page.wait_for_function(f"document.getElementById('app').dataset.mode === '{key}'")

    def upload(self, path: Path, input_id: str = "upload") -> dict[str, Any]:
        before = self.page.locator("#app").get_attribute("data-run")
        self.page.set_input_files(f"#{input_id}", str(path))
        self.page.wait_for_function(f"document.getElementById('app').dataset.run !== '{before}' && "
                                    f"!['working', 'asking'].includes(document.getElementById('app').dataset.state)",
                                    timeout=120_000)
        return self.read()

    def read(self) -> dict[str, Any]:
        p = self.page
        raw = p.locator("#raw").text_content() or "{}"
        top1 = p.get_by_test_id("top1")
        visible = p.locator("#device-card").is_visible()
        return {
            "top1": top1.get_attribute("data-label") if visible else "",
            "top1_text": top1.inner_text() if visible else "",
            "top1_prob": float(p.get_by_test_id("top1-prob").get_attribute("data-probability")) if visible else None,
            "top1_prob_text": p.get_by_test_id("top1-prob").inner_text() if visible else "",
            "unknown": p.get_by_test_id("unknown").count() > 0,
            "error": p.locator("#error").inner_text() if p.locator("#error").is_visible() else "",
            "server_top1": (p.get_by_test_id("server-top1").get_attribute("data-label") or "")
            if p.locator("#server-card").is_visible() else None,
            "server_top1_prob": float(p.get_by_test_id("server-top1-prob").get_attribute("data-probability") or "nan")
            if p.locator("#server-card").is_visible() else None,
            "server_message": p.get_by_test_id("server-message").inner_text()
            if p.locator("#server-card").is_visible() else "",
            "device_info": p.get_by_test_id("device-info").inner_text() if visible else "",
            "raw": json.loads(raw),
            "state": p.locator("#app").get_attribute("data-state"),
        }

    def settings(self, **fields: str) -> None:
        p = self.page
        if not p.locator("#settings").evaluate("e => e.open"):
            p.locator("#settings summary").tap()
        for key, value in fields.items():
            el = p.locator(f"#{key}")
            if el.evaluate("e => e.tagName") == "SELECT":
                el.select_option(value)
            else:
                el.fill(value)
        p.locator("#settings-form button[type=submit]").tap()

    def outside(self) -> list[str]:
        return [u for u in self.requests if not u.startswith(self.allowed)]

    def close(self) -> None:
        self.context.close()


def screenshot(app: AppPage, name: str, tmp_path: Path) -> None:
    shot = tmp_path / f"{name}.png"
    app.page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    OUTPUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, OUTPUT / shot.name)


@pytest.fixture(scope="module")
def two_mode_app(tiny_bundle: Path, tiny_salmon_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Dive (tiny shapes bundle, named so) + Shop (tiny salmon run), no server configured, served on loopback.

    fp32 by default (the tests compare with Python's fp32 answers); int8 is chosen in the app's settings."""
    out = build_app(resolve_modes([("bundle", f"dive={tiny_bundle}"), ("run", str(tiny_salmon_run))]),
                    tmp_path_factory.mktemp("app2") / "build", precision="fp32", progress=False)
    with running_app_server(out) as srv:
        yield srv


# ---------- tests ----------
def test_js_preprocessing_is_the_manifests_bit_for_bit(browser: Any, two_mode_app: Any, photos: dict[str, Path]) -> None:
    """preprocess.js == fieldid.export.phone.preprocess on real photos, for every interpolation the
    manifest allows and crops with odd offsets (round-half-even), EXIF orientation included."""
    specs = [PreprocessSpec(73, 64), PreprocessSpec(256, 224, "bicubic"),
             PreprocessSpec(131, 117, "nearest", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)),
             PreprocessSpec(299, 260, "bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))]
    app = AppPage(browser, two_mode_app.url)
    try:
        for name, path in photos.items():
            data = path.read_bytes()
            img = decode_image(data)
            for spec in specs:
                d = {"resize_size": spec.resize_size, "crop_size": spec.crop_size,
                     "interpolation": spec.interpolation, "mean": list(spec.mean), "std": list(spec.std)}
                js = app.page.evaluate(
                    "async ([b, s]) => { const m = window.fieldid.config.modes[0]; const keep = m.preprocess;"
                    " m.preprocess = s; try { return await window.fieldid.preprocess(b, m.key); }"
                    " finally { m.preprocess = keep; } }", [base64.b64encode(data).decode(), d])
                py = preprocess(img, spec).reshape(-1)
                diff = np.abs(np.asarray(js, dtype=np.float32) - py)
                assert diff.max() == 0.0, (name, spec, float(diff.max()), int((diff > 0).sum()))
        # The portrait photo really is turned upright (EXIF orientation 6): width and height swap.
        data = photos["chelsea_portrait.jpg"].read_bytes()
        res = app.page.evaluate("([b]) => window.fieldid.classify(b, 'dive')", [base64.b64encode(data).decode()])
        assert tuple(res["image_size"]) == decode_image(data).size
        assert decode_image(data).size[::-1] == Image.open(io.BytesIO(data)).size
        assert app.outside() == [] and app.errors == []
    finally:
        app.close()


@pytest.mark.parametrize("key", ["dive", "shop"])
def test_upload_in_each_mode_matches_python_onnxruntime(browser: Any, two_mode_app: Any, photos: dict[str, Path],
                                                        tiny_bundle: Path, tiny_salmon_run: Path, key: str,
                                                        tmp_path: Path) -> None:
    bundle = {"dive": tiny_bundle, "shop": tiny_salmon_run / "export"}[key]
    labels = load_manifest(bundle).labels
    app = AppPage(browser, two_mode_app.url)
    try:
        app.mode(key)
        for name, path in photos.items():
            shown = app.upload(path)
            assert shown["error"] == "" and shown["state"] == "done", shown
            assert_matches_python(shown, python_ort(bundle, "fp32", path.read_bytes()), labels)
            assert shown["top1_prob_text"] == f"{100 * shown['top1_prob']:.2f}%"
            info = shown["device_info"]
            assert "ms on this device" in info and "ONNX fp32" in info and " MB" in info
            assert shown["raw"]["device"]["answer"]["source"] == "device"
        # The camera button is a capture input (the phone opens its camera); it runs the same path.
        assert app.page.locator("#camera").get_attribute("capture") == "environment"
        shown = app.upload(photos["coffee.jpg"], input_id="camera")
        assert_matches_python(shown, python_ort(bundle, "fp32", photos["coffee.jpg"].read_bytes()), labels)
        # Nothing wider than the phone's screen.
        assert app.page.evaluate("document.documentElement.scrollWidth") <= PHONE["viewport"]["width"]
        screenshot(app, f"app_{key}_phone", tmp_path)
        assert app.outside() == [], app.outside()[:5]
        assert app.errors == []
    finally:
        app.close()


def test_int8_is_selectable_and_matches_python(browser: Any, two_mode_app: Any, photos: dict[str, Path],
                                               tiny_bundle: Path) -> None:
    labels = load_manifest(tiny_bundle).labels
    app = AppPage(browser, two_mode_app.url)
    try:
        app.mode("dive")
        app.settings(precision="int8")
        shown = app.upload(photos["chelsea.jpg"])
        assert "ONNX int8" in shown["device_info"]
        assert_matches_python(shown, python_ort(tiny_bundle, "int8", photos["chelsea.jpg"].read_bytes()), labels)
        app.open()  # the choice is remembered on the phone
        assert app.page.locator("#precision").input_value() == "int8"
        assert app.outside() == []
    finally:
        app.close()


def test_still_classifies_with_the_network_cut(browser: Any, two_mode_app: Any, photos: dict[str, Path],
                                               tiny_bundle: Path, tiny_salmon_run: Path) -> None:
    app = AppPage(browser, two_mode_app.url)
    try:
        app.wait_offline_ready()
        app.context.set_offline(True)
        # The network is really gone: a file that was never cached cannot be fetched.
        assert app.page.evaluate("fetch('never-cached.txt').then(() => 'fetched', () => 'failed')") == "failed"
        app.page.reload()
        app.wait_ready()
        for key, bundle in (("dive", tiny_bundle), ("shop", tiny_salmon_run / "export")):
            app.mode(key)
            shown = app.upload(photos["astronaut.png"])
            assert shown["state"] == "done", shown
            assert_matches_python(shown, python_ort(bundle, "fp32", photos["astronaut.png"].read_bytes()),
                                  load_manifest(bundle).labels)
        # A phone that reopens the app later, still offline, gets it from the cache too.
        page2 = app.context.new_page()
        page2.goto(app.url)
        page2.wait_for_function("document.getElementById('app').dataset.state === 'idle'", timeout=120_000)
        page2.close()
        assert app.outside() == []
    finally:
        app.close()


def test_bad_files_get_a_message_and_the_app_keeps_working(browser: Any, two_mode_app: Any, photos: dict[str, Path],
                                                           tmp_path: Path) -> None:
    import pillow_heif
    from skimage import data

    notes = tmp_path / "notes.png"
    notes.write_text("this is not a photo")
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photos["chelsea.jpg"].read_bytes()[:400])
    heic = tmp_path / "iphone.heic"
    pillow_heif.from_pillow(Image.fromarray(data.chelsea())).save(str(heic), quality=80)
    app = AppPage(browser, two_mode_app.url)
    try:
        for path, message in ((notes, "not a photo this app can read"), (empty, "No photo received"),
                              (truncated, "not a photo this app can read"),
                              (heic, "cannot read HEIF photos on the device")):
            shown = app.upload(path)
            assert shown["state"] == "error" and message in shown["error"], (path.name, shown)
            assert shown["top1"] == "" and not shown["unknown"]
        shown = app.upload(photos["coffee.jpg"])  # the next photo works as usual
        assert shown["state"] == "done" and shown["top1"] and shown["error"] == ""
        assert app.errors == [] and app.outside() == []
    finally:
        app.close()


# ---------- server fallback ----------
def _strict_copy(bundle: Path, dest: Path) -> Path:
    """The bundle with fallback_threshold 1.0 in its manifest: every answer is "unsure", so every photo
    goes to the server as well (a user's strictest setting; the model files are untouched)."""
    shutil.copytree(bundle, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["fallback_threshold"] = 1.0
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest


def _in_distribution_photo(bundle: Path) -> Path:
    """A held-out photo of one of the bundle's classes (copied into the bundle at export): its detector
    accepts it, so with fallback_threshold 1.0 the device asks because it is *unsure*, not because the
    photo is unknown (a cat photo is unknown to the shapes model, and the page says so instead)."""
    m = json.loads((bundle / "manifest.json").read_text())
    known = [e["file"] for e in m.get("examples", []) if e.get("label") in m["labels"]]
    assert known, "the tiny bundle carries no held-out examples"
    return bundle / known[0]


def _asked_because(shown: dict[str, Any]) -> str:
    """The reason the page gives for asking the server, as app.js words it."""
    return "the device says unknown" if shown["raw"]["device"]["answer"].get("unknown") else "unsure"


def test_server_down_the_device_answer_stands(browser: Any, tiny_bundle: Path, photos: dict[str, Path],
                                              tmp_path: Path) -> None:
    from fixtures_edge_demo import unused_port

    down = f"http://127.0.0.1:{unused_port()}"
    out = build_app(resolve_modes([("bundle", str(_strict_copy(tiny_bundle, tmp_path / "b")))]), tmp_path / "app",
                    precision="fp32",
                    server=down, timeout_s=3, progress=False)
    with running_app_server(out) as srv:
        app = AppPage(browser, srv.url, allowed=(down,))
        try:
            photo = _in_distribution_photo(tiny_bundle)
            shown = app.upload(photo)
            assert shown["state"] == "done", shown
            assert_matches_python(shown, python_ort(tiny_bundle, "fp32", photo.read_bytes()),
                                  load_manifest(tiny_bundle).labels)
            msg = shown["server_message"]
            assert "not reachable" in msg and "device's answer stands" in msg and _asked_because(shown) in msg, msg
            assert shown["server_top1"] == "" and shown["raw"]["server"]["ok"] is False
            assert any(u.startswith(f"{down}/predictions/") for u in app.requests)  # it did try
            assert app.outside() == [] and app.errors == []
        finally:
            app.close()


@pytest.fixture(scope="module")
def app_with_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Any, Path]]:
    """An app whose bundle always asks (fallback_threshold 1.0), built with ``--server same-origin``, served
    by ``fieldid app serve --proxy`` in front of a real TorchServe (token auth on) serving the same model."""
    from fixtures_serve import torchserve_server

    tmp = tmp_path_factory.mktemp("app_srv")
    with torchserve_server([tiny_bundle], tmp / "state", device="cpu") as served:
        out = build_app(resolve_modes([("bundle", str(_strict_copy(tiny_bundle, tmp / "bundle")))]), tmp / "app",
                        precision="fp32",
                        server="same-origin", timeout_s=30, progress=False)
        with running_app_server(out, proxy=served.base_url) as srv:
            yield srv, served, out


def test_fallback_to_a_real_torchserve(browser: Any, app_with_server: tuple[Any, Any, Path], tiny_bundle: Path,
                                       photos: dict[str, Path], tmp_path: Path) -> None:
    srv, served, out = app_with_server
    labels = load_manifest(tiny_bundle).labels
    app = AppPage(browser, srv.url)  # every request, the server's included, goes to the app's own origin
    try:
        # Token pasted once in the settings; it lives in the phone's local storage only.
        app.settings(**{"server-token": served.token})
        assert app.page.evaluate("localStorage.getItem('fieldid.token')") == served.token
        for f in out.rglob("*"):  # never baked into the build
            assert not f.is_file() or served.token.encode() not in f.read_bytes(), f
        sent: list[dict[str, str]] = []
        app.page.on("request", lambda r: sent.append(r.headers) if "/predictions/" in r.url else None)
        path = _in_distribution_photo(tiny_bundle)
        shown = app.upload(path)  # below the threshold: the device asks by itself
        probs = python_ort(tiny_bundle, "fp32", path.read_bytes())
        assert_matches_python(shown, probs, labels)
        assert shown["state"] == "done" and _asked_because(shown) in shown["server_message"], shown
        server = shown["raw"]["server"]["answer"]
        assert server["source"] == "server" and shown["server_top1"] == shown["top1"]
        assert abs(shown["server_top1_prob"] - probs.max()) <= PROB_TOL
        assert any(h.get("authorization") == f"Bearer {served.token}" for h in sent)
        screenshot(app, "app_fallback_phone", tmp_path)
        # "Ask the server" on demand.
        before = app.page.locator("#app").get_attribute("data-asked") or "0"
        app.page.get_by_test_id("ask-server").tap()
        app.page.wait_for_function(f"(document.getElementById('app').dataset.asked || '0') !== '{before}'",
                                   timeout=60_000)
        assert "asked because you asked" in app.page.get_by_test_id("server-message").inner_text()
        # A wrong token: the server refuses, the device's answer stands.
        app.settings(**{"server-token": "not-the-key"})
        shown = app.upload(photos["coffee.jpg"])
        assert shown["state"] == "done" and shown["top1"], shown
        assert "refused the token" in shown["server_message"] and "device's answer stands" in shown["server_message"]
        assert app.outside() == [] and app.errors == []
    finally:
        app.close()


def test_plain_static_host_runs_then_isolates_itself(browser: Any, two_mode_app: Any, photos: dict[str, Path],
                                                     tiny_bundle: Path) -> None:
    """A static host that sends no COOP/COEP: the app runs on one thread; once its service worker is in
    control it serves the files with those headers, so the next start has WebAssembly threads."""
    import functools
    import http.server
    import threading

    app_dir = two_mode_app.app_dir
    quiet = type("Quiet", (http.server.SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    plain = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(app_dir)))
    t = threading.Thread(target=plain.serve_forever, daemon=True)
    t.start()
    try:
        app = AppPage(browser, f"http://127.0.0.1:{plain.server_address[1]}/")
        try:
            assert app.page.evaluate("[window.fieldid.isolated, window.fieldid.threads]") == [False, 1]
            shown = app.upload(photos["chelsea.jpg"])
            assert_matches_python(shown, python_ort(tiny_bundle, "fp32", photos["chelsea.jpg"].read_bytes()),
                                  load_manifest(tiny_bundle).labels)
            app.wait_offline_ready()
            app.page.reload()
            app.wait_ready()
            isolated, threads = app.page.evaluate("[window.fieldid.isolated, window.fieldid.threads]")
            assert isolated is True and threads >= 1
            shown = app.upload(photos["chelsea.jpg"])
            assert_matches_python(shown, python_ort(tiny_bundle, "fp32", photos["chelsea.jpg"].read_bytes()),
                                  load_manifest(tiny_bundle).labels)
            assert app.outside() == [] and app.errors == []
        finally:
            app.close()
    finally:
        plain.shutdown()
        plain.server_close()


def test_unknown_answer_matches_python(browser: Any, two_mode_app: Any, photos: dict[str, Path],
                                       tiny_bundle: Path) -> None:
    """Contract 2: with the bundle's unknown detector (ONNX output ``unknown_score``, manifest
    ``unknown.threshold``), the page says unknown exactly when Python ONNX Runtime's score is above
    the threshold. Without a detector in the bundle the page never says unknown (checked too)."""
    m = load_manifest(tiny_bundle)
    threshold = (getattr(m, "unknown", None) or {}).get("threshold")
    app = AppPage(browser, two_mode_app.url)
    try:
        app.mode("dive")
        for name, path in photos.items():
            shown = app.upload(path)
            probs, score = python_ort_outputs(tiny_bundle, "fp32", path.read_bytes())
            assert_matches_python(shown, probs, m.labels)
            answer = shown["raw"]["device"]["answer"]
            if score is None or threshold is None:
                assert not shown["unknown"] and answer["unknown"] is False and answer["unknown_score"] is None
                continue
            assert abs(answer["unknown_score"] - score) <= 1e-3 * max(1.0, abs(score)), (name, answer, score)
            assert shown["unknown"] is (score > threshold) is answer["unknown"], (name, score, threshold)
            if answer["unknown"]:
                assert answer["needs_fallback"] is True
        assert app.outside() == [] and app.errors == []
    finally:
        app.close()
