"""Multi-device training: a real 2-process CPU DDP run through the `fieldid` CLI."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fixtures_scaleout import log_rows
from fieldid.training import TrainConfig
from fieldid.training.data import load_split
from fieldid.training.compute import launch_rank, lightning_strategy

BATCH = 8
EPOCHS = 2
pytestmark = pytest.mark.usefixtures("one_thread")


def _structure(obj: Any) -> Any:
    """Keys (recursively) and value kinds, without the values."""
    if isinstance(obj, dict):
        return {k: _structure(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return ["list", _structure(obj[0]) if obj else None]
    return "number" if isinstance(obj, (int, float)) and not isinstance(obj, bool) else type(obj).__name__


def test_two_process_cpu_ddp_run(tmp_path: Path, shapes_dir: Path, tiny_run: Path, fieldid_proc) -> None:
    from fieldid.serve.config import free_port

    run = tmp_path / "ddp"
    # Left to itself, Lightning takes the rendezvous port from bind(0) -- the kernel's ephemeral range,
    # which any outgoing connection may take before rank 0 binds it; free_port picks outside that range.
    proc = fieldid_proc("train", "--data", shapes_dir, "--out", run, "--epochs", EPOCHS, "--image-size", 64,
                        "--batch-size", BATCH, "--accelerator", "cpu", "--devices", 2, "--strategy", "ddp",
                        env={"MASTER_PORT": str(free_port())})
    rc = proc.wait(timeout=540)
    out = Path(proc.log_path).read_text()
    assert rc == 0, out[-3000:]

    # Rank 0 alone finalised and printed; rank 1 re-executed the same command line quietly.
    summaries = [line for line in out.splitlines() if line.startswith('{"run"')]
    assert len(summaries) == 1 and json.loads(summaries[0])["run"] == str(run)
    assert "error" not in out.lower()

    # Same run-directory contract and metrics structure as a single-device run.
    single = {p.relative_to(tiny_run).as_posix() for p in tiny_run.rglob("*") if "tensorboard" not in p.parts
              and "export" not in p.parts}
    multi = {p.relative_to(run).as_posix() for p in run.rglob("*") if "tensorboard" not in p.parts}
    assert multi <= single  # nothing extra (no second log, no stray temp files from rank 1)
    assert {"run.json", "metrics.json", "model.pth", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
            "calibration.json", "plots/curves.png", "logs/metrics.csv"} <= multi
    metrics = json.loads((run / "metrics.json").read_text())
    single_metrics = json.loads((tiny_run / "metrics.json").read_text())
    # The baselines differ by design: the DDP head phase runs through the backbone inside Lightning, so
    # there are no cached features to fit the linear probe on; the majority answer is always there.
    ddp_base, single_base = metrics["training"].pop("baselines"), single_metrics["training"].pop("baselines")
    assert set(single_base) >= {"majority", "probe", "fine_tuned", "shipped"}
    assert "probe" not in ddp_base and {"majority", "fine_tuned", "shipped"} <= set(ddp_base)
    assert _structure(metrics) == _structure(single_metrics)
    assert metrics["training"]["epochs"] == EPOCHS
    assert json.loads((run / "run.json").read_text())["status"] == "trained"

    # Two processes really split the data: each rank ran len(train)/2 // batch steps an epoch
    # (drop_last), and the logged validation was synced into one row per epoch.
    n_train = len(load_split(run / "split.json").paths("train"))
    rows = log_rows(run)
    val_rows = [r for r in rows if r.get("val_macro_f1")]
    assert [int(r["epoch"]) for r in val_rows] == list(range(EPOCHS))
    # (Lightning logs epoch-end rows at global_step - 1; one device would have logged 2 * 6 - 1.)
    assert int(val_rows[-1]["step"]) == EPOCHS * ((n_train // 2) // BATCH) - 1
    assert all(0.0 <= float(r["val_macro_f1"]) <= 1.0 for r in val_rows)


@pytest.mark.parametrize(("env", "rank"), [({}, 0), ({"LOCAL_RANK": "1"}, 1), ({"RANK": "3", "LOCAL_RANK": "1"}, 3),
                                           ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, 1), ({"SLURM_PROCID": "0"}, 0)])
def test_launch_rank_is_read_before_the_trainer(monkeypatch: pytest.MonkeyPatch, env: dict, rank: int) -> None:
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(var, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert (launch_rank() == 0) == (rank == 0)


@pytest.mark.parametrize(("kw", "expected"), [
    ({"strategy": "ddp"}, "ddp_find_unused_parameters_true"),
    ({"strategy": "ddp", "head_epochs": 0}, "ddp"),
    ({"strategy": "auto", "devices": "2", "accelerator": "cpu"}, "ddp_find_unused_parameters_true"),
    ({"strategy": "auto", "devices": "1"}, "auto"),
    ({"strategy": "ddp_spawn"}, "ddp_spawn_find_unused_parameters_true"),
    ({"strategy": "auto", "num_nodes": 2}, "ddp_find_unused_parameters_true"),
])
def test_ddp_strategy_knows_about_the_frozen_backbone(kw: dict, expected: str) -> None:
    assert lightning_strategy(TrainConfig(**kw)) == expected
