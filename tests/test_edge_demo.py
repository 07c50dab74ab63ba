"""edge_demo: on-device path, fallback (real TorchServe and server down), app API, CLI, torch-free.

Everything runs for real: the tiny run's exported ONNX model in ONNX Runtime, a launched
Gradio app driven over HTTP with ``gradio_client``, TorchServe from ``served_tiny``.
"""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fixtures_edge_demo import demo_client, unused_port
from helpers import malformed_exif_jpeg, png_header

from fieldid.commands.edge_demo import _mode_by_labels, assign_modes
from fieldid.appmeta import preset_for_labels
from fieldid.edge_demo.device import DemoError
from fieldid.edge_demo.examples import UNKNOWN_LABEL, data_origin, example_images
from fieldid.edge_demo.fallback import ServerConfig, ask_server, find_server
from fieldid.edge_demo.modes import MAX_FILE_BYTES, DemoMode, pretty_label
from fieldid.export.manifest import load_manifest
from fieldid.export.phone import ImageInputError, check_resize_fits, select_artifact

REPO = Path(__file__).resolve().parents[1]


def _png(size: tuple[int, int] = (80, 60), colour: tuple[int, int, int] = (40, 90, 160)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- CLI


def test_assign_modes_positional_and_named() -> None:
    assert assign_modes([("run", "runs/reef"), ("run", "runs/salmon")]) == {
        "dive": Path("runs/reef"), "shop": Path("runs/salmon")}
    # A named mode takes its slot; an unnamed one fills the free slot, whatever the order.
    assert assign_modes([("run", "shop=runs/salmon"), ("bundle", "b/reef")]) == {
        "dive": Path("b/reef"), "shop": Path("runs/salmon")}
    assert assign_modes([("run", "SHOP=x")]) == {"shop": Path("x")}
    # "=" in a path that does not start with a mode name is part of the path.
    assert assign_modes([("run", "runs/a=b")]) == {"dive": Path("runs/a=b")}


def test_an_unnamed_model_goes_to_the_mode_of_its_classes(tiny_salmon_run: Path, tiny_run: Path) -> None:
    assert preset_for_labels(["wild", "farmed"]) == "shop"
    assert preset_for_labels(["lionfish", "blue_tang"]) == "dive"
    assert preset_for_labels(["circle", "square"]) is None and preset_for_labels([]) is None
    # What `fieldid demo --run runs/salmon` does: the salmon run's manifest says wild/farmed -> Shop.
    assert _mode_by_labels(tiny_salmon_run) == "shop"
    assert _mode_by_labels(tiny_run) is None  # shapes: no mode's classes
    assert _mode_by_labels(tiny_run / "missing") is None
    assert assign_modes([("run", str(tiny_salmon_run))], _mode_by_labels) == {"shop": tiny_salmon_run}
    assert assign_modes([("run", str(tiny_salmon_run)), ("run", str(tiny_run))], _mode_by_labels) == {
        "dive": tiny_run, "shop": tiny_salmon_run}
    # A named mode still wins; an unknown model keeps the Dive-then-Shop order.
    assert assign_modes([("run", f"dive={tiny_salmon_run}")], _mode_by_labels) == {"dive": tiny_salmon_run}
    assert assign_modes([("run", str(tiny_run))], _mode_by_labels) == {"dive": tiny_run}


@pytest.mark.parametrize("sources, message", [
    ([], "give a model"),
    ([("run", "a"), ("run", "b"), ("run", "c")], "only 2 modes"),
    ([("run", "dive=a"), ("bundle", "dive=b")], "given twice"),
])
def test_assign_modes_errors(sources: list, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        assign_modes(sources)


def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fieldid import main

    for argv in (["demo", "--run", str(tmp_path / "missing")], ["demo"],
                 ["demo", "--run", "a", "--run", "b", "--bundle", "c"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    missing = tmp_path / "nokey.json"
    assert main(["demo", "--run", "runs/reef", "--key-file", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --key-file {missing} not found", err


def test_cli_help_documents_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from fieldid import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    out = capsys.readouterr().out
    for flag in ("--run", "--bundle", "--precision", "--server", "--key-file", "--state-dir", "--no-server",
                 "--timeout", "--host", "--port", "--threads", "--top-k"):
        assert flag in out
    assert "dive=runs/reef" in out and "Dive" in out and "Shop" in out  # how modes are assigned
    sub = build_parser()._subparsers._group_actions[0].choices["demo"]
    assert all(a.help for a in sub._actions), [a.dest for a in sub._actions if not a.help]


# --------------------------------------------------------------------------- on-device path


@pytest.fixture(scope="module")
def dive(tiny_bundle: Path) -> DemoMode:
    return DemoMode("dive", tiny_bundle, server=None)


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_examples_are_held_out_and_interleaved(dive: DemoMode, tiny_run: Path) -> None:
    split = json.loads((tiny_run / "split.json").read_text())
    # The export copied held-out photos into the bundle, byte for byte (small PNGs).
    held_out = {_sha(Path(split["root"]) / rel) for rel, _ in split["files"]["test"]}
    ex = dive.examples
    labels = dive.manifest.labels
    assert len(ex) == 2 * len(labels)
    assert {_sha(e.path) for e in ex} <= held_out
    assert all(e.path.is_relative_to(dive.bundle_dir / "examples") for e in ex)  # read from the bundle
    assert [e.label for e in ex[:len(labels)]] == labels  # one of each class first
    for e in ex:
        assert e.path.parent.name == e.label  # ImageFolder: the folder is the class
    assert example_images(tiny_run, dive.manifest) == ex


def test_a_copied_bundle_shows_its_own_examples(dive: DemoMode, tiny_run: Path, tiny_salmon_run: Path,
                                                tmp_path: Path) -> None:
    """Moved elsewhere, or into another run's folder, a bundle shows the photos it was exported with."""
    bundle = tmp_path / "elsewhere" / "bundle"
    shutil.copytree(dive.bundle_dir, bundle)
    assert not (bundle / "split.json").exists() and not (bundle.parent / "split.json").exists()
    manifest = load_manifest(bundle)
    manifest.source_run = str(tmp_path / "gone")  # the run it came from is not needed
    copied = example_images(bundle, manifest)
    assert [(e.path.relative_to(bundle), e.label) for e in copied] == \
        [(e.path.relative_to(dive.bundle_dir), e.label) for e in dive.examples]
    # The salmon bundle dropped into the shapes run's folder: salmon photos, not that run's shapes.
    other_run = tmp_path / "shapes_run"
    other_run.mkdir()
    shutil.copy(tiny_run / "split.json", other_run / "split.json")
    shutil.copytree(tiny_salmon_run / "export", other_run / "export")
    mode = DemoMode("shop", other_run)
    assert mode.examples and {e.label for e in mode.examples} == {"wild", "farmed"}
    assert all(e.path.is_relative_to(other_run / "export" / "examples") for e in mode.examples)
    assert mode.origin.synthetic  # recorded at export, not looked up beside the bundle


@pytest.mark.parametrize("bad", ["../../split.json", "/etc/passwd", "examples/../../x.png", "model.onnx",
                                 "C:/photos/a.jpg"])
def test_example_paths_outside_the_bundle_are_refused(tiny_bundle: Path, tmp_path: Path, bad: str) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    d = json.loads((bundle / "manifest.json").read_text())
    d["examples"][0]["file"] = bad
    (bundle / "manifest.json").write_text(json.dumps(d))
    from fieldid.export.manifest import ManifestError

    with pytest.raises(ManifestError, match=r"examples\[0\]\.file"):
        load_manifest(bundle)
    with pytest.raises(DemoError, match=r"examples\[0\]"):
        DemoMode("dive", bundle)


def test_a_symlinked_example_is_not_followed_out_of_the_bundle(tiny_bundle: Path, tmp_path: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    manifest = load_manifest(bundle)
    first = bundle / manifest.examples[0]["file"]
    outside = tmp_path / "private.png"
    outside.write_bytes(_png())
    first.unlink()
    first.symlink_to(outside)
    assert [e.path for e in example_images(bundle, manifest)] == \
        [bundle / e["file"] for e in manifest.examples[1:] if e["label"] != UNKNOWN_LABEL]  # held-out ones


def test_export_copies_examples_small_upright_and_browser_ready(tiny_bundle: Path, tmp_path: Path) -> None:
    """HEIC and big photos become JPEGs of <= MAX_SIDE px, upright; small PNGs are copied as they are."""
    from fieldid.export.examples import MAX_SIDE, add_examples

    data = tmp_path / "data"
    for label in ("circle", "square", "triangle"):
        (data / label).mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # portrait phone photo
    Image.new("RGB", (400, 300), (200, 30, 30)).save(data / "circle" / "IMG_1.HEIC", "HEIF", exif=exif.tobytes())
    Image.new("RGB", (3000, 2000), (30, 200, 30)).save(data / "square" / "big.jpg", quality=90)
    (data / "triangle" / "small.png").write_bytes(_png())
    run = tmp_path / "run"
    run.mkdir()
    files = [["circle/IMG_1.HEIC", 0], ["square/big.jpg", 1], ["triangle/small.png", 2]]
    split = {"root": str(data), "labels": ["circle", "square", "triangle"], "presplit": False, "seed": 0,
             "files": {"train": [], "val": [], "test": files}}
    (run / "split.json").write_text(json.dumps(split))
    manifest, stage = load_manifest(tiny_bundle), tmp_path / "stage"
    add_examples(manifest, run, stage)
    assert manifest.examples == [{"file": "examples/circle/IMG_1.jpg", "label": "circle"},
                                 {"file": "examples/square/big.jpg", "label": "square"},
                                 {"file": "examples/triangle/small.png", "label": "triangle"}]
    heic, big = Image.open(stage / "examples/circle/IMG_1.jpg"), Image.open(stage / "examples/square/big.jpg")
    assert heic.format == "JPEG" and heic.size == (300, 400)  # upright: a browser shows what the model sees
    assert big.format == "JPEG" and max(big.size) == MAX_SIDE
    assert (stage / "examples/triangle/small.png").read_bytes() == _png()
    assert manifest.training_data == {"root": str(data), "synthetic": False}
    manifest.validate()
    # A path in split.json that leaves the dataset is refused, naming the entry.
    split["files"]["test"][1][0] = "../outside.jpg"
    (run / "split.json").write_text(json.dumps(split))
    with pytest.raises(ValueError, match=r"split.json: files.test\[1\] '../outside.jpg' leaves the dataset"):
        add_examples(manifest, run, tmp_path / "stage2")


def test_a_run_whose_photos_are_gone_exports_no_examples_and_says_so(tiny_bundle: Path, tmp_path: Path) -> None:
    from fieldid.export.examples import add_examples

    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"root": str(tmp_path / "gone"), "labels": ["circle"],
                                                "presplit": False, "seed": 0, "files": {"test": [["circle/a.png", 0]]}}))
    manifest = load_manifest(tiny_bundle)
    add_examples(manifest, run, tmp_path / "stage")
    assert manifest.examples == [] and "no example photos" in manifest.notes[-1]


def test_data_origin_says_when_data_is_synthetic(dive: DemoMode, tmp_path: Path) -> None:
    from fieldid.training.demo_data import make_demo_dataset

    assert data_origin(dive.source, dive.manifest).synthetic is False
    assert "synthetic" not in dive.summary_markdown()
    data = make_demo_dataset("salmon", tmp_path / "salmon", scale=0.01, progress=False).out
    run = tmp_path / "run"
    run.mkdir()
    (run / "split.json").write_text(json.dumps({"root": str(data), "labels": ["wild", "farmed"],
                                                "presplit": False, "seed": 0, "files": {"test": []}}))
    # What the export records for such a run (the demo reads only this, never split.json).
    from fieldid.export.examples import add_examples

    manifest = load_manifest(dive.bundle_dir)
    add_examples(manifest, run, tmp_path / "stage")
    origin = data_origin(run, manifest)
    assert origin.synthetic and origin.root == data


def test_shop_explains_colour_and_says_the_data_is_synthetic(tiny_salmon_run: Path) -> None:
    mode = DemoMode("shop", tiny_salmon_run)
    assert sorted(mode.manifest.labels) == ["farmed", "wild"] and mode.knows_demo_classes
    text = mode.explanation_markdown()
    assert "Colour is the cue" in text and "**Wild**: deep red-orange" in text and "**Farmed**: paler" in text
    assert "**synthetic**" in text and "not photographs" in text
    assert "check the label" in text  # a photo cannot prove origin
    summary = mode.summary_markdown()
    assert "Colour is the cue" in summary and "synthetic pictures" in summary


def test_on_device_answer_matches_pytorch(dive: DemoMode, tiny_run: Path) -> None:
    """decode -> manifest preprocessing -> ORT -> temperature softmax == the trained torch model."""
    import torch

    from fieldid.training.data import eval_transform
    from fieldid.training.models import load_run_model

    model = load_run_model(tiny_run)
    spec = dive.manifest.preprocess_spec
    tf = eval_transform(spec, from_cache=False)
    for e in dive.examples:
        ans = dive.model("fp32").predict(e.path.read_bytes(), k=3).response
        with torch.no_grad():
            logits = model(tf(Image.open(e.path).convert("RGB"))[None])[0].numpy()
        ref = np.exp(logits / dive.manifest.temperature - (logits / dive.manifest.temperature).max())
        ref /= ref.sum()
        got = {t["index"]: t["probability"] for t in ans["top_k"]}
        assert max(abs(got[i] - ref[i]) for i in got) < 1e-3
        assert ans["top_k"][0]["index"] == int(ref.argmax())
        assert ans["source"] == "device" and ans["latency_ms"] > 0
        assert ans["needs_fallback"] == (ans["unknown"] or ans["confidence"] < dive.manifest.fallback_threshold)


def _demo_answers(mode: DemoMode, photos: list[Path], precision: str) -> np.ndarray:
    """The demo's top-1 class index per photo, through its whole on-device path (decode, preprocess, ORT)."""
    labels = mode.manifest.labels
    return np.asarray([labels.index(mode.identify(p.read_bytes(), precision).device.response["top_k"][0]["label"])
                       for p in photos])


def test_fp32_onnx_answers_as_pytorch_on_300_new_photos(dive: DemoMode, check_set) -> None:
    """fp32 on the device is the trained model: every answer is eager PyTorch's (computed independently)."""
    assert "fp32" in dive.precisions and dive.model("fp32").precision == "fp32"
    got = _demo_answers(dive, check_set.photos, "fp32")
    top2 = np.sort(check_set.logits, axis=1)[:, -2:]
    tie = (top2[:, 1] - top2[:, 0]) < 1e-3  # an exact tie may go either way in float arithmetic
    differ = (got != check_set.logits.argmax(1)) & ~tie
    assert not differ.any(), f"{int(differ.sum())} of {len(got)} photos answered differently from PyTorch"
    assert float((got == check_set.y).mean()) >= 0.9  # and those answers are mostly right (chance 1/3)


def test_int8_onnx_moves_only_near_ties_on_300_new_photos(dive: DemoMode, check_set) -> None:
    """int8 on the device follows fp32 except where fp32 itself was nearly undecided (CPU-independent)."""
    from helpers import int8_flips

    assert "int8" in dive.precisions and dive.model("int8").precision == "int8"
    got = _demo_answers(dive, check_set.photos, "int8")
    flips = int8_flips(check_set.logits, np.eye(check_set.logits.shape[1], dtype=np.float32)[got])
    assert flips["ok"], flips["message"]


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(buf, "GIF")
    return buf.getvalue()


@pytest.mark.parametrize("data, message", [
    (b"", "No photo received"),
    (b"definitely not an image", "not a photo this app can read"),
    (_gif(), "not a photo this app can read"),  # a real image, but not an allowed format
    (_png()[:60], "not a photo this app can read"),  # truncated
    (png_header(10_001, 10_000), "too large"),  # 100 MP + 10000 px: decoded size over the limit
    (malformed_exif_jpeg(Image.new("RGB", (64, 43), (90, 120, 140))), "not a photo this app can read"),
    (b"\xff\xd8\xff" + b"\0" * MAX_FILE_BYTES, "too large"),  # file size over the limit
    (_png((20_000, 1), (0, 0, 0)), "too large"),  # few pixels, but resizing it would need ~1 GB
], ids=["empty", "text", "gif", "truncated_png", "too_many_pixels", "malformed_exif", "too_many_bytes",
        "too_elongated"])
def test_bad_photos_get_a_friendly_message_and_the_mode_keeps_working(dive: DemoMode, data: bytes,
                                                                      message: str) -> None:
    out = dive.identify(data)
    assert message in out.error and out.device is None and out.server is None
    assert dive.identify(dive.examples[0].path.read_bytes()).device is not None


def test_elongated_photo_is_refused_by_the_server_rule(dive: DemoMode, tiny_bundle: Path) -> None:
    """The device refuses exactly what serve/engine.py refuses with 413, before allocating anything."""
    from fieldid.serve.engine import ClassifierEngine

    r = dive.manifest.preprocess_spec.resize_size
    check_resize_fits((r, 100 * r), r, max_pixels=100 * r * r)  # exactly at the limit: fine
    with pytest.raises(ImageInputError, match="too elongated") as e:
        check_resize_fits((r, 100 * r + 1), r, max_pixels=100 * r * r)
    assert e.value.status == 413
    strip = _png((20_000, 1), (0, 0, 0))
    engine = ClassifierEngine.from_bundle(tiny_bundle, warmup=False)
    with pytest.raises(ImageInputError) as server_error:
        engine.decode(strip)
    with pytest.raises(ImageInputError) as device_error:
        dive.model().predict(strip)
    assert (device_error.value.status, str(device_error.value)) == (server_error.value.status, str(server_error.value))
    assert dive.identify(_png((4000, 3000))).device is not None  # an ordinary phone photo still works


def test_unknown_precision_is_a_message_not_a_crash(dive: DemoMode) -> None:
    assert "not one of" in dive.identify(_png(), "fp16").error


# --------------------------------------------------------------------------- fallback


def test_server_down_keeps_the_device_answer(tiny_bundle: Path) -> None:
    mode = DemoMode("dive", tiny_bundle, server=ServerConfig(f"http://127.0.0.1:{unused_port()}"), timeout=2)
    out = mode.identify(mode.examples[0].path.read_bytes(), force_server=True)
    assert out.device is not None and out.asked_because == "you asked"
    assert not out.server.ok and "not reachable (connection refused)" in out.server.message
    assert out.to_dict()["server"] is None and out.to_dict()["device"]["top_k"]


def test_missing_key_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "key_file.json"
    reply = ask_server(ServerConfig(f"http://127.0.0.1:{unused_port()}", missing), "shapes", _png())
    assert not reply.ok and f"key file {missing} not found" in reply.message


def test_slow_server_times_out_with_a_clear_message(tiny_bundle: Path) -> None:
    with socket.socket() as listener:  # accepts connections, never answers: a hung server
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        reply = ask_server(ServerConfig(url), "shapes", _png(), timeout=0.5)
    assert not reply.ok and reply.message == f"the server at {url} did not answer within 0.5 s"


def test_find_server_reads_the_serve_state(served_tiny, tmp_path: Path) -> None:
    found = find_server(served_tiny.model, [tmp_path, served_tiny.state_dir])
    assert found == ServerConfig(served_tiny.base_url, served_tiny.key_file)
    assert find_server("no_such_model", [served_tiny.state_dir]) is None


def test_cli_finds_the_server_of_fieldid_serve_start(served_tiny, tmp_path: Path) -> None:
    import argparse

    from fieldid.commands.edge_demo import _server_for

    def args(**kw) -> argparse.Namespace:
        return argparse.Namespace(**{"no_server": False, "server": None, "key_file": None, **kw})

    state_dirs = [tmp_path, served_tiny.state_dir]
    assert _server_for(served_tiny.model, args(), state_dirs) == ServerConfig(served_tiny.base_url,
                                                                             served_tiny.key_file)
    assert _server_for(served_tiny.model, args(no_server=True), state_dirs) is None
    given = _server_for(served_tiny.model, args(server="http://h:1", key_file=tmp_path / "k.json"), state_dirs)
    assert given == ServerConfig("http://h:1", tmp_path / "k.json")
    assert _server_for("other_model", args(), state_dirs).url == "http://127.0.0.1:8080"


def test_fallback_to_real_torchserve(served_tiny, tiny_bundle: Path) -> None:
    mode = DemoMode("dive", tiny_bundle, server=ServerConfig(served_tiny.base_url, served_tiny.key_file))
    m = load_manifest(tiny_bundle)
    for e in mode.examples:
        out = mode.identify(e.path.read_bytes(), "fp32", force_server=True)
        assert out.server.ok, out.server.message
        dev, srv = out.device.response, out.server.response
        assert srv["source"] != "device" and srv["model"] == m.name == dev["model"]
        assert srv["version"] == m.find("pytorch", "fp32").sha256[:12]
        # Same photo, same preprocessing recipe, fp32 on both sides: the same answer.
        assert srv["top_k"][0]["label"] == dev["top_k"][0]["label"]
        assert abs(srv["confidence"] - dev["confidence"]) < 1e-3
        assert out.server.round_trip_ms > 0
    # An iPhone photo (HEIC) and a BMP: the server reads them as the device does (one intake policy).
    bmp = io.BytesIO()
    Image.open(mode.examples[0].path).convert("RGB").save(bmp, "BMP")
    for data in (_heic_of(mode.examples[0].path), bmp.getvalue()):
        out = mode.identify(data, "fp32", force_server=True)
        assert out.server.ok, out.server.message
        assert out.server.response["top_k"][0]["label"] == out.device.response["top_k"][0]["label"]
        assert abs(out.server.response["confidence"] - out.device.response["confidence"]) < 1e-3


def test_low_confidence_asks_the_server_by_itself(served_tiny, tiny_bundle: Path, tmp_path: Path) -> None:
    """Threshold 1.0: every answer is "unsure", so the server is asked; threshold 0.0: never."""
    server = ServerConfig(served_tiny.base_url, served_tiny.key_file)
    strict = _bundle_with_threshold(tiny_bundle, tmp_path / "strict", 1.0)
    # A held-out photo the detector accepts (a flat colour is "unknown": asked for that reason instead).
    plain = DemoMode("shop", tiny_bundle)
    photo = next(e.path.read_bytes() for e in plain.examples
                 if not plain.identify(e.path.read_bytes()).device.response["unknown"])
    out = DemoMode("shop", strict, server=server).identify(photo)
    assert out.device.response["needs_fallback"] and out.asked_because == "low confidence"
    assert out.server.ok and out.server.response["top_k"]
    # Same photo, same running server, a threshold every answer clears: the server is not asked.
    lax = _bundle_with_threshold(tiny_bundle, tmp_path / "lax", 0.0)
    out = DemoMode("shop", lax, server=server).identify(photo)
    assert not out.device.response["needs_fallback"] and out.asked_because == "" and out.server is None
    # Unsure but no server configured: nothing is asked, and the user is told why.
    from fieldid.edge_demo.app import _device_text

    mode = DemoMode("shop", strict, server=None)
    out = mode.identify(photo)
    assert out.device.response["needs_fallback"] and out.asked_because == "" and out.server is None
    assert "No server configured to ask" in _device_text(mode, out)


def _bundle_with_threshold(bundle: Path, dest: Path, threshold: float) -> Path:
    """A copy of ``bundle`` (files symlinked) whose manifest has another fallback threshold."""
    dest.mkdir()
    for f in bundle.iterdir():
        if f.name != "manifest.json":
            (dest / f.name).symlink_to(f)
    d = json.loads((bundle / "manifest.json").read_text())
    d["fallback_threshold"] = threshold
    (dest / "manifest.json").write_text(json.dumps(d))
    return dest


def test_wrong_token_is_explained(served_tiny, tiny_bundle: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "key_file.json"
    key_file.write_text(json.dumps({"inference": {"key": "wrong"}}))
    reply = ask_server(ServerConfig(served_tiny.base_url, key_file), served_tiny.model, _png())
    assert not reply.ok and reply.status == 400 and "refused the token" in reply.message
    reply = ask_server(ServerConfig(served_tiny.base_url, served_tiny.key_file), "no_such_model", _png())
    assert not reply.ok and reply.status == 404 and "no model named" in reply.message


# --------------------------------------------------------------------------- the app over HTTP


def _call(client, endpoint: str, path: Path | None, precision: str | None = None) -> tuple:
    from gradio_client import handle_file

    return client.predict(handle_file(str(path)) if path else None, precision, api_name=endpoint)


@pytest.mark.parametrize("key", ["dive", "shop"])
def test_app_identifies_in_each_mode(demo_app, key: str) -> None:
    client = demo_client(demo_app.url)
    mode = demo_app.modes[key]
    for e in mode.examples[:3]:
        label, device_text, server_label, server_text, raw = _call(client, f"/{key}_identify", e.path, "fp32")
        expected = mode.identify(e.path.read_bytes(), "fp32").device.response
        assert raw["device"]["top_k"] == expected["top_k"]
        if expected["unknown"]:  # the toy model's detector flags some held-out photos: words, no class
            assert label["label"] == mode.unknown_words()
        else:
            assert label["label"] == pretty_label(expected["top_k"][0]["label"])
        assert "on this device ·" in device_text and "fp32 ONNX" in device_text and "MB" in device_text
        assert raw["true_label"] == e.label and "Held-out example" in device_text
        if expected["unknown"]:
            assert "Server unavailable" in server_text
            assert raw["asked_server_because"] == "it is none of the classes it knows"
        elif expected["needs_fallback"]:  # the fixture's server is down
            assert "Server unavailable" in server_text and raw["asked_server_because"] == "low confidence"
        else:
            assert "Not asked" in server_text and raw["server"] is None


def test_app_ask_server_with_server_down(demo_app) -> None:
    client = demo_client(demo_app.url)
    e = demo_app.modes["shop"].examples[0]
    label, device_text, server_label, server_text, raw = _call(client, "/shop_ask_server", e.path)
    assert raw["device"]["top_k"] and label["label"]  # the on-device answer stands
    assert "Server unavailable" in server_text and "connection refused" in server_text
    assert raw["server"] is None and raw["asked_server_because"] == "you asked"
    assert not server_label or not server_label.get("label")


def test_app_bad_input_is_friendly_and_app_keeps_working(demo_app, tmp_path: Path) -> None:
    client = demo_client(demo_app.url)
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    huge = tmp_path / "huge.png"
    huge.write_bytes(png_header(10_001, 10_000))
    for path, message in ((text, "not a photo this app can read"), (huge, "too large")):
        label, device_text, _, server_text, raw = _call(client, "/dive_identify", path)
        assert message in device_text and message in raw["error"] and not (label or {}).get("label")
    _, device_text, *_ = _call(client, "/dive_identify", None)
    assert "Take a photo" in device_text
    _, device_text, *_ = _call(client, "/dive_identify", demo_app.modes["dive"].examples[0].path, "int8")
    assert "int8 ONNX" in device_text
    _, device_text, *_ = _call(client, "/dive_identify", demo_app.modes["dive"].examples[0].path)
    phone = select_artifact(demo_app.modes["dive"].manifest)[0].precision  # the phone contract's file
    assert "on this device ·" in device_text and f"{phone} ONNX" in device_text  # the default, like a phone


def test_app_default_precision_is_the_phones(demo_app) -> None:
    """The verified int8 file, else fp32 (with a notice saying why): select_artifact, as a phone ships it."""
    client = demo_client(demo_app.url)
    for key, mode in demo_app.modes.items():
        phone, notice = select_artifact(mode.manifest)
        assert (mode.default_precision, mode.notice) == (phone.precision, notice)
        assert (phone.precision == "int8") == (mode.manifest.find("onnx", "int8").verification.get("status") == "passed")
        _, device_text, *_ = _call(client, f"/{key}_identify", mode.examples[0].path)
        assert f"{phone.precision} ONNX" in device_text
        _, device_text, *_ = _call(client, f"/{key}_identify", mode.examples[0].path, "fp32")
        assert "fp32 ONNX" in device_text


def test_photo_payloads_inline_or_uploaded(dive: DemoMode, tmp_path: Path) -> None:
    import base64

    from fieldid.edge_demo.app import photo_bytes

    png = _png()
    (tmp_path / "a.png").write_bytes(png)
    assert photo_bytes(None) is None
    assert photo_bytes({"path": str(tmp_path / "a.png"), "url": None}) == png
    assert photo_bytes({"path": None, "url": "data:image/png;base64," + base64.b64encode(png).decode()}) == png
    garbage = photo_bytes({"path": None, "url": "data:image/png;base64,%%%"})
    assert "not a photo" in dive.identify(garbage).error


def test_photo_size_is_checked_before_reading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64

    from fieldid.edge_demo.app import photo_bytes

    big = tmp_path / "big.jpg"
    with open(big, "wb") as fh:  # sparse: MAX_FILE_BYTES + 1 bytes on disk, nothing written
        fh.truncate(MAX_FILE_BYTES + 1)
    read: list[Path] = []
    real_read_bytes = Path.read_bytes
    monkeypatch.setattr(Path, "read_bytes", lambda self: read.append(self) or real_read_bytes(self))
    with pytest.raises(ImageInputError, match="the limit is 30 MB") as e:
        photo_bytes({"path": str(big), "url": None})
    assert e.value.status == 413 and read == []
    small = tmp_path / "small.png"
    small.write_bytes(_png())
    assert photo_bytes({"path": str(small), "url": None}) == _png() and read == [small]
    inline = "data:image/png;base64," + base64.b64encode(b"\0" * 4_000_000).decode()
    with pytest.raises(ImageInputError, match="4 MB; the limit is 2 MB"):
        photo_bytes({"path": None, "url": inline}, max_bytes=2_000_000)


def test_slow_server_the_device_answer_comes_first(tiny_bundle: Path) -> None:
    """The identify handlers are generators: the on-device answer is shown while the server is asked."""
    from fieldid.edge_demo.app import build_app, launch_app

    with socket.socket() as listener:  # accepts connections, never answers: a hung server
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        hung = ServerConfig(f"http://127.0.0.1:{listener.getsockname()[1]}")
        # The device answer must be seen while the server still hangs: 10 s leaves a loaded machine
        # room for the first inference and Gradio's queue (4 s left it little).
        mode = DemoMode("dive", tiny_bundle, server=hung, timeout=10.0)
        app = build_app([mode])
        url = launch_app(app, port=unused_port(), block=False, quiet=True)
        try:
            from gradio_client import handle_file

            job = demo_client(url).submit(handle_file(str(mode.examples[0].path)), None,
                                          api_name="/dive_ask_server")
            for _ in range(1200):
                if job.outputs() or job.done():
                    break
                time.sleep(0.05)
            first_seen_while_waiting = not job.done()
            final = job.result(timeout=60)
            steps = job.outputs()
        finally:
            app.close()
    assert first_seen_while_waiting, "the device answer only came with the server's"
    assert len(steps) == 2
    label, device_text, _, server_text, raw = steps[0]
    assert label["label"] and "on this device ·" in device_text and raw["device"]["top_k"]
    assert "Asking the server" in server_text and raw["server_message"] == "" and raw["server"] is None
    assert tuple(steps[-1]) == tuple(final)
    assert "did not answer within 10 s" in final[3] and final[4]["device"] == raw["device"]


def test_app_fallback_to_real_torchserve(served_tiny, tiny_bundle: Path) -> None:
    from fieldid.edge_demo.app import build_app, launch_app

    mode = DemoMode("dive", tiny_bundle, server=ServerConfig(served_tiny.base_url, served_tiny.key_file))
    app = build_app([mode])
    url = launch_app(app, port=unused_port(), block=False, quiet=True)
    try:
        e = mode.examples[1]
        # fp32 on both sides (the server runs the fp32 PyTorch weights): the answers must agree.
        label, device_text, server_label, server_text, raw = _call(demo_client(url), "/dive_ask_server",
                                                                   e.path, "fp32")
    finally:
        app.close()
    assert "fp32 ONNX" in device_text
    assert raw["server"]["top_k"][0]["label"] == raw["device"]["top_k"][0]["label"]
    assert server_label["label"] == label["label"]
    assert "round trip" in server_text and "agrees with the device" in server_text


# --------------------------------------------------------------------------- intake: HEIC, Gradio's limits


def _heic_of(path: Path) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").save(buf, "HEIF", quality=95)
    return buf.getvalue()


def test_heic_photos_are_identified_on_device_and_in_the_app(demo_app, tmp_path: Path) -> None:
    """An iPhone photo (HEIC) gets an answer like any JPEG, through the app's real upload path."""
    mode = demo_app.modes["dive"]
    photo = tmp_path / "IMG_0042.HEIC"
    photo.write_bytes(_heic_of(mode.examples[0].path))
    direct = mode.identify(photo.read_bytes(), "fp32")
    assert direct.error == "" and direct.device is not None
    _, device_text, _, _, raw = _call(demo_client(demo_app.url), "/dive_identify", photo, "fp32")
    assert raw["error"] is None or raw["error"] == ""
    assert raw["device"]["top_k"] == direct.device.response["top_k"] and "on this device ·" in device_text


def _upload(url: str, path: Path):
    import requests

    with open(path, "rb") as fh:
        return requests.post(f"{url.rstrip('/')}/gradio_api/upload", files={"files": (path.name, fh)}, timeout=60)


def test_gradio_refuses_an_oversized_upload_before_storing_it(demo_app, tmp_path: Path) -> None:
    from gradio.utils import get_upload_folder

    big = tmp_path / "too_big_for_the_demo.jpg"
    with open(big, "wb") as fh:  # sparse: MAX_FILE_BYTES + 1 bytes
        fh.truncate(MAX_FILE_BYTES + 1)
    reply = _upload(demo_app.url, big)
    assert reply.status_code == 413, reply.text
    assert not list(Path(get_upload_folder()).rglob(big.name))  # nothing kept of it
    ok = tmp_path / "fits.png"
    ok.write_bytes(_png())
    assert _upload(demo_app.url, ok).status_code == 200


def test_uploaded_photos_are_deleted_from_gradios_cache(tiny_bundle: Path, tmp_path: Path) -> None:
    from fieldid.edge_demo.app import DELETE_CACHE, build_app, launch_app

    assert DELETE_CACHE[1] <= 3600  # the shipped setting: users' photos are gone within the hour
    mode = DemoMode("dive", tiny_bundle, server=None)
    app = build_app([mode], delete_cache=(1, 1))  # check every second, delete after one second
    url = launch_app(app, port=unused_port(), block=False, quiet=True)
    try:
        photo = tmp_path / f"user_photo_{time.time_ns()}.png"
        photo.write_bytes(_png())
        reply = _upload(url, photo)
        assert reply.status_code == 200
        (stored,) = [Path(p) for p in reply.json()]
        assert stored.is_file()
        deadline = time.monotonic() + 30
        while stored.exists() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not stored.exists(), "the upload stayed in Gradio's cache"
        assert all(e.path.is_file() for e in mode.examples)  # the bundle's photos are never touched
    finally:
        app.close()


# --------------------------------------------------------------------------- torch-free


_TORCH_FREE_SCRIPT = textwrap.dedent("""
    import json, sys, threading, time
    import fieldid

    argv = ["demo", "--run", sys.argv[1], "--port", sys.argv[2], "--server", sys.argv[3], "--timeout", "2"]
    threading.Thread(target=fieldid.main, args=(argv,), daemon=True).start()
    from gradio_client import Client, handle_file

    deadline = time.monotonic() + 200  # the demo thread imports gradio and onnxruntime first
    while True:
        try:
            client = Client(f"http://127.0.0.1:{sys.argv[2]}/", verbose=False, analytics_enabled=False,
                            download_files=False)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    out = client.predict(handle_file(sys.argv[4]), None, api_name="/dive_ask_server")
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchvision", "lightning"))
    print(json.dumps({"raw": out[4], "torch_modules": loaded,
                      "onnxruntime": "onnxruntime" in sys.modules, "gradio": "gradio" in sys.modules}))
    sys.stdout.flush()
    import os
    os._exit(0)
""")


def test_fieldid_demo_never_imports_torch(tiny_run: Path, tmp_path: Path) -> None:
    """The real CLI serves a real prediction (and a fallback attempt); torch stays out of the process."""
    script = tmp_path / "probe.py"
    script.write_text(_TORCH_FREE_SCRIPT)
    example = example_images(tiny_run, load_manifest(tiny_run))[0].path
    server = f"http://127.0.0.1:{unused_port()}"
    proc = subprocess.run([sys.executable, str(script), str(tiny_run), str(unused_port()), server, str(example)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["raw"]["device"]["top_k"] and "not reachable" in result["raw"]["server_message"]
    assert result["onnxruntime"] and result["gradio"]
    assert result["torch_modules"] == []


_TRAINING_FREE_SCRIPT = textwrap.dedent("""
    import json, sys
    from fieldid.edge_demo import app, device, examples, modes
    import fieldid.commands.edge_demo  # `fieldid demo`'s own command module
    mode = modes.DemoMode("dive", sys.argv[1], server=None)
    app.build_app([mode])
    out = mode.identify(mode.examples[0].path.read_bytes())
    print(json.dumps({"examples": len(mode.examples), "answer": bool(out.device),
                      "training": sorted(m for m in sys.modules if m.startswith("fieldid.training"))}))
""")
# Nothing is pending any more: records moved to fieldid.records and the shared CLI helpers to
# fieldid.cli_common, so the demo and what it imports load no fieldid.training module at all.
_UPSTREAM_PENDING: set[str] = set()


def test_the_demo_imports_nothing_from_training(tiny_bundle: Path) -> None:
    """The demo reads the bundle only: no split.json reader, no demo_data, no training code."""
    proc = subprocess.run([sys.executable, "-c", _TRAINING_FREE_SCRIPT, str(tiny_bundle)], cwd=REPO,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["examples"] > 0 and result["answer"]
    assert set(result["training"]) - _UPSTREAM_PENDING == set(), result["training"]
    assert "fieldid.training.demo_data" not in result["training"] and "fieldid.training.data" not in result["training"]
