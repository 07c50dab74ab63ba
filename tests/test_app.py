"""``fieldid app build`` / ``fieldid app serve`` without a browser: what goes into the build, bad input, headers.

The browser half (the model really running in Chromium) is tests/test_app_browser.py.
"""
from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fieldid.app.build import ORT_FILES, AppBuildError, build_app, default_ort_dir, resolve_modes
from fieldid.appmeta import DEMO_PRESETS
from fieldid.app.server import ISOLATION_HEADERS, running_app_server
from fieldid.export.manifest import file_sha256, load_manifest
from fieldid.export.phone import select_artifact

pytestmark = pytest.mark.skipif(not (default_ort_dir() / ORT_FILES[0]).is_file(),
                                reason="onnxruntime-web not installed: run `make app-deps` (npm ci in app/)")


def _fieldid(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fieldid", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd)


@pytest.fixture(scope="module")
def built(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("app") / "build"
    r = _fieldid("app", "build", "--bundle", str(tiny_bundle), "--out", str(out), "--server", "http://127.0.0.1:9/")
    assert r.returncode == 0, r.stderr
    assert "[1/1] shapes" in r.stdout and "app built in" in r.stdout  # progress lines
    return out


def test_build_carries_the_manifest_and_nothing_else(built: Path, tiny_bundle: Path) -> None:
    m = load_manifest(tiny_bundle)
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["server"] == "http://127.0.0.1:9" and cfg["top_k"] == 3
    (mode,) = cfg["modes"]
    assert mode["key"] == m.name == "shapes"
    assert mode["labels"] == m.labels and mode["temperature"] == m.temperature
    assert mode["fallback_threshold"] == m.fallback_threshold
    spec = m.preprocess_spec
    assert mode["preprocess"] == {"resize_size": spec.resize_size, "crop_size": spec.crop_size,
                                  "interpolation": spec.interpolation, "mean": list(spec.mean), "std": list(spec.std)}
    # Every verified ONNX file of the bundle, byte for byte, fp32 first; the default is the phone's file.
    onnx = {a.precision: a for a in m.artifact_list() if a.format == "onnx"
            if a.verification.get("status") != "failed"}
    assert [x["precision"] for x in mode["models"]] == [p for p in ("fp32", "int8") if p in onnx]
    assert mode["default_precision"] == select_artifact(m)[0].precision
    for x in mode["models"]:
        assert file_sha256(built / x["file"]) == x["sha256"] == onnx[x["precision"]].sha256
        # Contract 2: the unknown detector's output name as the manifest has it ("" = none: the app works without).
        assert x["unknown_output"] == onnx[x["precision"]].unknown_output
    unknown = getattr(m, "unknown", None) or {}
    assert mode["unknown_threshold"] == unknown.get("threshold")
    # onnxruntime-web's files, unchanged, and the pinned version recorded.
    for f in ORT_FILES:
        assert file_sha256(built / "ort" / f) == file_sha256(default_ort_dir() / f)
    lock = json.loads((Path(__file__).parents[1] / "app" / "package-lock.json").read_text())
    assert cfg["onnxruntime_web"] == lock["packages"]["node_modules/onnxruntime-web"]["version"] == "1.30.0"
    # Everything the service worker caches exists; the page references no other host.
    for rel in cfg["precache"]:
        assert rel == "./" or (built / rel).is_file(), rel
    for page in ("index.html", "app.js", "preprocess.js", "sw.js", "style.css", "manifest.webmanifest"):
        text = (built / page).read_text()
        assert "https://" not in text and "//cdn" not in text, page
    assert cfg["build_id"] in (built / "sw.js").read_text()
    web = json.loads((built / "manifest.webmanifest").read_text())
    assert {i["sizes"] for i in web["icons"]} == {"192x192", "512x512"}
    assert web["display"] == "standalone"


def test_rebuild_replaces_and_changes_the_build_id(built: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "app"
    build_app(resolve_modes([("bundle", str(tiny_bundle))]), out, progress=False)
    first = json.loads((out / "config.json").read_text())["build_id"]
    build_app(resolve_modes([("bundle", str(tiny_bundle))]), out, precision="fp32", top_k=5, progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["modes"][0]["default_precision"] == "fp32" and cfg["build_id"] != first
    assert not [p for p in tmp_path.iterdir() if p.name != "app"]  # no temp or old folders left


def test_a_demo_model_gets_its_preset_and_a_users_model_its_own_words(tiny_bundle: Path, tiny_salmon_run: Path,
                                                                      tmp_path: Path) -> None:
    """Dive and Shop are the demo's stories, not every model's: the salmon demo model (wild/farmed) gets the
    Shop words, the shapes model its own name and classes. (Every model used to be titled Dive or Shop.)"""
    out = build_app(resolve_modes([("run", str(tiny_salmon_run)), ("bundle", str(tiny_bundle))]), tmp_path / "a",
                    progress=False)
    cfg = json.loads((out / "config.json").read_text())
    shop, shapes = cfg["modes"]
    assert (shop["key"], shop["labels"]) == ("shop", load_manifest(tiny_salmon_run).labels)
    assert (shop["title"], shop["tagline"]) == (DEMO_PRESETS["shop"].title, DEMO_PRESETS["shop"].description)
    assert shapes["key"] == "shapes" and shapes["labels"] == load_manifest(tiny_bundle).labels
    words = json.dumps(shapes)
    for preset in DEMO_PRESETS.values():
        assert preset.title not in words and preset.description not in words and preset.summary not in words
    assert shapes["title"] == "Shapes" and all(x.capitalize() in shapes["tagline"] for x in shapes["labels"])
    assert shapes["class_notes"] == {}
    assert (out / "models" / "shop" / "model.onnx").is_file()


def test_a_users_words_from_meta_yaml_app_yaml_and_flags(tiny_bundle: Path, tmp_path: Path) -> None:
    labels = load_manifest(tiny_bundle).labels
    meta = tmp_path / "meta.yaml"
    meta.write_text(f"title: Garden shapes\ndescription: Which shape is it?\nclass_notes:\n  {labels[0]}: round\n")
    (mode,) = resolve_modes([("bundle", f"garden={tiny_bundle}")], meta=[f"garden={meta}"])
    assert (mode.key, mode.meta.title, mode.meta.description) == ("garden", "Garden shapes", "Which shape is it?")
    assert mode.meta.class_notes == {labels[0]: "round"}
    # A flag wins over the file; with one model, --meta needs no key.
    (mode,) = resolve_modes([("bundle", str(tiny_bundle))], meta=[str(meta)], title="Shapes at home")
    assert (mode.meta.title, mode.meta.description) == ("Shapes at home", "Which shape is it?")
    # app.yaml in the bundle folder is the model's own.
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    (bundle / "app.yaml").write_text("title: From the bundle\n")
    assert resolve_modes([("bundle", str(bundle))])[0].meta.title == "From the bundle"
    # Naming a demo preset's key asks for its words.
    assert resolve_modes([("bundle", f"dive={tiny_bundle}")])[0].meta.title == DEMO_PRESETS["dive"].title


@pytest.mark.parametrize("meta_text, expected", [
    ("colour: red\n", "unknown key 'colour'"),
    ("class_notes:\n  dragon: scaly\n", "not one of the model's classes"),
    ("- a list\n", "must be a mapping"),
    ("title: [unclosed\n", "not valid YAML"),
])
def test_bad_meta_is_one_line_and_exit_2(tiny_bundle: Path, tmp_path: Path, meta_text: str, expected: str) -> None:
    meta = tmp_path / "meta.yaml"
    meta.write_text(meta_text)
    r = _fieldid("app", "build", "--bundle", str(tiny_bundle), "--meta", str(meta), "--out", str(tmp_path / "out"))
    assert r.returncode == 2 and expected in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


@pytest.mark.parametrize("args, expected", [
    (["--run", "{missing}"], "no manifest.json"),
    (["--run", "{bundle}", "--server", "ftp://x"], "is not an http(s) URL"),
    (["--run", "{bundle}", "--server", "http://u:secret@host:8080"], "token is pasted in the app"),
    (["--run", "{bundle}", "--precision", "fp16"], "invalid choice"),
    (["--run", "{bundle}", "--top-k", "0"], "--top-k must be 1..20 (got 0)"),
    (["--run", "{bundle}", "--timeout", "nan"], "--timeout must be in (0, 120] seconds (got nan)"),
    (["--run", "{bundle}", "--ort-dir", "{missing}"], "make app-deps"),
    (["--run", "{bundle}", "--run", "{bundle}"], "given twice"),
    (["--run", "dive={bundle}", "--run", "dive={bundle}"], "given twice"),
    (["--run", "{bundle}", "--run", "b={bundle}", "--title", "T"], "describe one model"),
    (["--run", "{bundle}", "--run", "b={bundle}", "--meta", "{missing}"], "name the model it describes"),
])
def test_build_bad_input_is_one_line_and_exit_2(tiny_bundle: Path, tmp_path: Path, args: list[str],
                                                expected: str) -> None:
    args = [a.format(missing=tmp_path / "nope", bundle=tiny_bundle) for a in args]
    r = _fieldid("app", "build", *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    assert expected in r.stderr and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_build_never_replaces_a_folder_that_is_not_an_app(tiny_bundle: Path, tmp_path: Path) -> None:
    out = tmp_path / "photos"
    out.mkdir()
    (out / "holiday.jpg").write_bytes(b"precious")
    r = _fieldid("app", "build", "--run", str(tiny_bundle), "--out", str(out))
    assert r.returncode == 2 and "not a fieldid app build" in r.stderr
    assert (out / "holiday.jpg").read_bytes() == b"precious" and len(list(out.iterdir())) == 1


def test_build_refuses_a_damaged_model(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    with open(bundle / "model.onnx", "r+b") as f:
        f.seek(200)
        f.write(b"\0" * 16)
    with pytest.raises(AppBuildError, match="sha256 differs"):
        build_app(resolve_modes([("bundle", str(bundle))]), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def _get(url: str, path: str) -> tuple[int, dict[str, str], bytes]:
    host, port = url.split("//")[1].rstrip("/").split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def test_serve_sends_isolation_headers_and_types(built: Path) -> None:
    with running_app_server(built) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        status, headers, body = _get(srv.url, "/")
        assert status == 200 and b'data-testid="top1"' in body
        for k, v in ISOLATION_HEADERS.items():
            assert headers[k.lower()] == v
        assert headers["cache-control"] == "no-cache"
        for path, ctype in (("/ort/ort.wasm.min.mjs", "text/javascript"), ("/ort/ort-wasm-simd-threaded.wasm",
                            "application/wasm"), ("/manifest.webmanifest", "application/manifest+json"),
                            ("/sw.js", "text/javascript")):
            status, headers, _ = _get(srv.url, path)
            assert status == 200 and headers["content-type"].startswith(ctype), (path, headers)
            assert headers["cross-origin-embedder-policy"] == "require-corp"
        assert _get(srv.url, "/models/")[0] == 404  # no folder listings
        assert _get(srv.url, "/../../etc/passwd")[0] == 404


def test_serve_cli_refuses_a_folder_that_is_not_a_build(tmp_path: Path) -> None:
    r = _fieldid("app", "serve", str(tmp_path))
    assert r.returncode == 2 and "build the app first" in r.stderr and "Traceback" not in r.stderr
    r = _fieldid("app", "serve", str(tmp_path), "--port", "70000")
    assert r.returncode == 2 and "not a port number" in r.stderr


def test_serve_cli_serves_until_interrupted(built: Path) -> None:
    import signal

    # A shell that starts the test suite in the background (`.ci/run &`) ignores SIGINT, the child
    # inherits that, and Python then installs no Ctrl-C handler: the server never sees the signal
    # (found on a server left running after such a CI run). Give the child the terminal's default.
    p = subprocess.Popen([sys.executable, "-m", "fieldid", "app", "serve", str(built), "--port", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        line = p.stdout.readline()
        assert line.startswith("fieldid app at http://127.0.0.1:"), line + p.stderr.read()
        url = line.split(" at ")[1].split(" ")[0]
        assert _get(url, "/config.json")[0] == 200
    finally:
        p.send_signal(signal.SIGINT)
        try:
            assert p.wait(timeout=20) == 0, p.stderr.read()
        finally:
            if p.poll() is None:  # never leave a server behind, even when the assertion failed
                p.kill()
                p.wait()
