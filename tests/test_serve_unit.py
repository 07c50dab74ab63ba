"""serve/ without a running server: engine, TorchServe adapter, archive, config, CLI, Java check."""
from __future__ import annotations

import io
import json
import logging
import os
import random
import socket
import re
import subprocess
import sys
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fieldid.export.manifest import Manifest, load_manifest
from fieldid.export.phone import ImageInputError
from fieldid.serve.archive import ServeError, archive_bundle, bundle_version
from fieldid.serve.server import ServeOptions, config_properties, find_java, start_server, state_dirs_for

REPO = Path(__file__).resolve().parents[1]


def _png(size: tuple[int, int] = (96, 72), color: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def engine(tiny_bundle: Path):
    from fieldid.serve.engine import ClassifierEngine

    return ClassifierEngine.from_bundle(tiny_bundle, threads=1, max_pixels=1_000_000)


def test_engine_gives_each_request_its_own_status(engine, shapes_dir: Path) -> None:
    good = (sorted((shapes_dir / "circle").iterdir())[0]).read_bytes()
    big = _png((1100, 1000))  # 1.1 MP > the 1 MP limit, but a tiny file
    gif = _encode(Image.new("RGB", (32, 32)), "GIF")
    strip = _png((1, 20_000))  # 20k pixels, but 73 x 1.46M once the short side is resized
    bodies = [good, b"", random.Random(0).randbytes(300), gif, big, strip, ImageInputError("no body", 400), good]
    replies = engine.handle(bodies)
    assert [r.status for r in replies] == [200, 400, 415, 415, 413, 413, 400, 200]
    assert "elongated" in replies[5].body["error"]
    for r in replies[1:7]:
        assert set(r.body) == {"error", "status"} and r.body["status"] == r.status
    single = engine.predict(good)
    for r in (replies[0], replies[-1]):
        for a, b in zip(r.body["top_k"], single["top_k"]):
            assert a["label"] == b["label"] and a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_engine_answer_is_the_shared_schema(engine, shapes_dir: Path) -> None:
    from fieldid.export.phone import prediction

    m = engine.manifest
    ans = engine.predict((sorted((shapes_dir / "square").iterdir())[0]).read_bytes())
    ref = prediction(np.zeros(m.num_classes), m.labels, temperature=m.temperature,
                     fallback_threshold=m.fallback_threshold, model=m.name, version="v", source="device",
                     latency_ms=0.0)
    assert set(ans) == set(ref)
    assert ans["source"] == "server" and ans["model"] == m.name and ans["version"] == bundle_version(m)
    assert sum(t["probability"] for t in ans["top_k"]) == pytest.approx(1.0, abs=1e-6)
    assert ans["latency_ms"] > 0


def test_engine_refuses_weights_that_do_not_match_the_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    from fieldid.export.manifest import ManifestError
    from fieldid.serve.engine import ClassifierEngine

    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    with open(b / "model.onnx", "ab") as fh:  # the file the server runs
        fh.write(b"\0")
    with pytest.raises(ManifestError, match="sha256"):
        ClassifierEngine.from_bundle(b, warmup=False)


def test_engine_runs_only_a_verified_onnx_file(tiny_bundle: Path, tmp_path: Path) -> None:
    from fieldid.serve.engine import ClassifierEngine

    b = tmp_path / "unverified"
    shutil.copytree(tiny_bundle, b)
    m = Manifest.from_json(b / "manifest.json")
    for a in m.artifacts:
        if a["format"] == "onnx" and a["precision"] == "fp32":
            a["verification"]["status"] = "failed"
    m.to_json(b / "manifest.json")
    with pytest.raises(ServeError, match="did not pass verification"):
        ClassifierEngine.from_bundle(b, warmup=False)
    m.artifacts = [a for a in m.artifacts if a["format"] != "onnx"]
    m.to_json(b / "manifest.json")
    with pytest.raises(ServeError, match="no onnx/fp32 artifact.*--formats onnx"):
        ClassifierEngine.from_bundle(b, warmup=False)


def test_engine_and_demo_load_nothing_from_training(tiny_bundle: Path) -> None:
    """The server reads only the bundle: loading the engine (and answering) and the demo's server
    fallback import neither ``fieldid.training`` nor torch (checked in a fresh interpreter)."""
    code = (
        "import sys; from fieldid.serve.engine import ClassifierEngine; import fieldid.serve.fieldid_handler; "
        "import fieldid.edge_demo.fallback as f; import fieldid.serve.client, fieldid.serve.state; "
        f"e = ClassifierEngine.from_bundle({str(tiny_bundle)!r}, threads=1); "
        "import numpy as np; e.logits(np.zeros((2, 3, e.spec.crop_size, e.spec.crop_size), np.float32)); "
        "bad = sorted(m for m in sys.modules if m.startswith('fieldid.training') or m == 'torch'); "
        "assert not bad, bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("request_dict, expected", [
    ({"body": bytearray(b"abc")}, b"abc"),
    ({"data": b"abc"}, b"abc"),
    ({"photo": bytearray(b"abc")}, b"abc"),
    ({}, 400),
    ({"body": ""}, 400),
    ({"body": "some text"}, 415),
    ({"body": {"a": 1}}, 415),
    ({"a": b"x", "b": b"y"}, 415),
])
def test_adapter_maps_torchserve_requests(request_dict: dict, expected) -> None:
    from fieldid.serve.fieldid_handler import request_bytes

    got = request_bytes(request_dict)
    if isinstance(expected, bytes):
        assert got == expected
    else:
        assert isinstance(got, ImageInputError) and got.status == expected


