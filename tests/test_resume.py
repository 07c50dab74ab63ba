"""Kill-safety: ``kill -9`` mid-training, then ``fieldid train --resume``; corrupt checkpoints are refused."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import pytest
import torch

import fieldid
from fixtures_scaleout import log_rows, wait_for
from fieldid.training.records import RunRecord, load_record

EPOCHS = 5
pytestmark = pytest.mark.usefixtures("one_thread")


def _val_epochs(run: Path) -> list[int]:
    return [int(r["epoch"]) for r in log_rows(run) if r.get("val_macro_f1")]


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory: pytest.TempPathFactory, shapes_dir: Path) -> dict:
    """A real `fieldid train` process SIGKILLed after its third validation, as it left its run dir."""
    import subprocess
    import sys

    from fixtures_scaleout import scaleout_env

    tmp = tmp_path_factory.mktemp("killed")
    cfg = tmp / "cfg.yaml"
    # Patience > epochs: the run must go the full distance, so "same final epoch count" is exact.
    # The head-only epoch runs inside Lightning here (no feature cache), so every one of the
    # EPOCHS epochs is a Lightning epoch with its own validation row to count.
    cfg.write_text(f"epochs: {EPOCHS}\nhead_epochs: 1\nearly_stopping_patience: 99\nimage_size: 64\n"
                   "batch_size: 16\naccelerator: cpu\nhead_feature_cache: false\n")
    run = tmp / "run"
    log = tmp / "train.log"
    with log.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "fieldid", "train", "--data", str(shapes_dir), "--out",
                                 str(run), "--config", str(cfg)], env=scaleout_env(), stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
    proc.log_path = log  # type: ignore[attr-defined]
    try:
        # Epoch 2 is past the best epoch on this data more often than not: Lightning's own
        # save_last would have left last.ckpt behind there.
        wait_for(lambda: max(_val_epochs(run), default=-1) >= 2, proc, 400, "the third validation")
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    seen = max(_val_epochs(run))
    ckpt_epoch = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["epoch"]
    return {"run": run, "seen": seen, "ckpt_epoch": ckpt_epoch}


def test_kill9_then_resume_finishes_the_run(killed_run: dict, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(killed_run["run"], run)
    assert RunRecord.from_json(run / "run.json").status == "training"
    # At most one epoch is lost: last.ckpt is at the last validated epoch (or the one before,
    # when the kill fell between a validation and its checkpoint write).
    assert killed_run["ckpt_epoch"] >= killed_run["seen"] - 1
    # What a kill in the middle of a checkpoint write leaves behind: a temp file, never last.ckpt.
    (run / "checkpoints" / ".last.ckpt.deadbeef.tmp").write_bytes(b"half a checkpoint")

    assert fieldid.main(["train", "--resume", str(run)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["run"] == str(run)

    record = load_record(run)  # validates: status trained, weights present
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["training"]["epochs"] == EPOCHS
    assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["macro_f1"] <= 1.0
    assert metrics["num_images"] > 0 and len(metrics["confusion_matrix"]) == record.num_classes
    # Every epoch validated exactly once across both processes: the resumed process neither
    # restarted from 0 nor lost the first process's log history.
    assert sorted(_val_epochs(run)) == list(range(EPOCHS))
    assert (run / "plots" / "curves.png").stat().st_size > 0


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_corrupt_checkpoint_is_refused_with_one_line(killed_run: dict, tmp_path: Path, damage: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(killed_run["run"], run)
    last = run / "checkpoints" / "last.ckpt"
    if damage == "truncated":
        last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    elif damage == "garbage":
        last.write_bytes(random.Random(0).randbytes(4096))
    else:
        torch.save({"weights": torch.zeros(3)}, last)
    before = sorted(p.name for p in run.rglob("*"))

    assert fieldid.main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "last.ckpt" in err[0]
    expected = "not a fieldid/Lightning checkpoint" if damage == "foreign" else "corrupt or half-written"
    assert expected in err[0] and "delete it and rerun --resume to restart this run from epoch 0" in err[0]
    assert sorted(p.name for p in run.rglob("*")) == before  # refused before touching anything


def test_deleting_a_corrupt_last_checkpoint_restarts_from_epoch_0(tiny_run: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture) -> None:
    """What the corrupt-checkpoint message tells the user to do really works, and does what it says."""
    import lightning as L

    from fieldid.training.train import train

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    record = RunRecord.from_json(run / "run.json")
    record.status = "training"  # as a run killed mid-training leaves it
    record.to_json(run / "run.json")
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[:1000])
    assert fieldid.main(["train", "--resume", str(run)]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "restart this run from epoch 0" in err

    class Stop(Exception):
        pass

    class FirstEpoch(L.Callback):
        def on_train_epoch_start(self, trainer, module) -> None:
            self.epoch, self.step = trainer.current_epoch, trainer.global_step
            raise Stop

    last.unlink()
    spy = FirstEpoch()
    with pytest.raises(Stop):
        train(None, None, resume=run, callbacks=[spy])
    assert (spy.epoch, spy.step) == (0, 0)
