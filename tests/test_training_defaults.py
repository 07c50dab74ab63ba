"""Training defaults (issue 9) and training hardening (issue 11), with real training steps."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch

import fieldid
from helpers import make_shapes_dataset
from fieldid.training import TrainConfig, create_model
from fieldid.training.config import ConfigError, load_config
from fieldid.training.data import CachedImageDataset, ImageCache, eval_transform, load_split, make_split
from fieldid.training.images import DataError
from fieldid.training.models import get_backbone
from fieldid.training.records import RecordError, RunRecord, load_record
from fieldid.training.checkpoints import CheckpointError, load_checkpoint
from fieldid.training.head import train_head_on_features
from fieldid.training.image_size import choose_image_size, matched_image_size
from fieldid.training.train import train


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- image size rule
def test_image_size_rule() -> None:
    # Small photos: the crop the eval resize would cut from them, in multiples of 32, at least 160 px.
    assert matched_image_size([220] * 3, 224, 0.875)[0] == 192
    assert matched_image_size([183] * 3, 224, 0.875) == (
        160, "photos are small (median shorter side 183 px): training at 160 px instead of the native 224 px")
    size, reason = matched_image_size([100] * 9, 224, 0.875)
    assert size == 160 and "(upscaled)" in reason
    assert matched_image_size([150, 160, 170], 224, 0.875)[0] == 160
    # Tiny photos stop at the floor; the median decides, not a few outliers.
    assert matched_image_size([8] * 5, 224, 0.875)[0] == 160
    assert matched_image_size([100] * 5 + [4000] * 4, 224, 0.875)[0] == 160
    # A backbone whose native size is at or below the floor trains at its native size.
    assert matched_image_size([100] * 3, 128, 0.875)[0] == 128
    # Photos at or above the native size (or unreadable ones): the native size.
    size, reason = matched_image_size([480, 640, 3000], 224, 0.875)
    assert size == 224 and "native" in reason
    assert matched_image_size([], 224, 0.875)[0] == 224
    assert matched_image_size([256], 224, 0.875)[0] == 224


def test_image_size_rule_reads_the_training_photos(tmp_path: Path) -> None:
    small = make_shapes_dataset(tmp_path / "small", {"circle": 6, "square": 6}, size=72)
    split = make_split(small, seed=0)
    size, reason = choose_image_size(split, TrainConfig())
    assert size == 160 and "72 px" in reason
    # An explicit size always wins, even below the rule's floor.
    assert choose_image_size(split, TrainConfig(image_size=48)) == (48, "--image-size 48 px (explicit)")
    big = make_shapes_dataset(tmp_path / "big", {"circle": 6, "square": 6}, size=300)
    assert choose_image_size(make_split(big, seed=0), TrainConfig())[0] == get_backbone("mobilenet_v2").input_size


# --------------------------------------------------------------------------- head on cached features
def test_feature_cache_head_phase_reaches_the_same_head_loss(shapes_dir: Path) -> None:
    spec = get_backbone("mobilenet_v2").preprocess(32)
    split = make_split(shapes_dir, seed=0)
    cache = ImageCache(split.paths("train"), split.targets("train"), resize_size=spec.resize_size,
                       interpolation=spec.interpolation)
    dataset = CachedImageDataset(cache, eval_transform(spec))
    cfg = TrainConfig(head_epochs=4, batch_size=8, head_lr=1e-2)
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", 3, pretrained=True, dropout=0.2)
    twin = copy.deepcopy(model)
    backbone_before = {k: v.clone() for k, v in model.features.state_dict().items()}

    torch.manual_seed(1)
    cached = train_head_on_features(model, dataset, cfg, cache_features=True)
    torch.manual_seed(1)
    live = train_head_on_features(twin, dataset, cfg, cache_features=False)

    assert len(cached) == len(live) == 4
    assert cached == pytest.approx(live, rel=1e-4, abs=1e-5)
    assert cached[-1] < cached[0]  # the head really learned
    # Weights are compared as whole tensors, not element by element: the cached features come from
    # batches of 64 and the live ones from batches of 8, so CPU kernels round them differently
    # (~1e-6, and it depends on the CPU's vector width). Adam divides each gradient by its own
    # running size, so a weight whose gradient is nearly zero can move by a rounding-sized push
    # times the learning rate; one such element says nothing about the head. The head's answers
    # on the training images, and each tensor as a whole, must agree.
    for (k, v), w in zip(model.classifier.state_dict().items(), twin.classifier.state_dict().values()):
        assert float((v - w).norm() / w.norm().clamp_min(1e-12)) < 1e-3, k
    with torch.no_grad():
        x = torch.stack([dataset[i][0] for i in range(len(dataset))])
        p_cached, p_live = model.eval()(x).softmax(1), twin.eval()(x).softmax(1)
    torch.testing.assert_close(p_cached, p_live, rtol=0, atol=1e-3)
    # The backbone, BatchNorm statistics included, is untouched by the head phase.
    for k, v in model.features.state_dict().items():
        torch.testing.assert_close(v, backbone_before[k], msg=k)


# --------------------------------------------------------------------------- decode workers
def test_num_workers_read_the_decode_cache(shapes_dir: Path) -> None:
    from torch.utils.data import DataLoader

    spec = get_backbone("mobilenet_v2").preprocess(48)
    split = make_split(shapes_dir, seed=0)
    cache = ImageCache(split.paths("val"), split.targets("val"), resize_size=spec.resize_size,
                       interpolation=spec.interpolation, enabled=True)
    ds = CachedImageDataset(cache, eval_transform(spec))
    alone = [x for x, _ in DataLoader(ds, batch_size=4)]
    forked = [x for x, _ in DataLoader(ds, batch_size=4, num_workers=2)]
    assert len(alone) == len(forked) > 0
    for a, b in zip(alone, forked):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_training_with_num_workers_and_the_decode_cache(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "d", {"circle": 14, "square": 14}, size=40)
    cfg = TrainConfig(epochs=2, head_epochs=1, batch_size=8, num_workers=2, cache=True, accelerator="cpu")
    rec = train(data, tmp_path / "run", cfg)
    assert rec.status == "trained"
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["training"]["speed"] == {"head_phase": "cached features", "precision": "32-true", "num_workers": 2}
    assert m["training"]["epochs"] == 2
    # The held-out metrics say how many photos the run's fallback threshold sends to the server.
    assert m["fallback"]["threshold"] == rec.fallback_threshold and 0.0 <= m["fallback"]["sent_to_server"] <= 1.0
    # No --image-size: the photos (40 px) are far below 224, so the rule chose the size (its floor),
    # and the run records it where export, server and demo read it.
    assert rec.preprocess["crop_size"] == 160 and rec.extra["image_size"] == 160
    assert "40 px" in rec.extra["image_size_rule"]
    assert json.loads((tmp_path / "run" / "preprocess.json").read_text())["crop_size"] == 160


# --------------------------------------------------------------------------- checkpoints
def _planted_checkpoint(path: Path, marker: Path) -> None:
    class Planted:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {}, "epoch": 0, "loops": Planted()}, path)


def test_run_checkpoints_load_with_weights_only(tiny_run: Path) -> None:
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = load_checkpoint(tiny_run / "checkpoints" / name)
        assert "state_dict" in ckpt and "optimizer_states" in ckpt


def test_checkpoint_with_a_pickled_callable_is_refused(tiny_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "code-ran"
    planted = tmp_path / "planted.ckpt"
    _planted_checkpoint(planted, marker)
    with pytest.raises(CheckpointError, match="refused.*posix.system.*weights_only=True"):
        load_checkpoint(planted)
    assert not marker.exists()

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    record = RunRecord.from_json(run / "run.json")
    record.status = "training"  # an interrupted run someone planted a checkpoint into
    record.to_json(run / "run.json")
    _planted_checkpoint(run / "checkpoints" / "last.ckpt", marker)
    assert fieldid.main(["train", "--resume", str(run)]) == 2
    assert "refused" in _error_line(capsys)
    assert not marker.exists()


# --------------------------------------------------------------------------- evaluate --data OTHER
def test_evaluate_other_folder_never_touches_the_runs_metrics(tiny_run: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    held_out = (run / "metrics.json").read_bytes()
    other = make_shapes_dataset(tmp_path / "field photos", {"circle": 3, "square": 2}, size=72, seed=9)
    assert fieldid.main(["evaluate", "--run", str(run), "--data", str(other)]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (run / "metrics.json").read_bytes() == held_out
    written = run / "metrics-field_photos.json"
    assert line["metrics_file"] == str(written)
    m = json.loads(written.read_text())
    assert m["num_images"] == 5 and m["data"] == str(other.resolve()) and "training" not in m
    assert (run / "plots" / "confusion_matrix-field_photos.png").stat().st_size > 0

    out = tmp_path / "elsewhere" / "m.json"
    assert fieldid.main(["evaluate", "--run", str(run), "--data", str(other), "--out", str(out)]) == 0
    assert json.loads(out.read_text())["num_images"] == 5
    assert fieldid.main(["evaluate", "--run", str(run), "--data", str(other), "--out", str(run / "metrics.json")]) == 2
    assert "held-out metrics" in _error_line(capsys)
    assert (run / "metrics.json").read_bytes() == held_out


# --------------------------------------------------------------------------- val_fraction 0
def test_val_fraction_0_is_refused_without_a_val_folder(tmp_path: Path, shapes_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("val_fraction: 0\n")
    out = tmp_path / "run"
    assert fieldid.main(["train", "--data", str(shapes_dir), "--out", str(out), "--config", str(cfg)]) == 2
    assert "val_fraction 0" in _error_line(capsys) and not out.exists()
    # A pre-split tree with its own val/ needs no carved validation set: accepted.
    from fieldid.training.train import require_validation

    tree = tmp_path / "tree"
    for part in ("train", "val"):
        make_shapes_dataset(tree / part, {"circle": 3, "square": 3}, seed=3 if part == "val" else 0)
    split = make_split(tree, val_fraction=0.0, seed=0)
    require_validation(split, TrainConfig(val_fraction=0.0))
    with pytest.raises(ConfigError, match="val_fraction 0"):
        require_validation(make_split(tree / "train", val_fraction=0.0, seed=0), TrainConfig(val_fraction=0.0))


# --------------------------------------------------------------------------- --resume flags
def test_resume_refuses_unsafe_flags_in_one_line(tiny_run: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    record = RunRecord.from_json(run / "run.json")
    record.status = "training"
    record.to_json(run / "run.json")
    before = (run / "config.yaml").read_text()
    for flags, named in ((["--lr", "0.1"], "--lr"), (["--image-size", "128"], "--image-size"),
                         (["--no-hue"], "--no-hue"), (["--data", "x"], "--data")):
        assert fieldid.main(["train", "--resume", str(run), *flags]) == 2
        line = _error_line(capsys)
        assert named in line, line
        if named != "--data":
            assert "cannot change on resume" in line and "--epochs" in line, line
    assert (run / "config.yaml").read_text() == before  # nothing applied, nothing silently dropped
    # The checkpoint holds 3 epochs (1 head-only + 2): asking for fewer is refused, not ignored.
    assert fieldid.main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    assert "--epochs must be more than" in _error_line(capsys)
    assert (run / "config.yaml").read_text() == before  # a refused value is not saved either


def test_resume_applies_epochs(tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    record = RunRecord.from_json(run / "run.json")
    record.status = "training"
    record.to_json(run / "run.json")
    assert fieldid.main(["train", "--resume", str(run), "--epochs", "4", "--num-workers", "0"]) == 0
    capsys.readouterr()
    assert load_config(run / "config.yaml").epochs == 4  # written into the run, so a later resume keeps it
    m = json.loads((run / "metrics.json").read_text())
    assert m["training"]["epochs"] == 4 and m["training"]["speed"]["num_workers"] == 0
    assert load_record(run).status == "trained"


# --------------------------------------------------------------------------- typed values
def test_yaml_numbers_and_wrong_types(tmp_path: Path, shapes_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 1e-3\nhead_lr: 5e-3\nweight_decay: 1E-2\ndevices: 1\naugment:\n  scale_min: 5e-1\n")
    c = load_config(cfg)  # PyYAML reads 1e-3 as a string; fieldid reads it as the number meant
    assert (c.lr, c.head_lr, c.weight_decay, c.devices, c.augment.scale_min) == (1e-3, 5e-3, 1e-2, "1", 0.5)
    for text, key in (("epochs: many\n", "epochs"), ("lr: fast\n", "lr"), ("augment:\n  hflip: 3\n", "augment.hflip"),
                      ("cache: [1]\n", "cache"), ("model: {a: 1}\n", "model")):
        cfg.write_text(text)
        assert fieldid.main(["train", "--data", str(shapes_dir), "--out", str(tmp_path / "r"),
                             "--config", str(cfg)]) == 2
        line = _error_line(capsys)
        assert key in line and str(cfg) in line, line
    assert not (tmp_path / "r").exists()


def test_wrongly_typed_run_json_is_one_line(tiny_run: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    d = json.loads((run / "run.json").read_text())
    for key, bad in (("num_classes", "three"), ("temperature", [1]), ("labels", "circle")):
        (run / "run.json").write_text(json.dumps({**d, key: bad}))
        with pytest.raises(RecordError, match=key):
            load_record(run)
        assert fieldid.main(["evaluate", "--run", str(run)]) == 2
        assert key in _error_line(capsys)


# --------------------------------------------------------------------------- split.json
@pytest.mark.parametrize("damage,expected", [
    ("not json", "not valid JSON"), ("[]", "expected a JSON object"), ('{"labels": []}', "missing key(s) root"),
    ("bad_pair", "files.test[0]"), ("escape", "leaves the dataset folder"), ("label_range", "class index < 3"),
])
def test_malformed_split_json_names_file_and_problem(tiny_run: Path, tmp_path: Path, damage: str, expected: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("export"))
    path = run / "split.json"
    d = json.loads(path.read_text())
    if damage == "bad_pair":
        d["files"]["test"][0] = "circle_000.png"
    elif damage == "escape":
        d["files"]["test"][0] = ["../../etc/passwd", 0]
    elif damage == "label_range":
        d["files"]["test"][0][1] = 7
    text = damage if damage in ("not json", "[]") or damage.startswith("{") else json.dumps(d)
    path.write_text(text)
    with pytest.raises(DataError, match="split.json"):
        load_split(path)
    assert fieldid.main(["evaluate", "--run", str(run)]) == 2
    line = _error_line(capsys)
    assert str(path) in line and expected in line, line


# --------------------------------------------------------------------------- augment.hflip: auto
def _stripes(root: Path, n: int = 40, size: int = 64) -> Path:
    """Two classes that are each other's mirror image: stripes rising and falling to the right."""
    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size]
    for ci, kind in enumerate(("falling", "rising")):
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rng = np.random.default_rng([7, ci, i])
            period, phase = rng.uniform(8, 14), rng.uniform(0, 14)
            u = (xx + (yy if kind == "falling" else -yy) + phase) % period < period / 2
            bg, fg = rng.integers(0, 100, 3), rng.integers(150, 256, 3)
            img = np.where(u[..., None], fg, bg) + rng.normal(0, 8, (size, size, 3))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / kind / f"{kind}_{i:03d}.png")
    return root