def test_archive_holds_handler_weights_and_reduced_manifest(tiny_bundle: Path, tmp_path: Path) -> None:
    mar = archive_bundle(tiny_bundle, tmp_path / "store")
    m = load_manifest(tiny_bundle)
    assert mar == tmp_path / "store" / f"{m.name}.mar"
    with zipfile.ZipFile(mar) as z:
        names = set(z.namelist())
        assert {"fieldid_handler.py", "model.onnx", "manifest.json", "MAR-INF/MANIFEST.json"} <= names
        assert "model.pth" not in names and "model.int8.onnx" not in names
        inner = json.loads(z.read("manifest.json"))
        meta = json.loads(z.read("MAR-INF/MANIFEST.json"))
    assert [(a["format"], a["precision"]) for a in inner["artifacts"]] == [("onnx", "fp32")]  # only what it runs
    assert inner["labels"] == m.labels and inner["temperature"] == m.temperature
    assert meta["model"]["modelVersion"] == bundle_version(m) and meta["model"]["handler"] == "fieldid_handler.py"
    assert not list((tmp_path / "store").glob(".archive-*"))  # staging cleaned up

    cli = subprocess.run([sys.executable, "-m", "fieldid", "serve", "archive", "--bundle", str(tiny_bundle),
                          "--out", str(tmp_path / "cli-store")], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout.splitlines()[-1])["models"] == {m.name: str(tmp_path / "cli-store" / f"{m.name}.mar")}


