"""``fieldid tune``: a real (tiny) Optuna search, killed with -9 and resumed; pruning; bad input."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

import fieldid
from fixtures_scaleout import wait_for
from fieldid.commands.training import train_overrides
from fieldid.training.config import load_config
from fieldid.training.tune import TuneError, load_space, tune, validate_space
from fieldid.training import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

SPACE = """\
lr: {type: float, low: 1.0e-4, high: 2.0e-3, log: true}
weight_decay: {type: float, low: 1.0e-5, high: 0.1, log: true}
label_smoothing: {type: float, low: 0.0, high: 0.2}
dropout: {type: float, low: 0.0, high: 0.5}
head_epochs: {type: int, low: 1, high: 2}
image_size: {type: categorical, choices: [160, 224]}
"""


def _tune_args(data: Path, out: Path, space: Path) -> list[str]:
    # --image-size and --model are given, so they are fixed rather than searched.
    return ["tune", "--data", str(data), "--trials", "2", "--out", str(out), "--space", str(space),
            "--epochs", "3", "--image-size", "64", "--model", "mobilenet_v2", "--batch-size", "16",
            "--accelerator", "cpu", "--heartbeat", "1", "--pruner", "none", "--sampler-seed", "0"]


def test_killed_tune_resumes_and_writes_a_usable_config(tmp_path: Path, shapes_dir: Path, fieldid_proc,
                                                        capsys: pytest.CaptureFixture) -> None:
    import optuna

    out = tmp_path / "tune"
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    args = _tune_args(shapes_dir, out, space)

    # 1. A tune process dies with kill -9 in the middle of its first trial.
    proc = fieldid_proc(*args)
    first = out / "trial-0000"
    wait_for(lambda: (first / "checkpoints" / "last.ckpt").is_file(), proc, 400, "trial 0's first checkpoint")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(2.5)  # > 2 x --heartbeat: trial 0's heartbeat is now stale

    # 2. The same command again: the stale trial is failed, retried from its checkpoint, and the
    #    study is completed to 2 finished trials.
    assert fieldid.main(args) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(printed[-1])
    assert summary["trials"] == {"fail": 1, "complete": 2}
    assert any(line.startswith("trial") for line in printed) and sum("COMPLETE" in line for line in printed) == 2

    study = optuna.load_study(study_name=summary["study"], storage=summary["storage"])
    trials = study.get_trials()
    assert trials[0].state.name == "FAIL"
    retry = [t for t in trials if t.state.name == "COMPLETE" and t.user_attrs["run"] == str(first)]
    assert len(retry) == 1, "trial 0 was not continued in its own run directory"
    assert retry[0].params == trials[0].params
    assert min(retry[0].intermediate_values) >= 1, "the retried trial restarted from epoch 0"
    assert all(t.params["head_epochs"] in (1, 2) and "image_size" not in t.params for t in trials)

    # 3. best.yaml is the best trial's exact training config, and `fieldid train --config` takes it.
    best_yaml = out / "best.yaml"
    cfg = load_config(best_yaml)
    best_run = Path(summary["best_run"])
    assert cfg == load_config(best_run / "config.yaml")
    assert json.loads((best_run / "metrics.json").read_text())["val"]["macro_f1"] == pytest.approx(
        summary["best_val_macro_f1"])
    assert summary["best_val_macro_f1"] == pytest.approx(study.best_value)
    assert cfg.lr == pytest.approx(study.best_params["lr"]) and cfg.image_size == 64
    parsed = fieldid.build_parser().parse_args(["train", "--data", str(shapes_dir), "--out", str(tmp_path / "r"),
                                                "--config", str(best_yaml)])
    assert load_config(parsed.config).replace(**train_overrides(parsed)) == cfg

    png = (out / "search.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 1 + len(trials)


def test_pruned_trial_stops_training_cleanly(tmp_path: Path, shapes_dir: Path) -> None:
    import optuna

    out = tmp_path / "tune"
    base = TrainConfig(epochs=4, head_epochs=1, image_size=64, batch_size=16, accelerator="cpu")
    space = {"lr": {"type": "float", "low": 1e-4, "high": 1e-3, "log": True}}
    # Any macro-F1 is below 1.5: the very first report prunes, inside Lightning's fit loop.
    with pytest.raises(TuneError, match="no trial completed"):
        tune(shapes_dir, 1, base=base, space=space, out_dir=out, pruner=optuna.pruners.ThresholdPruner(lower=1.5),
             heartbeat=5)
    study = optuna.load_study(study_name="data", storage=f"sqlite:///{out.resolve() / 'study.db'}")
    (trial,) = study.get_trials()
    assert trial.state.name == "PRUNED" and list(trial.intermediate_values) == [0]
    run = Path(trial.user_attrs["run"])
    assert json.loads((run / "run.json").read_text())["status"] == "training"  # never finalised
    assert not list((run / "checkpoints").glob("*.ckpt"))  # pruned runs keep no checkpoints
    assert (out / "search.png").is_file() and (out / "trials.csv").is_file()


def test_a_trial_that_raises_model_error_fails_alone(tmp_path: Path, shapes_dir: Path) -> None:
    """A ModelError in one trial (weights that cannot load) fails that trial; the study goes on."""
    import optuna

    out = tmp_path / "tune"
    missing = str(tmp_path / "missing.pth")
    storage = f"sqlite:///{out.resolve() / 'study.db'}"
    out.mkdir()
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.enqueue_trial({"weights": missing})
    study.enqueue_trial({"weights": None})  # None: the base config's (packaged) weights
    base = TrainConfig(epochs=1, head_epochs=0, image_size=32, batch_size=16, accelerator="cpu")
    result = tune(shapes_dir, 2, base=base, space={"weights": {"type": "categorical", "choices": [missing, None]}},
                  out_dir=out, storage=storage, study_name="s", pruner="none", heartbeat=5)
    assert result.counts == {"fail": 1, "complete": 1}
    failed, done = optuna.load_study(study_name="s", storage=storage).get_trials()
    assert failed.state.name == "FAIL" and "ModelError" in failed.user_attrs["error"]
    assert not (out / "trial-0000").exists()  # rejected before its run directory was written
    assert done.state.name == "COMPLETE" and result.best_trial == done.number


def test_search_space_is_validated() -> None:
    base = TrainConfig(epochs=3)
    good = load_space(None, pinned=["model", "image_size"])
    validate_space(good, base)
    assert "model" not in good and "lr" in good
    bad = [
        ({"learning_rate": {"type": "float", "low": 0.1, "high": 1.0}}, "unknown key"),
        ({"lr": {"type": "float", "low": 1.0, "high": 0.1}}, "low < high"),
        ({"lr": {"type": "float", "low": 0.0, "high": 0.1, "log": True}}, "log scale"),
        ({"lr": {"type": "uniform", "low": 0.0, "high": 0.1}}, "type must be"),
        ({"head_epochs": {"type": "int", "low": 0, "high": 5}}, "head_epochs=5"),
        ({"model": {"type": "categorical", "choices": []}}, "non-empty"),
        ({"dropout": {"type": "float", "low": 0.0, "high": 0.5, "steps": 3}}, "unknown key"),
    ]
    for space, message in bad:
        with pytest.raises(TuneError, match=message):
            validate_space(space, base)
    with pytest.raises(ValueError, match="mobilenet_v2"):
        validate_space({"model": {"type": "categorical", "choices": ["resnet9000"]}}, base)


@pytest.mark.parametrize(("extra", "message"), [
    (["--devices", "2", "--strategy", "ddp"], "one single-device process per trial"),
    (["--space", "missing.yaml"], "search-space file not found"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--storage", "nosuchdb://x"], "cannot open storage"),
])
def test_cli_bad_tune_input_is_one_line(tmp_path: Path, shapes_dir: Path, extra: list[str], message: str,
                                        capsys: pytest.CaptureFixture) -> None:
    args = ["tune", "--data", str(shapes_dir), "--trials", "1", "--out", str(tmp_path / "t"), *extra]
    assert fieldid.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_tune_help_documents_every_flag(capsys: pytest.CaptureFixture) -> None:
    parser = fieldid.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["tune"]
    for action in sub._actions:
        assert action.help, f"{action.option_strings} has no help text"
    with pytest.raises(SystemExit) as exc:
        fieldid.main(["tune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--trials", "--storage", "--study", "--space", "--pruner", "--heartbeat", "--devices"):
        assert flag in out
