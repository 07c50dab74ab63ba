"""Bad input found by an audit of every command (round 3): outputs that would overwrite what a
command reads, damaged side files, values without a range, URLs and file names that are not what
the code assumed. Each is one clear line (exit 2), a row, or the right pixels, never a traceback."""
from __future__ import annotations

import io
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fieldid.cli import main
from fieldid.cli_common import UsageError, http_url


def _folder(root: Path, names: dict[str, list[str]]) -> Path:
    for cls, files in names.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for k, name in enumerate(files):
            rng = np.random.default_rng(len(cls) * 100 + k)
            Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(root / cls / name)
    return root


# ------------------------------------------------------------------ outputs never over inputs
@pytest.mark.parametrize("flag", ["--json", "--report", "--write-exclude"])
def test_data_check_never_writes_into_the_dataset(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _folder(tmp_path / "photos", {"a": ["1.png", "2.png"], "b": ["1.png", "2.png"]})
    photo = root / "a" / "1.png"
    before = photo.read_bytes()
    assert main(["data", "check", str(root), "--fast", flag, str(photo)]) == 2
    err = capsys.readouterr().err
    assert "inside the dataset's class folders" in err and len(err.strip().splitlines()) == 1
    assert photo.read_bytes() == before
    # Beside the class folders nothing is read as a photo: a report there is fine, again and again.
    for _ in range(2):
        assert main(["data", "check", str(root), "--fast", flag, str(root / "findings.txt")]) == 0
    capsys.readouterr()


def test_evaluate_out_may_not_replace_a_file_of_the_run(tiny_run: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = {name: (tiny_run / name).read_bytes() for name in ("run.json", "model.pth")}
    for name in before:
        assert main(["evaluate", "--run", str(tiny_run), "--out", str(tiny_run / name)]) == 2
        assert "exists and is not a metrics file" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tiny_run), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert {name: (tiny_run / name).read_bytes() for name in before} == before
    # Its own earlier metrics file may be replaced (a re-run), wherever it is.
    for _ in range(2):
        assert main(["evaluate", "--run", str(tiny_run), "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["split"] in ("test", "val")
    capsys.readouterr()


def test_evaluate_reads_a_damaged_metrics_file_before_the_work(tmp_path: Path) -> None:
    from fieldid.training.evaluate import _training_block
    from fieldid.training.rundir import RunError

    bad = tmp_path / "metrics.json"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(RunError, match="is not valid JSON"):
        _training_block(bad)
    bad.write_text("[1, 2]")
    assert _training_block(bad) is None
    assert _training_block(tmp_path / "none.json") is None


def test_replace_dir_with_dot_replaces_the_folder_it_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--out .` inside an earlier build or bundle: the new folder takes its place (was: empty-name crash)."""
    from fieldid.records import replace_dir

    out, new = tmp_path / "build", tmp_path / "new"
    out.mkdir()
    (out / "old.txt").write_text("old")
    new.mkdir()
    (new / "new.txt").write_text("new")
    monkeypatch.chdir(out)
    replace_dir(new, ".")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]  # no .old- or staging folder left


# ------------------------------------------------------------------ damaged side files
def _run_record(run: Path, **unknown: object) -> None:
    from fieldid.records import PreprocessSpec, RunRecord

    run.mkdir()
    RunRecord(name="r", backbone="mobilenet_v2", num_classes=2, labels=["a", "b"],
              preprocess=PreprocessSpec(72, 64).to_dict(), unknown=dict(unknown)).to_json(run / "run.json")


def test_a_damaged_model_or_detector_is_one_line(tmp_path: Path) -> None:
    from fieldid.training.models import ModelError, load_run_model
    from fieldid.training.ood import load_detector
    from fieldid.records import load_record
    from fieldid.training.rundir import RunError

    run = tmp_path / "run"
    _run_record(run, file="unknown.pth", threshold=0.5)
    (run / "model.pth").write_bytes(b"PK\x03\x04 not a state dict")
    with pytest.raises(RunError, match="model.pth: cannot be loaded"):
        load_run_model(run)
    record = load_record(run)
    with pytest.raises(ModelError, match="unknown.pth: missing"):
        load_detector(run, record)
    (run / "unknown.pth").write_bytes(b"x")
    with pytest.raises(ModelError, match="not a fieldid unknown detector"):
        load_detector(run, record)


def test_truncated_run_samples_are_refused_when_opened(tmp_path: Path) -> None:
    from fieldid.export.bundle import ExportError
    from fieldid.export.inputs import PhoneImages
    from fieldid.records import PreprocessSpec

    spec = PreprocessSpec(40, 32)
    path = tmp_path / "heldout.npy"
    np.save(path, np.zeros((5, 32, 32, 3), np.uint8))
    assert len(PhoneImages.from_npy(path, spec)) == 5
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ExportError, match="truncated"):
        PhoneImages.from_npy(path, spec)
    path.write_bytes(b"garbage")
    with pytest.raises(ExportError, match="not a .npy file"):
        PhoneImages.from_npy(path, spec)


@pytest.mark.parametrize("what", ["config", "space", "app meta"])
@pytest.mark.parametrize("content, message", [(b"\xff\xfe\x00binary", "not valid YAML \\(not UTF-8 text: byte 0\\)"),
                                              (b"a: [unclosed\n", "not valid YAML \\(while parsing"),
                                              (None, "cannot read|not found")])
def test_unreadable_yaml_files_are_one_line(what: str, content: bytes | None, message: str, tmp_path: Path) -> None:
    """A training config, a search space and the app's metadata are read by one function: each way a
    file can be unreadable (binary, broken YAML, a folder where the file belongs) is one line naming it,
    raised as the reader's own error type."""
    from fieldid.appmeta import MetaError, load_meta
    from fieldid.training.config import ConfigError, load_config
    from fieldid.training.tune import TuneError, load_space

    f = tmp_path / "x.yaml"
    if content is None:
        f.mkdir()
    else:
        f.write_bytes(content)
    error, read = {"config": (ConfigError, load_config), "space": (TuneError, load_space),
                   "app meta": (MetaError, load_meta)}[what]
    with pytest.raises(error, match=message) as e:
        read(f)
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)


def test_binary_and_mistyped_manifests_are_one_line(tiny_bundle: Path, tmp_path: Path) -> None:
    import shutil

    from fieldid.export.manifest import load_manifest
    from fieldid.records import RecordError

    b = tmp_path / "b"
    shutil.copytree(tiny_bundle, b)
    good = json.loads((b / "manifest.json").read_text())
    (b / "manifest.json").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(RecordError, match="not UTF-8 text"):
        load_manifest(b)
    edits = {"artifact verification": (lambda m: m["artifacts"][0].__setitem__("verification", "ok"),
                                       "verification must be"),
             "unknown threshold": (lambda m: m["unknown"].__setitem__("threshold", "high"), "unknown.threshold"),
             # Accepted before: every answer to the server, every photo an error row blaming the photo.
             "infinite temperature": (lambda m: m.__setitem__("temperature", float("inf")), "temperature must be finite"),
             "huge crop": (lambda m: m["preprocess"].update(resize_size=100000, crop_size=100000), "resize_size <="),
             "NHWC layout": (lambda m: m["preprocess"].__setitem__("layout", "NHWC"), "only layout NCHW")}
    for name, (edit, message) in edits.items():
        m = json.loads(json.dumps(good))
        edit(m)
        (b / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(RecordError, match=message):  # ManifestError, or the preprocess record's own
            load_manifest(b)


def test_manifest_names_the_onnx_file_does_not_have(tiny_bundle: Path) -> None:
    from dataclasses import replace

    from fieldid.export.manifest import ManifestError, load_manifest
    from fieldid.export.phone import OnnxRunner, onnx_session

    art = load_manifest(tiny_bundle).find("onnx", "fp32")
    session = onnx_session(tiny_bundle / art.file)
    OnnxRunner(session, art)  # the bundle as exported
    with pytest.raises(ManifestError, match="input_name 'pixels' is not an input"):
        OnnxRunner(session, replace(art, input_name="pixels"))
    with pytest.raises(ManifestError, match="output"):
        OnnxRunner(session, replace(art, output_name="scores"))


def test_damaged_server_state_is_one_line(tmp_path: Path) -> None:
    from fieldid.serve.config import ServeOptions
    from fieldid.serve.archive import ServeError
    from fieldid.serve.state import ServerState, read_server_state

    def state(**changes: object) -> Path:
        d = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        base = dict(pid=1, create_time=0.0, state_dir=str(d), host="127.0.0.1", ports=ServeOptions().ports(),
                    models={}, auth=False, key_file="", config="", log_dir="", started="2025-01-01T00:00:00+00:00")
        ServerState(**{**base, **changes}).to_json(d / "server.json")
        return d

    assert read_server_state(state()).pid == 1
    with pytest.raises(ServeError, match="pid must be"):
        read_server_state(state(pid=-1))
    damaged = read_server_state(state(ports={}))  # still readable: `serve stop` needs only the pid
    with pytest.raises(ServeError, match="ports.inference must be a port number"):
        damaged.inference_url


# ------------------------------------------------------------------ values and URLs
@pytest.mark.parametrize("key, value", [("learning rates", float("inf")), ("distill_temperature", float("inf")),
                                        ("weight_decay", -1.0), ("warmup_frac", 1.5),
                                        ("limit_train_batches", 2.5), ("fallback_target_accuracy", 0.0)])
def test_config_values_out_of_range(key: str, value: float) -> None:
    from fieldid.training.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict({"lr" if key == "learning rates" else key: value})


@pytest.mark.parametrize("key, value", [("brightness", -1.0), ("blur_prob", 1.5), ("rotate_degrees", -5.0)])
def test_augment_values_out_of_range(key: str, value: float) -> None:
    from fieldid.training.config import ConfigError, TrainConfig

    with pytest.raises(ConfigError, match=key):
        TrainConfig.from_dict({"augment": {key: value}})


@pytest.mark.parametrize("url", ["http://[::1", "http://127.0.0.1:99999", "ftp://host/x"])
def test_broken_urls_are_usage_errors_everywhere(url: str) -> None:
    from fieldid.app.build import AppBuildError, check_server_url
    from fieldid.serve.client import ServeClient

    with pytest.raises(UsageError):
        http_url(url, "--server")
    with pytest.raises(UsageError):
        ServeClient(url)
    with pytest.raises(AppBuildError, match="--proxy"):
        check_server_url(url, "--proxy")


@pytest.mark.parametrize("argv, message", [
    (["--port", "0"], "--port 0"), (["--port", "70000"], "--port 70000"), (["--top-k", "0"], "--top-k"),
    (["--timeout", "-1"], "--timeout"), (["--threads", "0"], "--threads"),
    (["--server", "http://[::1"], "not a valid http(s) URL")])
def test_demo_flag_values(argv: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--bundle", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_no_abbreviated_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x", "--out", "y", "--epoch", "1"])
    assert e.value.code == 2 and "--epoch" in capsys.readouterr().err


def test_formats_naming_nothing_is_refused() -> None:
    from fieldid.export.bundle import ExportError, parse_formats

    with pytest.raises(ExportError, match="names no format"):
        parse_formats("")
    assert parse_formats(None)[0] == "pytorch"


# ------------------------------------------------------------------ photos and file names
def test_sixteen_bit_greyscale_is_scaled_not_clipped() -> None:
    from fieldid.intake import open_image

    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    for fmt in ("PNG", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(ramp).save(buf, fmt)
        got = np.asarray(open_image(buf.getvalue()))
        assert got.shape == (64, 64, 3)
        assert np.abs(got[..., 0].astype(int) - (ramp >> 8)).max() == 0, fmt  # was: 99.5 % at 255


def test_too_large_message_gives_the_photo_s_size() -> None:
    from fieldid.intake import ImageInputError, open_image

    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = struct.pack(">II", 30000, 20000) + bytes(data[24:29])  # a 600-MP header; no pixels are decoded
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    with pytest.raises(ImageInputError, match="image has 600 MP; the limit is"):
        open_image(bytes(data))


def test_file_names_that_are_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Latin-1 name (an old camera, a zip from Windows): the report, the exclude list and stdout work,
    and the exclude list matches the file on disk again."""
    import os

    from fieldid.training.exclusions import read_exclude_file

    root = _folder(tmp_path / "photos", {"a": ["x.png", "y.png"], "b": ["x.png", "y.png"]})
    latin = os.fsdecode(b"\xe9t\xe9.png")  # sorts after x.png: the later of the two is the one listed
    (root / "a" / latin).write_bytes((root / "a" / "x.png").read_bytes())  # an exact duplicate
    ex, report = tmp_path / "exclude.txt", tmp_path / "report.html"
    assert main(["data", "check", str(root), "--fast", "--report", str(report), "--write-exclude", str(ex),
                 "--exclude-kinds", "duplicate"]) == 0
    assert b"\xe9t\xe9.png" in ex.read_bytes()
    listed = read_exclude_file(ex)
    latin_rel = [rel for rel in listed if rel.endswith(latin)]
    assert latin_rel and (root / latin_rel[0]).is_file() and report.stat().st_size > 0  # round-trips to the disk
    capsys.readouterr()


def test_photo_folders_beside_train_are_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A Kaggle-style valid/ (or unlabelled/) beside train/ is not read: the scan says so instead of silence."""
    from fieldid.training.images import scan_image_folder

    root = _folder(tmp_path / "photos", {"train/a": ["1.png"], "train/b": ["1.png"], "test/a": ["2.png"]})
    with caplog.at_level("WARNING"):
        scan_image_folder(root)
    assert "beside train/" not in caplog.text
    _folder(root, {"valid/a": ["3.png"], "unlabelled": ["4.png"]})
    with caplog.at_level("WARNING"):
        listing = scan_image_folder(root)
    assert "unlabelled, valid beside train/ are not used" in caplog.text and "not valid/" in caplog.text
    assert set(listing.splits) == {"train", "test"}


def test_messages_name_the_flags_users_type() -> None:
    from fieldid.training.demo_data import demo_counts
    from fieldid.training.resume import _flag_name

    assert _flag_name("precision") == "--train-precision"  # --precision is the refused old name
    with pytest.raises(UsageError, match="scale must be a number in"):
        demo_counts("reef", 1e9)


def test_small_guards(tmp_path: Path) -> None:
    """The bundle summary skips a damaged metrics file; an exclude file with binary content, a 32-bit
    greyscale image of 8-bit values and a photo over the phone's 30 MB each get their own answer."""
    from fieldid.classify import _read_photo
    from fieldid.export.bundle import _run_metrics
    from fieldid.intake import ImageInputError, open_image
    from fieldid.records import RunRecord
    from fieldid.training.exclusions import read_exclude_file
    from fieldid.training.images import DataError

    record = RunRecord(name="r", backbone="mobilenet_v2", num_classes=2, labels=["a", "b"],
                       preprocess={"resize_size": 72, "crop_size": 64})
    for content in (b"[1, 2]", b"\x89PNG\x00"):
        (tmp_path / record.metrics).write_bytes(content)
        assert _run_metrics(tmp_path, record) == {}
    (tmp_path / "ex.txt").write_bytes(b"a/1.png\x00\x01")
    with pytest.raises(DataError, match="binary content"):
        read_exclude_file(tmp_path / "ex.txt")
    small = Image.fromarray((np.arange(64 * 64).reshape(64, 64) % 200).astype(np.int32), "I")
    buf = io.BytesIO()
    small.save(buf, "TIFF")
    assert np.array_equal(np.asarray(open_image(buf.getvalue()))[..., 0], np.asarray(small).astype(np.uint8))
    big = tmp_path / "big.jpg"
    with open(big, "wb") as f:
        f.truncate(31_000_000)  # sparse: no 31 MB written
    with pytest.raises(ImageInputError, match="larger than 30 MB"):
        _read_photo(big)


def test_data_check_flag_values_and_output_parents(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import os

    root = _folder(tmp_path / "photos", {"a": ["1.png", "2.png"], "b": ["1.png", "2.png"]})
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    for argv, message in ((["--near-threshold", "65"], "--near-threshold must be in [0, 64]"),
                          (["--exclude-kinds", ""], "names no kind"),
                          (["--json", str(tmp_path / "afile" / "r.json")], "afile is not a folder"),
                          (["--json", str(tmp_path / "afile" / ".." / "r.json")], "afile is not a folder"),
                          (["--json", str(tmp_path / "dangling" / "r.json")], "dangling is not a folder"),
                          (["--cache-dir", str(tmp_path / "afile")], "afile: is a file, not a folder")):
        assert main(["data", "check", str(root), "--fast", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_links_and_pipes_in_class_folders_are_reported_skipped(tmp_path: Path) -> None:
    """A broken link or a FIFO named like a photo was dropped while the check said "skipped files: 0"."""
    import os

    from fieldid.training.datacheck import check_dataset

    root = _folder(tmp_path / "photos", {"a": ["1.png", "2.png"], "b": ["1.png", "2.png"]})
    os.symlink(tmp_path / "gone.png", root / "a" / "broken.png")
    os.mkfifo(root / "b" / "pipe.jpg")
    report = check_dataset(root, progress=False)
    skipped = {r["file"]: r for r in report.skipped}
    assert set(skipped) == {"a/broken.png", "b/pipe.jpg"}
    assert all(r["reason"] == "unreadable" and "not a regular file" in r["detail"] for r in skipped.values())


def test_a_split_without_test_says_what_its_scores_are(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fieldid.training import TrainConfig
    from fieldid.training.train import train

    root = _folder(tmp_path / "photos", {"train/a": [f"{k}.png" for k in range(6)],
                                        "train/b": [f"{k}.png" for k in range(6)]})
    with caplog.at_level("WARNING"):
        train(root, tmp_path / "run", TrainConfig(epochs=1, image_size=32, batch_size=8))
    assert "pre-split without test/ photos: the run's scores are on val" in caplog.text


def test_export_says_which_formats_a_narrower_export_drops(tiny_bundle: Path, caplog: pytest.LogCaptureFixture) -> None:
    from fieldid.export.bundle import _warn_dropped_formats

    with caplog.at_level("WARNING"):
        _warn_dropped_formats(tiny_bundle, ["pytorch", "onnx"])
    assert "does not write" not in caplog.text
    with caplog.at_level("WARNING"):
        _warn_dropped_formats(tiny_bundle, ["pytorch"])
    assert "holds onnx files this export does not write" in caplog.text
    damaged = tiny_bundle.parent / "damaged-bundle"
    damaged.mkdir()
    (damaged / "manifest.json").write_text(json.dumps({"artifacts": [{"format": None}, {"format": "onnx"}]}))
    _warn_dropped_formats(damaged, ["pytorch"])  # a bundle that is not one: no crash
    shutil.rmtree(damaged)


def test_data_ood_checks_everything_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`data ood` wrote other/ before finding a missing --unseen folder, wrote into anyone's folder,
    copied files no photo reader opens and left HEIC photos out."""
    import pillow_heif

    src = _folder(tmp_path / "src", {"fish": ["1.png", "2.png"]})
    (src / "fish" / "notes.jpg").write_text("not a photo")
    (src / "fish" / "empty.png").write_bytes(b"")
    pillow_heif.from_pillow(Image.open(src / "fish" / "1.png").convert("RGB")).save(str(src / "fish" / "3.heic"))
    out = tmp_path / "ood"
    for argv, message in ((["--unseen", str(tmp_path / "nope")], "--unseen"), (["--generated", "-5"], "--generated"),
                          (["--other", str(src / "fish" / "1.png")], "is a file, not a folder")):
        assert main(["data", "ood", str(out), "--generated", "2", *argv]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()  # nothing written before the refusal
    mine = tmp_path / "mine"
    (mine / "keep").mkdir(parents=True)
    assert main(["data", "ood", str(mine), "--generated", "2"]) == 2
    assert "not a folder `fieldid data ood` made" in capsys.readouterr().err and sorted(mine.iterdir()) == [mine / "keep"]
    # The readable photos are copied, HEIC included; the two files no reader opens are counted, not copied.
    assert main(["data", "ood", str(out), "--generated", "2", "--unseen", str(src / "fish")]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert counts["unseen/fish"] == 3 and counts["skipped"] == 2, counts
    assert sorted(p.name for p in (out / "unseen" / "fish").iterdir()) == ["1.png", "2.png", "3.heic"]
    # Its own folder may be written again, with a Finder .DS_Store in it.
    (out / ".DS_Store").write_bytes(b"\0")
    assert main(["data", "ood", str(out), "--generated", "2"]) == 0
    capsys.readouterr()
    # A sample of a larger folder is topped up past the photos that do not decode; only tried files are decoded.
    from fieldid.training.negatives import make_ood_set

    counts = make_ood_set(tmp_path / "ood2", other=[src / "fish"], generated=0, per_folder=3, skimage=False)
    assert counts["other/fish"] == 3 and counts["skipped"] <= 2, counts
    assert sorted(p.name for p in (tmp_path / "ood2" / "other" / "fish").iterdir()) == ["1.png", "2.png", "3.heic"]
    counts = make_ood_set(tmp_path / "ood3", other=[src / "fish"], generated=0, per_folder=1, skimage=False)
    assert counts["other/fish"] == 1 and counts["skipped"] <= 2, counts


def test_listen_addresses_and_ca_files_are_named_by_their_flag(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """A typo'd --host was '[Errno -2] Name or service not known' after the exposure warning; a --ca-file
    that is no certificate was an OpenSSL code naming neither the file nor the flag."""
    from fieldid.serve.client import CertificateError, tls_context

    for argv in (["app", "serve", str(tmp_path), "--host", "no.such.host.invalid"],
                 ["app", "serve", str(tmp_path), "--host", ""],
                 ["serve", "start", "--bundle", str(tmp_path), "--host", "no.such.host.invalid"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "--host" in err and len(err.strip().splitlines()) == 1 and "warning" not in err, err
    typo = tmp_path / "typo.yaml"
    typo.write_text("server: x\n")
    for bad in (typo, tmp_path / "missing.pem"):
        with pytest.raises(CertificateError, match=f"CA file {bad}: not a PEM certificate"):
            tls_context(bad)
    assert main(["demo", "--bundle", str(tmp_path), "--ca-file", str(typo)]) == 2
    err = capsys.readouterr().err
    assert f"--ca-file: CA file {typo}: not a PEM certificate" in err and len(err.strip().splitlines()) == 1, err


def test_server_state_folders_are_claimed_before_writing(tmp_path: Path, tiny_bundle: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    """`serve archive --state-dir` wrote model-store/ into any non-empty folder; `serve stop` on a
    folder without the marker said it had stopped a server that was not running."""
    from fieldid.serve.config import ServeOptions
    from fieldid.serve.state import ServerState

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    assert main(["serve", "archive", "--bundle", str(tiny_bundle), "--state-dir", str(mine)]) == 2
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    # Not running, no marker: the warning says so instead of "stopped the server".
    ServerState(pid=2 ** 22 + 7, create_time=0.0, state_dir=str(mine), host="127.0.0.1", ports=ServeOptions().ports(),
                models={}, auth=False, key_file="", config="", log_dir="",
                started="2025-01-01T00:00:00+00:00").to_json(mine / "server.json")
    caplog.set_level("WARNING")
    assert main(["serve", "stop", "--state-dir", str(mine)]) == 0
    assert "no server of it was running" in caplog.text and "stopped the server" not in caplog.text


def test_the_training_log_names_the_commonest_class(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The baselines line said "always '0'": a class index, not the class."""
    import torch

    from fieldid.training.baselines import fit_run_baselines
    from fieldid.training.config import TrainConfig

    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1] * 10 + [0] * 30)
    caplog.set_level("INFO", logger="fieldid.train")
    fit_run_baselines(x, y, x, y, 2, TrainConfig(), tmp_path, labels=["scratch", "dent"])
    assert "always 'scratch' accuracy" in caplog.text


def test_evaluate_takes_a_folder_of_one_class(tiny_run: Path, shapes_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Field photos of one species are a fair test set; training's two-class rule refused them."""
    one = tmp_path / "field"
    cls = json.loads((tiny_run / "labels.json").read_text())[0]
    shutil.copytree(next(p for p in shapes_dir.rglob(cls) if p.is_dir()), one / cls)
    assert main(["evaluate", "--run", str(tiny_run), "--data", str(one), "--out", str(tmp_path / "m.json")]) == 0
    capsys.readouterr()
    m = json.loads((tmp_path / "m.json").read_text())
    assert m["num_images"] == len(list((one / cls).iterdir())) and 0 <= m["accuracy"] <= 1, m


def test_export_data_that_is_a_file_says_so(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    typo = tmp_path / "config.yaml"
    typo.write_text("x: 1\n")
    assert main(["export", "--run", str(tiny_run), "--data", str(typo), "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"--data {typo}: is a file, not a folder" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "b").exists()


def test_a_bundle_named_by_its_manifest_file(tiny_bundle: Path) -> None:
    from fieldid.export.manifest import bundle_dir_of, load_manifest

    assert bundle_dir_of(tiny_bundle / "manifest.json") == tiny_bundle
    assert load_manifest(tiny_bundle / "manifest.json").labels == load_manifest(tiny_bundle).labels


@pytest.mark.parametrize("what", ["real", "data", "ood-real"])
def test_benchmark_sets_naming_nothing(what: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", what, "--sets", ",", "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "--sets names no set; valid:" in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "w").exists()