def test_archiving_leaves_a_same_named_temp_folder_alone(tiny_bundle: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """torch-model-archiver stages in TMP/<model name> and deletes what was there: a user's folder of
    that name, or a second archiving of a same-named model running at the same time (two servers of
    runs named alike; the suite run in two processes met there and lost 17 tests)."""
    import tempfile

    tmp = tmp_path / "tmp"
    theirs = tmp / load_manifest(tiny_bundle).name
    theirs.mkdir(parents=True)
    (theirs / "notes.txt").write_text("someone else's")
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR in this process too
    mar = archive_bundle(tiny_bundle, tmp_path / "store")
    assert zipfile.is_zipfile(mar)
    assert (theirs / "notes.txt").read_text() == "someone else's"
    assert sorted(p.name for p in tmp.iterdir()) == [theirs.name]  # and nothing of ours is left there


def _java_props(text: str) -> dict[str, str]:
    """Enough of java.util.Properties.load for our file: key=value, one pass over the backslash
    escapes (\\uXXXX with surrogate pairs, \\n \\t \\r \\f, any other char taken literally)."""
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.split("=", 1)
            units, i = [], 0
            while i < len(v):
                if v[i] != "\\":
                    units.append(v[i])
                    i += 1
                elif v[i + 1] == "u":
                    units.append(chr(int(v[i + 2:i + 6], 16)))
                    i += 6
                else:
                    units.append({"n": "\n", "t": "\t", "r": "\r", "f": "\f"}.get(v[i + 1], v[i + 1]))
                    i += 2
            out[k] = "".join(units).encode("utf-16-be", "surrogatepass").decode("utf-16-be")
    return out


def test_config_is_loopback_and_locked_down(tmp_path: Path) -> None:
    store = tmp_path / "model-store"
    props = _java_props(config_properties(store, {"reef": "abc123"}, ServeOptions()))
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:")
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert props["enable_model_api"] == "false" and props["disable_token_authorization"] == "false"
    assert props["enable_envvars_config"] == "false"
    allowed = re.compile(props["allowed_urls"])
    assert allowed.fullmatch(f"file://{store.resolve().as_posix()}/reef.mar")
    for bad in ("file:///etc/passwd", "https://example.com/x.mar", f"file://{tmp_path.resolve().as_posix()}/x.mar"):
        assert not allowed.fullmatch(bad)
    models = json.loads(props["models"])
    assert models["reef"]["abc123"]["batchSize"] == 1 and models["reef"]["abc123"]["minWorkers"] == 1

    other = _java_props(config_properties(store, {"reef": "abc"}, ServeOptions(host="0.0.0.0", auth=False, batch_size=8)))
    assert other["inference_address"].startswith("http://0.0.0.0:")
    assert other["management_address"].startswith("http://127.0.0.1:")  # only inference moves
    assert other["disable_token_authorization"] == "true"
    assert json.loads(other["models"])["reef"]["abc"]["batchSize"] == 8


def test_cors_is_off_by_default_and_one_origin_when_asked(tmp_path: Path) -> None:
    store = tmp_path / "model-store"
    assert not any(k.startswith("cors") for k in _java_props(config_properties(store, {"reef": "a"}, ServeOptions())))
    props = _java_props(config_properties(store, {"reef": "a"}, ServeOptions(cors_origin="https://app.example.org:8443")))
    assert props["cors_allowed_origin"] == "https://app.example.org:8443"
    assert set(props["cors_allowed_methods"].split(", ")) == {"GET", "POST", "OPTIONS"}
    assert set(props["cors_allowed_headers"].split(", ")) == {"Authorization", "Content-Type"}
    for bad in ("app.example.org", "https://app.example.org/path", "https://a.org, https://b.org", "javascript:x"):
        with pytest.raises(ServeError, match="--cors-origin"):
            ServeOptions(cors_origin=bad).validate()
    ServeOptions(cors_origin="http://[::1]:5173").validate()
    ServeOptions(cors_origin="*").validate()


def test_config_values_survive_java_escaping(tmp_path: Path) -> None:
    """A state folder with spaces, an accent, a comma, '=' and ':' (and a character beyond the BMP)
    reads back as the same path; allowed_urls (which TorchServe splits on commas) has no raw comma."""
    store = tmp_path / "Fotos Zoë, 2026 a=b:c 🐟" / "model-store"
    text = config_properties(store, {"reef": "abc"}, ServeOptions())
    assert text.isascii()  # Properties.load reads ISO-8859-1: anything else must be \\u-escaped
    props = _java_props(text)
    assert props["model_store"] == store.resolve().as_posix()
    assert "," not in props["allowed_urls"]
    assert re.fullmatch(props["allowed_urls"], f"file://{store.resolve().as_posix()}/reef.mar")
    assert json.loads(props["models"])["reef"]["abc"]["marName"] == "reef.mar"


def test_options_are_validated() -> None:
    with pytest.raises(ServeError, match="ports must differ"):
        ServeOptions(port=9000, management_port=9000).validate()
    with pytest.raises(ServeError, match="precision"):
        ServeOptions(precision="int4").validate()
    with pytest.raises(ServeError, match="5 minutes"):
        ServeOptions(token_expiry_min=1).validate()


@pytest.mark.parametrize("host, auth, expected", [
    ("0.0.0.0", True, "binding the inference API to 0.0.0.0: it is reachable from other machines"),
    ("192.0.2.7", False, "reachable from other machines WITHOUT token authorization"),
    ("127.0.0.1", True, None),
    ("::1", False, None),
])
def test_non_loopback_host_warns_first(caplog, tmp_path: Path, host: str, auth: bool, expected) -> None:
    """The warning comes before anything else (Java check, bundles, ports), so it is said even when
    start-up then fails; here it fails at once on 'nothing to serve' and starts nothing."""
    with caplog.at_level(logging.WARNING, logger="fieldid.serve"):
        with pytest.raises(ServeError, match="nothing to serve"):
            start_server([], tmp_path / "state", ServeOptions(host=host, auth=auth))
    warnings = [r.getMessage() for r in caplog.records if r.name == "fieldid.serve" and r.levelno == logging.WARNING]
    if expected is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and expected in warnings[0], warnings
        assert auth or "WITHOUT token authorization" in warnings[0]
        assert not auth or "WITHOUT" not in warnings[0]
    assert not (tmp_path / "state").exists()


def test_cli_warns_about_a_public_host_on_stderr(tiny_bundle: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:  # start then fails on the port, before anything is started
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "fieldid", "serve", "start", "--bundle", str(tiny_bundle),
                               "--host", "0.0.0.0", "--port", str(port), "--state-dir", str(tmp_path / "state")],
                              cwd=REPO, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 2, proc.stderr
    assert "reachable from other machines" in lines[0] and "WITHOUT" not in lines[0]
    assert lines[1] == f"error: inference port 0.0.0.0:{port} is in use; pick another with --port"
    assert not (tmp_path / "state").exists()


def _fake_state(state_dir: Path, bundles: list[Path], status: str = "stopped") -> None:
    """A ``server.json`` as start_server writes it (the lookup reads only that file)."""
    from fieldid.serve.server import ServerState

    models = {b.parent.name: {"version": "v", "bundle": str(b.resolve())} for b in bundles}
    state_dir.mkdir(parents=True, exist_ok=True)
    ServerState(pid=1, create_time=0.0, state_dir=str(state_dir.resolve()), host="127.0.0.1",
                ports=ServeOptions().ports(), models=models, auth=False, key_file="", config="", log_dir="",
                started="2025-01-01T00:00:00+00:00", status=status).to_json(state_dir / "server.json")


def test_servers_of_a_run_are_found_from_any_of_its_runs(tiny_bundle: Path, tmp_path: Path) -> None:
    from fieldid.serve.server import _write_pointers

    runs = {}
    for name in ("a", "b", "c"):
        shutil.copytree(tiny_bundle, tmp_path / name / "export")
        runs[name] = tmp_path / name / "export"
    a_serve, b_serve, elsewhere = tmp_path / "a" / "serve", tmp_path / "b" / "serve", tmp_path / "elsewhere"
    _fake_state(a_serve, [runs["a"], runs["b"]])  # start --run a --run b
    _write_pointers([runs["a"], runs["b"]], a_serve.resolve())
    assert not (a_serve / "served_by.json").exists()  # a's own folder holds the state itself
    assert state_dirs_for(tmp_path / "b") == [a_serve.resolve()]
    assert state_dirs_for(tmp_path / "a") == [a_serve.resolve()]
    assert state_dirs_for(tmp_path / "c") == []

    _fake_state(b_serve, [runs["b"]])  # start --run b: its own server, the pointer stays
    _fake_state(elsewhere, [runs["c"], runs["b"]])  # start --run c --run b --state-dir elsewhere
    _write_pointers([runs["c"], runs["b"]], elsewhere.resolve())
    assert state_dirs_for(runs["b"]) == [b_serve.resolve(), a_serve.resolve(), elsewhere.resolve()]
    assert state_dirs_for(tmp_path / "c") == [elsewhere.resolve()]

    _fake_state(a_serve, [runs["a"]])  # a's folder later served a alone: that pointer is stale now
    assert state_dirs_for(runs["b"]) == [b_serve.resolve(), elsewhere.resolve()]
    pointer = json.loads((b_serve / "served_by.json").read_text())
    _write_pointers([runs["a"], runs["b"]], tmp_path.resolve() / "new")  # no server.json there: dropped
    assert json.loads((b_serve / "served_by.json").read_text())["state_dirs"] == [
        str(elsewhere.resolve()), str(tmp_path.resolve() / "new")]
    assert pointer["state_dirs"] == [str(a_serve.resolve()), str(elsewhere.resolve())]


def test_missing_java_is_one_clear_line(tiny_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(ServeError, match="openjdk-17"):
        find_java({"PATH": str(tmp_path)})
    env = {k: v for k, v in os.environ.items() if k != "JAVA_HOME"}
    env["PATH"] = str(tmp_path)  # no java anywhere; Python itself is started by absolute path
    proc = subprocess.run([sys.executable, "-m", "fieldid", "serve", "start", "--bundle", str(tiny_bundle),
                           "--state-dir", str(tmp_path / "state")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: java not found"), proc.stderr
    assert "apt-get install openjdk-17-jre-headless" in lines[0]
    assert not (tmp_path / "state").exists()


def test_java_here_is_recent_enough() -> None:
    assert Path(find_java()).name == "java"


def test_cli_help_and_torch_free_import() -> None:
    code = ("import sys, fieldid; p = fieldid.build_parser(); import fieldid.serve, fieldid.commands.serve, fieldid.serve.server, "
            "fieldid.serve.client, fieldid.serve.archive; assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)
    for action in ("archive", "start", "stop", "status", "rotate-key"):
        out = subprocess.run([sys.executable, "-m", "fieldid", "serve", action, "--help"], cwd=REPO,
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0 and "--run" in out.stdout and "--state-dir" in out.stdout


@pytest.mark.gpu
def test_engine_on_cuda_matches_cpu(tiny_bundle: Path, shapes_dir: Path) -> None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs CUDA and onnxruntime-gpu (CUDAExecutionProvider)")
    from fieldid.serve.archive import has_verified
    from fieldid.serve.engine import ClassifierEngine

    cpu = ClassifierEngine.from_bundle(tiny_bundle, device="cpu")
    gpu = ClassifierEngine.from_bundle(tiny_bundle, gpu_id=0)  # the verified fp16 ONNX file if any, else fp32
    fp16 = has_verified(load_manifest(tiny_bundle), "onnx", "fp16")
    assert gpu.device.type == "cuda" and gpu.precision == ("fp16" if fp16 else "fp32")
    assert gpu.session.get_providers()[0] == "CUDAExecutionProvider"
    files = [sorted(d.iterdir())[0].read_bytes() for d in sorted(shapes_dir.iterdir())]
    for a, b in zip(cpu.handle(files), gpu.handle(files)):
        assert a.body["top_k"][0]["label"] == b.body["top_k"][0]["label"]
        pa = {t["label"]: t["probability"] for t in a.body["top_k"]}
        pb = {t["label"]: t["probability"] for t in b.body["top_k"]}
        assert all(abs(pa[k] - pb[k]) < 2e-2 for k in pa)
