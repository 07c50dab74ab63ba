"""``fieldid predict``: every artifact with a runtime here, CSV and JSON, broken files as rows, the server's
answer for the photos the device sent, and the rule that a key goes only to its own server."""
from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from fieldid.cli import main


def _photos(shapes_dir: Path, dest: Path) -> Path:
    """Two labelled photos per class in nested folders, a broken JPEG, an empty file and a non-image."""
    for cls in sorted(p.name for p in shapes_dir.iterdir() if p.is_dir()):
        (dest / "dive" / cls).mkdir(parents=True)
        for f in sorted((shapes_dir / cls).glob("*.png"))[-2:]:
            shutil.copy(f, dest / "dive" / cls / f.name)
    (dest / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (dest / "empty.png").write_bytes(b"")
    (dest / "notes.txt").write_text("not a photo, and not picked from a folder")
    (dest / ".hidden.png").write_bytes(b"skipped: hidden")
    return dest


def _bundle_copy(src: Path, dest: Path, edit) -> tuple[Path, dict]:
    """A copy of bundle ``src`` at ``dest`` whose manifest ``edit(manifest_dict)`` changed."""
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    edit(m)
    (dest / "manifest.json").write_text(json.dumps(m))
    return dest, m


def _send_all(m: dict) -> None:
    m["fallback_threshold"] = 1.0  # every photo goes to the server


def _predict(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    rc = main(["predict", *argv])
    out, err = capsys.readouterr()
    summary = json.loads(out.strip().splitlines()[-1]) if rc == 0 else {}
    return rc, summary, err


def _check_rows(rows: list[dict], labels: list[str]) -> None:
    by_name = {Path(r["path"]).name: r for r in rows}
    assert set(by_name) >= {"broken.jpg", "empty.png"} and "notes.txt" not in by_name and ".hidden.png" not in by_name
    for bad in ("broken.jpg", "empty.png"):
        assert by_name[bad]["error"] and by_name[bad]["label"] is None
    good = [r for r in rows if not r["error"]]
    assert len(good) == 2 * len(labels)
    for r in good:
        assert r["label"] in labels and 0 < r["probability"] <= 1
        assert [t["label"] for t in r["top_k"]][0] == r["label"] and len(r["top_k"]) == len(labels)
        assert isinstance(r["unknown"], bool) and isinstance(r["needs_fallback"], bool)
        assert r["needs_fallback"] == (r["unknown"] or r["probability"] < r["device"]["fallback_threshold"])
    # The tiny model learned the shapes: most held-out-like photos get their folder's label.
    right = sum(r["label"] == Path(r["path"]).parent.name for r in good)
    assert right >= 0.6 * len(good), [(r["path"], r["label"]) for r in good]


@pytest.mark.slow
def test_every_artifact_with_a_runtime(full_bundle: Path, shapes_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from fieldid.classify import choose_artifact
    from fieldid.export import import_exporters
    from fieldid.export.bundle import RUNTIMES
    from fieldid.export.manifest import load_manifest

    import_exporters()
    photos = _photos(shapes_dir, tmp_path / "photos")
    m = load_manifest(full_bundle)
    runnable = [a.file for a in m.artifact_list() if a.format in RUNTIMES and a.outputs == "logits"]
    assert {"model.onnx", "model.int8.onnx", "model.pte", "model.pt", "model.ptl"} <= set(runnable)
    # The phone's choice by default: the int8 ONNX file when it passed its bars, else the fp32 one.
    int8 = m.find("onnx", "int8")
    assert choose_artifact(m).file == (int8.file if int8.verification["status"] == "passed" else "model.onnx")
    labels_per_artifact = {}
    for name in runnable:
        out = tmp_path / f"{name}.json"
        rc, summary, err = _predict(capsys, "--bundle", str(full_bundle), "--artifact", name, str(photos),
                                    str(photos / "dive" / m.labels[0]), "--out", str(out))
        assert rc == 0, err
        assert "predict " in err  # the counted progress line
        rows = json.loads(out.read_text())
        assert summary["photos"] == len(rows) and summary["errors"] == 2 and summary["artifact"] == name
        assert all(r["artifact"] == name for r in rows)
        _check_rows(rows, m.labels)
        labels_per_artifact[name] = [r["label"] for r in rows]
    # Every fp32 artifact gives the PyTorch model's answers, so they agree photo for photo.
    fp32 = [labels_per_artifact[a.file] for a in m.artifact_list() if a.file in runnable and a.precision == "fp32"]
    assert len(fp32) >= 3 and all(x == fp32[0] for x in fp32)
    # The Python API gives the same rows as the command.
    import fieldid

    api_rows = fieldid.predict(fieldid.Bundle(full_bundle), photos, artifact="model.pte")
    cli_rows = json.loads((tmp_path / "model.pte.json").read_text())
    # One row per photo of the folder, the two broken ones included, each with the command's answer.
    assert len(api_rows) == 2 * len(m.labels) + 2
    by_file = {Path(r["path"]).resolve(): r["label"] for r in cli_rows}
    assert {Path(r["path"]).resolve(): r["label"] for r in api_rows}.items() <= by_file.items()


def test_bad_arguments_are_one_line_and_exit_2(tiny_bundle: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 40), (10, 200, 10)).save(photo)
    (tmp_path / "nothing").mkdir()
    named = tmp_path / "q.json"  # a "photo" given by name, with a table's suffix
    named.write_text("{}")
    cases = [
        (["--bundle", str(tiny_bundle), str(photo), "--out", str(tmp_path / "x.txt")], "must end in .csv or .json"),
        (["--bundle", str(tiny_bundle), str(tmp_path / "nope.jpg"), "--out", str(tmp_path / "x.csv")], "no such file"),
        (["--bundle", str(tiny_bundle), str(photo), "--artifact", "model.xyz", "--out", str(tmp_path / "x.csv")],
         "has no artifact 'model.xyz'"),
        (["--bundle", str(tiny_bundle), str(photo), "--artifact", "model.pth", "--out", str(tmp_path / "x.csv")],
         "no runtime for pytorch"),
        (["--bundle", str(tmp_path / "nothing"), str(photo), "--out", str(tmp_path / "x.csv")], "no manifest.json"),
        ([str(photo), "--out", str(tmp_path / "x.csv")], "exactly one of --run"),
        # Never over what it reads: the bundle's manifest, a photo given by name.
        (["--bundle", str(tiny_bundle), str(photo), "--out", str(tiny_bundle / "manifest.json")], "inside the bundle"),
        (["--bundle", str(tiny_bundle), str(named), "--out", str(named)], "is one of the photos"),
    ]
    manifest = (tiny_bundle / "manifest.json").read_bytes()
    for argv, message in cases:
        rc, _, err = _predict(capsys, *argv)
        assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "x.csv").exists()
    assert (tiny_bundle / "manifest.json").read_bytes() == manifest and named.read_text() == "{}"


def test_an_unreachable_server_and_a_pipe_are_rows(tiny_bundle: Path, shapes_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Every photo sent to a server that is not there gets its own error row (a refused connection
    is not reused: the second photo used to end the command with CannotSendRequest and no table),
    and a FIFO given by name is a row, not a command that waits for ever."""
    from fieldid.serve.config import free_port

    unsure, _ = _bundle_copy(tiny_bundle, tmp_path / "unsure", _send_all)
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in sorted(shapes_dir.rglob("*.png"))[:3]:
        shutil.copy(f, photos / f.name)
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    out = tmp_path / "rows.json"
    rc, summary, err = _predict(capsys, "--bundle", str(unsure), "--server", f"http://127.0.0.1:{free_port()}",
                                str(photos), str(fifo), "--out", str(out))
    assert rc == 0, err
    rows = {Path(r["path"]).name: r for r in json.loads(out.read_text())}
    assert "not a regular file" in rows.pop("pipe.png")["error"]
    assert len(rows) == 3 and summary["sent_to_server"] == summary["server_errors"] == 3
    assert all("server not reachable" in r["server"]["error"] for r in rows.values()), rows
    # A photo name that is not UTF-8 (Latin-1 from an old camera) goes into the CSV as its own bytes.
    latin = photos / os.fsdecode(b"caf\xe9.png")
    shutil.copy(next(photos.glob("*.png")), latin)
    rc, _, err = _predict(capsys, "--bundle", str(tiny_bundle), str(latin), "--out", str(tmp_path / "rows.csv"))
    assert rc == 0 and b"caf\xe9.png" in (tmp_path / "rows.csv").read_bytes(), err


def test_predict_may_write_beside_a_run_but_not_over_it(tiny_bundle: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A table inside the run folder is fine, again on a re-run; the run's own files are not."""
    run = tiny_bundle.parent
    photo = tmp_path / "p.png"
    Image.new("RGB", (40, 40), (10, 200, 10)).save(photo)
    table = run / "answers-test.csv"
    try:
        for source in ("--run", "--bundle", "--run"):  # a run given as --bundle is the same run
            rc, _, err = _predict(capsys, source, str(run), str(photo), "--out", str(table))
            assert rc == 0, err
        for own in ("run.json", "metrics.json"):
            rc, _, err = _predict(capsys, "--bundle", str(tiny_bundle), str(photo), "--out", str(run / own))
            assert rc == 2 and "inside the run" in err, err
    finally:
        table.unlink(missing_ok=True)


@pytest.mark.slow
def test_server_answers_the_photos_the_device_sent(served_tiny, tiny_bundle: Path, shapes_dir: Path,
                                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fieldid.classify import CSV_COLUMNS, _server_token

    photos = _photos(shapes_dir, tmp_path / "photos")
    # A copy of the bundle whose threshold sends every photo to the server.
    unsure, m = _bundle_copy(tiny_bundle, tmp_path / "unsure", _send_all)

    out = tmp_path / "rows.csv"
    rc, summary, err = _predict(capsys, "--bundle", str(unsure), "--server", served_tiny.base_url,
                                "--key-file", str(served_tiny.key_file), str(photos), "--out", str(out))
    assert rc == 0, err
    with out.open() as f:
        table = list(csv.DictReader(f))
    assert tuple(table[0]) == CSV_COLUMNS
    good = [r for r in table if not r["error"]]
    assert summary["sent_to_server"] == len(good) == summary["needs_fallback"] and summary["server_errors"] == 0
    for r in good:
        assert r["needs_fallback"] == "True" and r["server_label"] in m["labels"] and not r["server_error"]
        assert 0 < float(r["server_probability"]) <= 1
    # The server runs the fp32 weights through the same preprocessing: its answers are the device's fp32
    # ONNX answers, photo for photo (the device's int8 default may differ on a near tie, so it is not the
    # reference here).
    import fieldid

    fp32 = {r["path"]: r["label"] for r in fieldid.predict(unsure, photos, artifact="model.onnx") if not r["error"]}
    assert len(fp32) == len(good) > 0
    assert {r["path"]: r["server_label"] for r in good} == fp32
    assert all(not r["server_label"] for r in table if r["error"])  # an unreadable file is never sent

    # Without --key-file the key of the server started for this bundle is used -- for that server only.
    assert _server_token(tiny_bundle, served_tiny.base_url, None) == served_tiny.token
    assert _server_token(tiny_bundle, "http://127.0.0.2:9", None) is None
    # Its key file given for another server: refused before anything is sent (one line, exit 2).
    rc, _, err = _predict(capsys, "--bundle", str(unsure), "--server", "http://127.0.0.2:9", "--key-file",
                          str(served_tiny.key_file), str(photos), "--out", str(tmp_path / "never.csv"))
    assert rc == 2 and "belongs to the server at" in err and not (tmp_path / "never.csv").exists()
    # A wrong key: the server refuses, and each sent photo says so in its row (no crash).
    bad_key = tmp_path / "key_file.json"
    bad_key.write_text(json.dumps({"inference": {"key": "wrong"}}))
    rc, summary, err = _predict(capsys, "--bundle", str(unsure), "--server", served_tiny.base_url,
                                "--key-file", str(bad_key), str(photos), "--out", str(tmp_path / "rows.json"))
    assert rc == 0, err
    rows = json.loads((tmp_path / "rows.json").read_text())
    sent = [r for r in rows if r["server"] is not None]
    assert sent and summary["server_errors"] == len(sent) and all("HTTP 4" in r["server"]["error"] for r in sent)


@pytest.mark.slow
def test_server_model_pairing_is_checked(served_tiny, tiny_bundle: Path, shapes_dir: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """--server-run names the server's model and must have the device's labels in the same order;
    without it, an answer with classes the device does not have is an error row, never taken."""
    photos = _photos(shapes_dir, tmp_path / "photos")
    unsure, _ = _bundle_copy(tiny_bundle, tmp_path / "unsure", _send_all)
    key = ["--key-file", str(served_tiny.key_file)]

    # The served bundle itself as the server model: labels identical, every sent photo answered by it.
    out = tmp_path / "paired.csv"
    rc, summary, err = _predict(capsys, "--bundle", str(unsure), "--server", served_tiny.base_url, *key,
                                "--server-run", str(tiny_bundle), str(photos), "--out", str(out))
    assert rc == 0, err
    assert summary["sent_to_server"] > 0 and summary["server_errors"] == 0

    # A server model whose labels come in another order: one line, exit 2, no table written.
    other, _ = _bundle_copy(tiny_bundle, tmp_path / "other-server",
                            lambda o: o.update(labels=list(reversed(o["labels"]))))
    never = tmp_path / "never.csv"
    rc, _, err = _predict(capsys, "--bundle", str(unsure), "--server", served_tiny.base_url, *key,
                          "--server-run", str(other), str(photos), "--out", str(never))
    assert rc == 2 and "labels differ" in err and len(err.strip().splitlines()) == 1, err
    assert not never.exists()
    # --server-run without --server is refused the same way.
    rc, _, err = _predict(capsys, "--bundle", str(unsure), "--server-run", str(tiny_bundle), str(photos),
                          "--out", str(never))
    assert rc == 2 and "--server" in err and not never.exists()

    # A device model whose classes the server's model does not list, asked by name: each sent photo
    # is an error row naming the foreign labels; none of the server's labels reaches the table.
    def rename(r: dict) -> None:
        for ex in r.get("examples", []):  # the bundle's example photos name their class too
            if ex["label"] in r["labels"]:
                ex["label"] = f"not-{ex['label']}"
        r["labels"] = [f"not-{x}" for x in r["labels"]]

    renamed, _ = _bundle_copy(unsure, tmp_path / "renamed", rename)
    out = tmp_path / "foreign.json"
    rc, summary, err = _predict(capsys, "--bundle", str(renamed), "--server", served_tiny.base_url, *key,
                                str(photos), "--out", str(out))
    assert rc == 0, err
    sent = [row for row in json.loads(out.read_text()) if row["server"] is not None]
    assert sent and summary["server_errors"] == len(sent)
    assert all("labels the device model does not have" in row["server"]["error"] for row in sent)
