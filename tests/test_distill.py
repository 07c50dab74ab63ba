"""Distillation on a tiny pair, the cascade bench on that pair, and label mismatches refused."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fieldid.training.distill import LabelsMismatch, check_same_labels, distill_loss


def test_distill_loss_pulls_towards_the_teacher() -> None:
    student = torch.tensor([[2.0, 0.0, 0.0]], requires_grad=True)
    teacher = torch.tensor([[0.0, 3.0, 0.0]])
    loss = distill_loss(torch.tensor(0.0), student, teacher, weight=1.0, temperature=2.0)
    loss.backward()
    assert loss > 0 and student.grad[0, 1] < 0 < student.grad[0, 0]  # raise class 1, lower class 0
    same = distill_loss(torch.tensor(0.7), teacher, teacher, weight=0.25, temperature=3.0)
    assert float(same) == pytest.approx(0.75 * 0.7)


def test_label_mismatch_says_what_differs() -> None:
    check_same_labels(["a", "b"], ["a", "b"])
    with pytest.raises(LabelsMismatch, match="only in the server model: c"):
        check_same_labels(["a", "b"], ["a", "c"])
    with pytest.raises(LabelsMismatch, match="another order"):
        check_same_labels(["a", "b"], ["b", "a"])


@pytest.fixture(scope="module")
def distilled_run(tiny_run: Path, shapes_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device model distilled from ``tiny_run`` (the teacher), same data and seed, exported to ONNX."""
    from fieldid.export import export_run
    from fieldid.training import TrainConfig
    from fieldid.training.train import train

    out = tmp_path_factory.mktemp("distill") / "student"
    cfg = TrainConfig(epochs=2, head_epochs=1, image_size=64, batch_size=16, seed=0, teacher=str(tiny_run),
                      distill_weight=0.7, distill_temperature=3.0)
    train(shapes_dir, out, cfg)
    # The export keeps what passed: a 2-epoch student's int8 unknown decisions can miss their 99% bar
    # (its features move under quantization); this pair tests distillation and the cascade, which
    # use the int8 logits.
    export_run(out, formats=["onnx"])
    return out


def test_distillation_is_recorded(distilled_run: Path, tiny_run: Path) -> None:
    from fieldid.training.records import load_record

    d = load_record(distilled_run).distillation
    assert d["weight"] == 0.7 and d["temperature"] == 3.0 and d["teacher_run"] == str(tiny_run.resolve())
    assert d["teacher_model_version"] == load_record(tiny_run).model_version and 0 <= d["teacher_train_accuracy"] <= 1


def test_cascade_bench_on_the_tiny_pair(distilled_run: Path, tiny_run: Path, tiny_bundle: Path, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "fieldid", "bench", "cascade", "--run", str(distilled_run),
                          "--server-run", str(tiny_run), "--alone-run", str(tiny_run), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    r = json.loads((tmp_path / "cascade.json").read_text())
    dev, srv, cas, alone, alone_cas = r["rows"]
    assert srv["sent"] == 1.0 and dev["sent"] == 0.0 and 0.0 <= cas["sent"] <= 1.0
    # The cascade's latency is the device's plus the server's for the sent share, by definition.
    assert cas["latency_ms"] == pytest.approx(dev["latency_ms"] + cas["sent"] * srv["latency_ms"])
    assert r["distillation"]["weight"] == 0.7 and "cascade" in res.stdout and "goals:" in res.stdout
    # The model trained without the teacher (here the teacher's own run, exported int8): its rows,
    # and what distillation buys is the difference between the two device models.
    assert "without the teacher" in alone["answer"] and alone["sent"] == 0.0
    d = r["distillation"]
    assert d["device_accuracy_gain"] == pytest.approx(dev["accuracy"] - alone["accuracy"])
    assert d["cascade_accuracy_gain"] == pytest.approx(cas["accuracy"] - alone_cas["accuracy"])
    assert d["sent_change"] == pytest.approx(cas["sent"] - alone_cas["sent"]) and "distillation" in res.stdout


def test_cascade_refuses_a_pair_with_other_labels(distilled_run: Path, tiny_run: Path, tiny_bundle: Path,
                                                  tmp_path: Path) -> None:
    bad = tmp_path / "server_bundle"
    shutil.copytree(tiny_bundle, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["labels"] = list(reversed(m["labels"]))
    (bad / "manifest.json").write_text(json.dumps(m))
    res = subprocess.run([sys.executable, "-m", "fieldid", "bench", "cascade", "--run", str(distilled_run),
                          "--server-run", str(tiny_run), "--server-bundle", str(bad)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "labels differ" in res.stderr and "Traceback" not in res.stderr


def test_a_teacher_with_other_labels_is_refused_before_the_run_is_written(tiny_run: Path, tmp_path: Path) -> None:
    from helpers import make_shapes_dataset

    data = make_shapes_dataset(tmp_path / "data", {"circle": 6, "square": 6})  # 2 of the teacher's 3 classes
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "fieldid", "train", "--data", str(data), "--out", str(out),
                          "--epochs", "1", "--image-size", "64", "--teacher", str(tiny_run)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "labels differ" in res.stderr and "Traceback" not in res.stderr
    assert not out.exists()