def test_hflip_auto_turns_flips_off_where_a_mirror_image_is_another_class(tmp_path: Path) -> None:
    data = _stripes(tmp_path / "stripes")
    out = tmp_path / "run"
    train(data, out, TrainConfig(epochs=2, head_epochs=1, image_size=64, batch_size=16, seed=0))
    flips = json.loads((out / "run.json").read_text())["extra"]["hflip"]
    assert flips["used"] is False and flips["setting"] == "auto", flips
    assert flips["lost_to_mirror"] - flips["gained_by_mirror"] >= 5, flips
    assert load_config(out / "config.yaml").augment.hflip is False  # --resume trains as the run did


def test_hflip_auto_keeps_flips_where_a_mirror_image_is_the_same_class(tiny_run: Path) -> None:
    flips = json.loads((tiny_run / "run.json").read_text())["extra"]["hflip"]  # circles, squares, upright triangles
    assert flips["used"] is True and flips["photos_checked"] > 0, flips
    assert load_config(tiny_run / "config.yaml").augment.hflip is True


def test_hflip_setting_is_checked(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("augment:\n  hflip: sometimes\n")
    with pytest.raises(ConfigError, match="augment.hflip must be true|false|auto"):
        load_config(cfg)
    cfg.write_text("augment:\n  hflip: auto\n")
    assert load_config(cfg).augment.hflip == "auto"
