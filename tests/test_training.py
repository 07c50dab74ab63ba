"""Training: registry, data handling, calibration, run directory, CLI — with real training steps."""
from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import make_shapes_dataset
from fieldid.training import TrainConfig, create_model, get_backbone, list_backbones
from fieldid.training.train import train
from fieldid.training.calibrate import choose_fallback_threshold, expected_calibration_error, fit_temperature
from fieldid.training.config import ConfigError, load_config
from fieldid.training.data import (CachedImageDataset, ImageCache, class_weights, eval_transform, make_split,
                           train_transform)
from fieldid.training.images import DataError, load_rgb
from fieldid.training.models import ModelError, _load_state_dict, imagenet_labels
from fieldid.training.records import PreprocessSpec, RecordError, RunRecord

FIELDID = [sys.executable, "-m", "fieldid"]
ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*FIELDID, *map(str, args)], capture_output=True, text=True, cwd=cwd or ROOT,
                          timeout=timeout)


# --------------------------------------------------------------------------- registry
CAT_CLASSES = {"tabby", "tiger cat", "Egyptian cat", "Persian cat", "Siamese cat", "lynx"}


@pytest.mark.parametrize("name", list_backbones())
def test_pretrained_weights_really_loaded(name: str) -> None:
    """Real photos through the ImageNet head: chelsea is a cat, coffee is espresso."""
    from skimage import data

    model = create_model(name)  # ImageNet head kept
    spec = get_backbone(name).preprocess()
    tf = eval_transform(spec, from_cache=False)
    labels = imagenet_labels()
    with torch.no_grad():
        cat = labels[int(model(tf(Image.fromarray(data.chelsea()))[None]).argmax())]
        cup = labels[int(model(tf(Image.fromarray(data.coffee()))[None]).argmax())]
    assert cat in CAT_CLASSES
    assert cup == "espresso"


@pytest.mark.parametrize("name", list_backbones())
def test_registry_records_are_complete(name: str) -> None:
    spec = get_backbone(name)
    assert spec.input_size > 0 and 0 < spec.crop_pct <= 1
    assert spec.interpolation in ("bilinear", "bicubic")
    assert len(spec.mean) == 3 and len(spec.std) == 3
    assert spec.weight_source and spec.license
    model = create_model(name, pretrained=False)
    assert sum(p.numel() for p in model.parameters()) == spec.num_params
    head = create_model(name, num_classes=4, pretrained=False)
    assert head(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ModelError, match="mobilenet_v2.*efficientnet_lite0|efficientnet_lite0.*mobilenet_v2"):
        get_backbone("resnet9000")
    with pytest.raises(ModelError, match="unknown timm model"):
        get_backbone("timm/not_a_model_at_all")


def test_timm_model_from_local_weights_file(tmp_path: Path) -> None:
    import timm

    src = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pth")
    model = create_model("timm/mobilenetv3_small_050", num_classes=3, weights_file=str(tmp_path / "w.pth"))
    conv = "conv_stem.weight"
    assert torch.equal(model.state_dict()[conv], src.state_dict()[conv])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_timm_model_without_weights_offline_says_how_to_fix() -> None:
    # conftest sets HF_HUB_OFFLINE=1 before anything imports huggingface_hub: tests never download.
    with pytest.raises(ModelError, match="--weights FILE"):
        create_model("timm/mobilenetv3_small_050", num_classes=3)


def test_weights_sha256_is_checked(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(1)}, tmp_path / "w.pth")
    with pytest.raises(ModelError, match="expected deadbeef"):
        _load_state_dict(tmp_path / "w.pth", sha256_prefix="deadbeef")
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match="cannot load"):
        _load_state_dict(tmp_path / "bad.pth")


@pytest.mark.parametrize("name", [*list_backbones(), "timm/mobilenetv3_small_050"])
def test_weights_file_that_does_not_fit_is_a_model_error(tmp_path: Path, name: str) -> None:
    sd = create_model(name, pretrained=False).state_dict()
    key = next(k for k, v in reversed(sd.items()) if v.ndim == 2)  # the ImageNet head's weight
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    torch.save(sd, tmp_path / "w.pth")
    with pytest.raises(ModelError, match=f"do not fit.*{key}"):
        create_model(name, num_classes=3, weights_file=str(tmp_path / "w.pth"))
    torch.save({k: v for k, v in sd.items() if k != key}, tmp_path / "missing-key.pth")
    with pytest.raises(ModelError, match="do not fit.*Missing key"):
        create_model(name, num_classes=3, weights_file=str(tmp_path / "missing-key.pth"))


@pytest.mark.parametrize("name", ["timm/mobilenetv3_small_050", "timm/levit_128s.fb_dist_in1k"])
def test_timm_spec_counts_parameters_without_weights(name: str) -> None:
    spec = get_backbone(name)
    assert spec.num_params == sum(p.numel() for p in create_model(name, pretrained=False).parameters())


def test_every_head_of_a_distilled_levit_trains_in_the_head_phase() -> None:
    """LeViT: get_classifier() is a tuple (head, head_dist) of NormLinear modules without out_features."""
    import lightning as L
    from torch.utils.data import DataLoader, TensorDataset

    from fieldid.training.models import classifier_modules, model_num_classes
    from fieldid.training.module import Classifier

    torch.manual_seed(0)
    model = create_model("timm/levit_128s.fb_dist_in1k", num_classes=3, pretrained=False)
    assert [n for n, _ in classifier_modules(model)] == ["head", "head_dist"] and model_num_classes(model) == 3
    module = Classifier(model, TrainConfig(epochs=2, head_epochs=1, batch_size=4))
    assert module.val_f1.num_classes == 3

    def snapshot() -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in model.named_parameters()}

    class PerEpoch(L.Callback):
        def __init__(self) -> None:
            self.params = [snapshot()]
            self.head_modes: list[tuple[bool, bool, bool]] = []

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.head_modes.append((model.head.training, model.head_dist.training, model.stem.training))

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.params.append(snapshot())

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(4, 3, 224, 224, generator=g), torch.tensor([0, 1, 2, 0]))
    spy = PerEpoch()
    trainer = L.Trainer(max_epochs=2, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=0,
                        accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[spy])
    trainer.fit(module, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4))

    def changed(before: dict, after: dict, prefix: tuple[str, ...]) -> set[bool]:
        return {not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)}

    start, head_phase, full = spy.params
    backbone = ("stem.", "stages.")
    assert changed(start, head_phase, ("head.",)) == {True} and changed(start, head_phase, ("head_dist.",)) == {True}
    assert changed(start, head_phase, backbone) == {False}  # frozen in the head-only epoch
    assert True in changed(head_phase, full, backbone)
    assert spy.head_modes == [(True, True, False), (True, True, True)]


def test_golden_logits_of_seeded_tiny_model() -> None:
    """Catches silent drift in architecture, head replacement or example input.

    Regenerate only on purpose: FIELDID_REGEN_GOLDEN=1 pytest tests/test_training.py -k golden
    """
    golden = Path(__file__).parent / "golden" / "mobilenet_v2_seed0.json"
    torch.manual_seed(0)
    model = create_model("mobilenet_v2", num_classes=3, pretrained=False)
    from fieldid.training.models import example_input

    with torch.no_grad():
        out = model(example_input("mobilenet_v2", 64)).tolist()
    if os.environ.get("FIELDID_REGEN_GOLDEN") == "1":
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(json.dumps(out))
        pytest.fail(f"regenerated {golden}: review the diff, then rerun without FIELDID_REGEN_GOLDEN=1")
    assert golden.is_file(), f"{golden} is missing; regenerate on purpose with FIELDID_REGEN_GOLDEN=1"
    np.testing.assert_allclose(np.array(out), np.array(json.loads(golden.read_text())), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- data
def test_split_is_stratified_and_deterministic(shapes_dir: Path) -> None:
    a = make_split(shapes_dir, val_fraction=0.2, test_fraction=0.2, seed=1)
    b = make_split(shapes_dir, val_fraction=0.2, test_fraction=0.2, seed=1)
    c = make_split(shapes_dir, val_fraction=0.2, test_fraction=0.2, seed=2)
    assert a.files == b.files
    assert a.files != c.files
    for split in ("train", "val", "test"):
        assert all(n > 0 for n in a.counts(split)), split
    all_files = [p for s in a.files.values() for p, _ in s]
    assert len(all_files) == len(set(all_files)) == 72


def test_presplit_tree_is_used_as_is(tmp_path: Path) -> None:
    make_shapes_dataset(tmp_path / "d" / "train", {"circle": 10, "square": 10})
    make_shapes_dataset(tmp_path / "d" / "test", {"circle": 3, "square": 3}, seed=9)
    s = make_split(tmp_path / "d", val_fraction=0.2, seed=0)
    assert s.presplit and s.counts("test") == [3, 3]
    assert s.counts("val") == [2, 2] and s.counts("train") == [8, 8]


def test_exif_orientation_applied_on_load(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    img.save(tmp_path / "phone.jpg", exif=exif)
    assert load_rgb(tmp_path / "phone.jpg").size == (20, 40)


def test_cache_equals_decoding_from_disk(shapes_dir: Path) -> None:
    spec = PreprocessSpec.for_crop(56, 0.875)
    paths = sorted((shapes_dir / "circle").glob("*.png"))[:4]
    cached = CachedImageDataset(ImageCache(paths, [0] * 4, resize_size=spec.resize_size,
                                           interpolation="bilinear"), eval_transform(spec))
    tf = eval_transform(spec, from_cache=False)
    for i, p in enumerate(paths):
        assert torch.equal(cached[i][0], tf(load_rgb(p)))


def test_hue_jitter_can_be_switched_off() -> None:
    from torchvision import transforms as T

    spec = PreprocessSpec.for_crop(64, 0.875)
    cfg = TrainConfig().replace(**{"augment.hue": 0.0})
    jitter = [t for t in train_transform(spec, cfg.augment).transforms if isinstance(t, T.ColorJitter)]
    assert jitter and jitter[0].hue is None
    with_hue = [t for t in train_transform(spec, TrainConfig().augment).transforms if isinstance(t, T.ColorJitter)]
    assert with_hue[0].hue is not None


def test_pixel_noise_moves_pixels_within_its_bound_and_stays_in_range() -> None:
    from fieldid.training.data import PixelNoise

    torch.manual_seed(0)
    x = torch.full((3, 32, 32), 0.5)
    moved = [PixelNoise(4.0)(x.clone()) for _ in range(20)]
    assert any(float((m - x).abs().max()) > 0 for m in moved)
    assert all(float((m - x).std()) <= 4.0 / 255 * 1.2 for m in moved)  # std drawn from [0, 4/255]
    assert float(PixelNoise(64.0)(torch.ones(3, 8, 8)).max()) <= 1.0  # clipped like a pixel
    spec = PreprocessSpec.for_crop(64, 0.875)
    noisy = TrainConfig().replace(**{"augment.noise": 3.0}).augment
    names = [type(t).__name__ for t in train_transform(spec, noisy).transforms]
    assert names.index("PixelNoise") == names.index("ToTensor") + 1  # on [0, 1] pixels, before Normalize
    assert "PixelNoise" not in [type(t).__name__ for t in
                                train_transform(spec, TrainConfig().replace(**{"augment.noise": 0.0}).augment).transforms]
    with pytest.raises(ConfigError, match="augment.noise"):
        TrainConfig().replace(**{"augment.noise": -1.0}).validate()


def test_noise_stability_counts_answers_that_pixel_noise_changes() -> None:
    from torch.utils.data import TensorDataset

    from fieldid.training.evaluate import noise_stability

    class Sign(torch.nn.Module):  # answers 1 when the mean pixel is above 0, else 0
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.mean(dim=(1, 2, 3))
            return torch.stack([-m, m], 1)

    # half the images sit exactly on the boundary (any noise decides them), half far from it
    x = torch.cat([torch.zeros(50, 3, 8, 8), torch.ones(50, 3, 8, 8)])
    data = TensorDataset(x, torch.zeros(100, dtype=torch.long))
    clean = Sign()(x)
    out = noise_stability(Sign(), data, clean, ((0.5,) * 3, (0.25,) * 3), grey_levels=2.0)
    assert out["images"] == 100 and out["grey_levels"] == 2.0
    assert 0.6 <= out["unchanged"] <= 0.9  # the far half never moves; about half of the boundary half does
    assert noise_stability(Sign(), data, clean, ((0.5,) * 3, (0.25,) * 3), grey_levels=2.0) == out  # seeded
    # A large split is checked on at most max_images photos spread over it (both halves represented).
    capped = noise_stability(Sign(), data, clean, ((0.5,) * 3, (0.25,) * 3), grey_levels=2.0, max_images=20)
    assert capped["images"] == 20 and 0.5 <= capped["unchanged"] < 1.0


def test_class_weights_favour_rare_classes() -> None:
    w = class_weights([100, 10])
    assert w[1] / w[0] == pytest.approx(10.0)
    assert float(w.mean()) == pytest.approx(1.0)


# --------------------------------------------------------------------------- config / records
def test_config_yaml_round_trip_and_validation(tmp_path: Path) -> None:
    cfg = TrainConfig(epochs=5, image_size=96).replace(**{"augment.hue": 0.0})
    cfg.to_yaml(tmp_path / "c.yaml")
    back = load_config(tmp_path / "c.yaml")
    assert back.to_dict() == cfg.to_dict()
    (tmp_path / "bad.yaml").write_text("epochs: 3\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown key.*learning_rate"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("augment: {hue_jitter: 0}\n")
    with pytest.raises(ConfigError, match="hue_jitter"):
        load_config(tmp_path / "bad2.yaml")
    with pytest.raises(ConfigError, match="epochs"):
        TrainConfig.from_dict({"epochs": 0})


def test_run_record_every_field_round_trips(tmp_path: Path) -> None:
    import dataclasses

    rec = RunRecord(name="r", backbone="mobilenet_v2", num_classes=2, labels=["a", "b"],
                    preprocess=PreprocessSpec.for_crop(64, 0.875).to_dict(), temperature=1.5,
                    fallback_threshold=0.6, fallback_rule="x", created="now", extra={"k": 1})
    rec.to_json(tmp_path / "run.json")
    back = RunRecord.from_json(tmp_path / "run.json")
    for f in dataclasses.fields(RunRecord):
        assert getattr(back, f.name) == getattr(rec, f.name), f.name
    d = json.loads((tmp_path / "run.json").read_text())
    d["schema_version"] = 99
    with pytest.raises(RecordError, match="schema_version"):
        RunRecord.from_dict(d)
    d["schema_version"] = 1
    d["labels"] = ["a", "a"]
    with pytest.raises(RecordError, match="duplicate"):
        RunRecord.from_dict(d)


# --------------------------------------------------------------------------- calibration
def test_temperature_scaling_fixes_overconfidence() -> None:
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (2000,), generator=g)
    clean = torch.randn(2000, 4, generator=g)
    clean[torch.arange(2000), y] += 1.5
    overconfident = clean * 4
    t = fit_temperature(overconfident, y)
    assert t > 2.0  # the logits were inflated 4x, so T must undo most of that
    before = expected_calibration_error(overconfident.softmax(1), y)
    after = expected_calibration_error((overconfident / t).softmax(1), y)
    assert after < before / 3


def test_fallback_threshold_meets_target_on_accepted() -> None:
    probs = torch.tensor([[0.95, 0.05], [0.9, 0.1], [0.6, 0.4], [0.55, 0.45]])
    y = torch.tensor([0, 0, 1, 0])  # the 0.6 one is wrong
    c = choose_fallback_threshold(probs, y, target_accuracy=0.9, min_threshold=0.5)
    assert 0.6 < c.threshold <= 0.9 and c.accepted_accuracy == 1.0 and c.accepted_fraction == 0.5


def test_fallback_threshold_rises_above_the_floor_on_a_perfect_but_unsure_val_set() -> None:
    """All val answers right, yet the calibrated confidences expect ~1.5% wrong (the salmon demo):
    the threshold rises until the answers the phone keeps are expected >= 99% right."""
    conf = torch.tensor([0.995] * 85 + [0.69, 0.79, 0.82, 0.90, 0.92])
    probs = torch.stack([conf, 1 - conf], dim=1)
    y = torch.zeros(len(conf), dtype=torch.long)  # every answer is right
    c = choose_fallback_threshold(probs, y, target_accuracy=0.99, min_threshold=0.5)
    assert 0.69 < c.threshold <= 0.92 and c.accepted_accuracy == 1.0
    kept = conf[conf >= c.threshold]
    assert kept.mean() >= 0.99 and conf[conf >= c.threshold - 0.01].mean() < 0.99  # the smallest such t
    # Confident and right: the floor stays.
    sure = torch.stack([torch.full((90,), 0.998), torch.full((90,), 0.002)], dim=1)
    assert choose_fallback_threshold(sure, torch.zeros(90, dtype=torch.long)).threshold == 0.5


# --------------------------------------------------------------------------- end to end
def test_train_writes_complete_run(tiny_run: Path) -> None:
    rec = RunRecord.from_json(tiny_run / "run.json")
    assert rec.status == "trained" and rec.labels == ["circle", "square", "triangle"]
    for f in ("config.yaml", "labels.json", "preprocess.json", "split.json", "model.pth", "calibration.json",
              "metrics.json", "checkpoints/best.ckpt", "checkpoints/last.ckpt", "plots/confusion_matrix.png",
              "plots/curves.png", "logs/metrics.csv"):
        assert (tiny_run / f).is_file(), f
    assert json.loads((tiny_run / "labels.json").read_text()) == rec.labels
    m = json.loads((tiny_run / "metrics.json").read_text())
    assert m["split"] == "test" and m["accuracy"] >= 0.6
    assert set(m["per_class"]) == set(rec.labels) and len(m["confusion_matrix"]) == 3
    assert m["noise_stability"]["images"] == m["num_images"] and 0 <= m["noise_stability"]["unchanged"] <= 1
    # 3 epochs, or fewer when every val photo had been right and an epoch did not beat the best (it says so).
    reason = (rec.extra.get("stopped") or {}).get("reason", "")
    assert m["training"]["epochs"] == 3 or (m["training"]["epochs"] < 3 and "every val photo" in reason), reason
    sd = torch.load(tiny_run / "model.pth", weights_only=True)
    assert any(k.startswith("classifier") for k in sd)
    # Where the run's time went, step by step, in the order they ran (fieldid bench real prints it).
    steps = rec.extra["seconds_by_step"]
    assert list(steps)[0] == "read photos" and list(steps)[-1] == "samples" and "fine-tune" in steps, steps
    assert all(v >= 0 for v in steps.values()) and steps["fine-tune"] > 0


def test_imbalance_and_corrupt_files_are_handled(tmp_path: Path) -> None:
    data = make_shapes_dataset(tmp_path / "d", {"circle": 30, "square": 8}, size=48)
    (data / "circle" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (data / "square" / "notes.txt").write_text("ignored: not an image extension")
    import lightning as L

    class ModeSpy(L.Callback):
        """Records, per training batch, whether the backbone and the head are in train mode."""

        def __init__(self) -> None:
            self.modes: dict[int, set[tuple[bool, bool]]] = {}
            self.loss_weight: torch.Tensor | None = None

        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            (head_name,) = module.head_names
            head = module.model.get_submodule(head_name)
            self.modes.setdefault(trainer.current_epoch, set()).add((module.model.features.training, head.training))
            self.loss_weight = module.loss_fn.weight.detach().cpu().clone()

    spy = ModeSpy()
    # head_feature_cache off: this checks the head-only epoch that runs inside Lightning (DDP, two heads).
    rec = train(data, tmp_path / "run", TrainConfig(epochs=2, head_epochs=1, image_size=32, batch_size=16,
                                                    val_fraction=0.2, test_fraction=0.2, head_feature_cache=False,
                                                    early_stopping_patience=5, imbalance="loss"), callbacks=[spy])
    # Head-only epoch: frozen backbone (BatchNorm statistics too), head training; after it, all of
    # the model trains - also after the validation loop in between has put it in eval mode.
    assert spy.modes == {0: {(False, True)}, 1: {(True, True)}}
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["training"]["skipped_unreadable"] == 1
    assert m["training"]["imbalance"]["mode"] == "loss" and m["training"]["imbalance"]["ratio"] > 2
    # The weights reach the loss the model trains with: the rare class counts more.
    counts = m["training"]["imbalance"]["train_counts"]
    torch.testing.assert_close(spy.loss_weight, class_weights(counts).float())
    assert spy.loss_weight[1] > 2 * spy.loss_weight[0]
    assert rec.status == "trained"


def test_imbalance_sampler_mode_balances_batches_instead_of_the_loss(tmp_path: Path) -> None:
    import lightning as L
    from torch.utils.data import WeightedRandomSampler

    data = make_shapes_dataset(tmp_path / "d", {"circle": 30, "square": 8}, size=48)

    class SamplerSpy(L.Callback):
        def on_train_start(self, trainer, module) -> None:
            self.sampler = trainer.train_dataloader.sampler
            self.targets = list(trainer.train_dataloader.dataset.cache.targets)
            self.loss_weight = module.loss_fn.weight.detach().cpu().clone()

    spy = SamplerSpy()
    train(data, tmp_path / "run", TrainConfig(epochs=1, head_epochs=0, image_size=32, batch_size=8,
                                              imbalance="sampler", val_fraction=0.2, test_fraction=0.2),
          callbacks=[spy])
    assert isinstance(spy.sampler, WeightedRandomSampler) and spy.sampler.replacement
    per_class = [float(sum(w for w, y in zip(spy.sampler.weights, spy.targets) if y == c)) for c in (0, 1)]
    assert per_class == pytest.approx([1.0, 1.0])  # each class is drawn equally often on average
    assert torch.equal(spy.loss_weight, torch.ones(2))  # and the loss is left unweighted
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["training"]["imbalance"]["mode"] == "sampler"


def test_cli_train_and_evaluate(tmp_path: Path, shapes_dir: Path) -> None:
    out = tmp_path / "cli-run"
    r = run_cli("train", "--data", shapes_dir, "--out", out, "--epochs", "2", "--image-size", "48",
                "--batch-size", "16", "--no-hue")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "image size: --image-size 48 px (explicit)" in r.stderr  # the size rule's decision is logged
    # Output to a pipe, not a terminal: the fine-tuning epochs show counted lines (rich's bar stays blank).
    assert re.search(r"epoch 2/2: batch \d+/\d+ \(\d+ s\)", r.stderr), r.stderr[-2000:]
    assert re.search(r"epoch 2/2: val_acc [\d.]+, val_bal_acc [\d.]+, val_loss [\d.]+, val_macro_f1 [\d.]+", r.stderr), r.stderr[-2000:]
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    held = json.loads((out / "metrics.json").read_text())
    # The summary reports the run's own held-out number.
    assert summary["test_accuracy"] == pytest.approx(held["accuracy"]) and held["split"] == "test"
    # The model learned the shapes, judged on 150 new photos, not the 12 of the test split: chance is 1/3,
    # a broken fine-tune, label mix-up or wrong preprocessing lands near it (P(>= 60% | chance) < 1e-15),
    # a working 2-epoch run is far above it.
    fresh = make_shapes_dataset(tmp_path / "fresh", {"circle": 50, "square": 50, "triangle": 50}, size=72, seed=5)
    r = run_cli("evaluate", "--run", out, "--data", fresh)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert line["split"] == "all" and line["accuracy"] >= 0.6, (line, "on 150 new photos")
    r = run_cli("evaluate", "--run", out, "--data", shapes_dir)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"accuracy", "macro_f1"} <= set(line) and line["split"] == "test"
    assert load_config(out / "config.yaml").augment.hue == 0.0
    # Another folder (new photos, a subset of the classes): every image in it is evaluated.
    other = make_shapes_dataset(tmp_path / "other", {"circle": 5, "triangle": 4}, size=72, seed=7)
    r = run_cli("evaluate", "--run", out, "--data", other)
    assert r.returncode == 0, r.stderr[-2000:]
    line = json.loads(r.stdout.strip().splitlines()[-1])
    # Another folder writes its own metrics file; the run's held-out metrics.json stays as it was.
    m = json.loads((out / "metrics-other.json").read_text())
    assert json.loads((out / "metrics.json").read_text())["split"] == "test"
    assert line["split"] == "all" and m["num_images"] == 9 and m["data"] == str(other.resolve())
    # Rows are the true classes in the run's label order: the folder's 5 circles and 4 triangles land in
    # their own rows (a label-mapping bug moves them), and the reported accuracy is the matrix's diagonal.
    labels = json.loads((out / "labels.json").read_text())
    cm = np.asarray(m["confusion_matrix"])
    assert cm.shape == (3, 3) and m["labels"] == labels
    assert [int(cm[labels.index(c)].sum()) for c in ("circle", "square", "triangle")] == [5, 0, 4]
    assert line["accuracy"] == pytest.approx(np.trace(cm) / 9) == pytest.approx(m["accuracy"])
    (other / "hexagon").mkdir()
    make_shapes_dataset(tmp_path / "hex", {"square": 2}, size=72)
    for f in (tmp_path / "hex" / "square").iterdir():
        f.rename(other / "hexagon" / f.name)
    r = run_cli("evaluate", "--run", out, "--data", other)
    assert r.returncode == 2 and "hexagon" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


# Cases found only after the data is read: they used to leave a half-made run (status "training").
LATE_CASES = ["missing_weights", "weights_do_not_fit", "timm_offline", "bad_accelerator", "unavailable_accelerator",
              "bad_strategy", "bad_precision", "bad_devices", "empty_out_dir"]


@pytest.mark.parametrize("case", ["missing", "empty", "empty_class", "single_class", "unknown_model",
                                  "bad_config", "unwritable", "existing_run", "bad_number", "fixed_size_model",
                                  *LATE_CASES])
def test_cli_bad_input_is_one_line_exit_2(tmp_path: Path, shapes_dir: Path, case: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The real CLI entry point, in-process (one subprocess per case would cost ~10 s of imports)."""
    from fieldid import main

    data, out, extra = shapes_dir, tmp_path / "out", []
    if case == "missing":
        data = tmp_path / "nope"
    elif case == "empty":
        data = tmp_path / "empty"
        data.mkdir()
    elif case == "empty_class":
        data = tmp_path / "d"
        shutil.copytree(shapes_dir, data)
        (data / "hexagon").mkdir()
    elif case == "single_class":
        data = tmp_path / "d"
        shutil.copytree(shapes_dir / "circle", data / "circle")
    elif case == "unknown_model":
        extra = ["--model", "resnet9000"]
    elif case == "bad_config":
        (tmp_path / "c.yaml").write_text("epochs: 2\nbogus_key: 1\n")
        extra = ["--config", tmp_path / "c.yaml"]
    elif case == "unwritable":
        if os.geteuid() == 0:
            out = Path("/proc/fieldid-run")  # even root cannot create directories in /proc
        else:
            (tmp_path / "ro").mkdir(mode=0o500)
            out = tmp_path / "ro" / "run"
    elif case == "existing_run":
        out.mkdir()
        (out / "run.json").write_text('{"keep": "me"}')
    elif case == "bad_number":
        extra = ["--epochs", "0"]
    elif case == "fixed_size_model":  # LeViT's attention biases are built for 224 px only
        extra = ["--model", "timm/levit_128s.fb_dist_in1k", "--no-pretrained", "--image-size", "160"]
    elif case == "missing_weights":
        extra = ["--weights", tmp_path / "nope.pth"]
    elif case == "weights_do_not_fit":
        torch.save(create_model("mobilenet_v2", num_classes=10, pretrained=False).state_dict(), tmp_path / "w.pth")
        extra = ["--weights", tmp_path / "w.pth"]
    elif case == "timm_offline":
        extra = ["--model", "timm/mobilenetv3_small_050"]  # no hub (HF_HUB_OFFLINE), no --weights
    elif case == "bad_accelerator":
        extra = ["--accelerator", "bogus"]
    elif case == "unavailable_accelerator":
        extra = ["--accelerator", "mps"]  # Lightning: MisconfigurationException on Linux
    elif case == "bad_strategy":
        extra = ["--strategy", "bogus"]
    elif case == "bad_precision":
        extra = ["--train-precision", "bogus"]
    elif case == "bad_devices":
        extra = ["--accelerator", "cpu", "--devices", "abc"]
    elif case == "empty_out_dir":
        out.mkdir()  # made by the user before the run: kept, and still empty
        extra = ["--accelerator", "bogus"]
    if case in LATE_CASES:
        extra += ["--image-size", "32"]
    code = main(["train", "--data", str(data), "--out", str(out), *map(str, extra)])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    if case == "existing_run":
        assert (out / "run.json").read_text() == '{"keep": "me"}'  # nothing previously written destroyed
    if case not in ("existing_run",):
        assert not (out / "run.json").exists()
    if case in LATE_CASES:  # nothing written, so the same command with the mistake fixed starts afresh
        assert (list(out.iterdir()) == []) if case == "empty_out_dir" else not out.exists()
        assert "internal error" not in err


def test_run_failing_before_its_first_step_is_removed(tmp_path: Path, shapes_dir: Path) -> None:
    """A failure inside fit but before any optimizer step leaves no half-made run; later ones keep it."""
    import lightning as L

    class Boom(Exception):
        pass

    class FailAt(L.Callback):
        def __init__(self, hook: str) -> None:
            setattr(self, hook, self.fail)

        def fail(self, *args) -> None:
            raise Boom

    cfg = TrainConfig(epochs=2, head_epochs=1, image_size=32, batch_size=16)
    with pytest.raises(Boom):
        train(shapes_dir, tmp_path / "new", cfg, callbacks=[FailAt("on_train_start")])
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(Boom):
        train(shapes_dir, tmp_path / "mine", cfg, callbacks=[FailAt("on_train_start")])
    assert (tmp_path / "mine").is_dir() and list((tmp_path / "mine").iterdir()) == []
    # After a step the run is kept as it is (what a crash or kill leaves): --resume continues it.
    with pytest.raises(Boom):
        train(shapes_dir, tmp_path / "started", cfg, callbacks=[FailAt("on_train_batch_end")])
    assert RunRecord.from_json(tmp_path / "started" / "run.json").status == "training"


def _subcommand_paths(parser, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import argparse

    paths = [prefix]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                paths += _subcommand_paths(sub, (*prefix, name))
    return paths


def test_every_usage_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    from fieldid import build_parser, main

    paths = _subcommand_paths(build_parser())
    assert ("train",) in paths and ("data", "check") in paths
    cases = [[*path, "--no-such-flag"] for path in paths] + [["train", "--epochs", "abc"], ["no-such-command"]]
    for argv in cases:
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2, argv
        assert len(err.strip().splitlines()) == 1 and err.startswith("fieldid: error: "), (argv, err)
    main_err = run_cli("train", "--epochs", "abc")
    assert main_err.returncode == 2
    assert main_err.stderr.strip().splitlines() == [
        "fieldid: error: argument --epochs: invalid int value: 'abc' (see `fieldid train --help`)"]


def test_cli_help_lists_every_command() -> None:
    r = run_cli("--help")
    assert r.returncode == 0
    for cmd in ("train", "evaluate", "data"):
        assert cmd in r.stdout
    r = run_cli("train", "--help")
    assert r.returncode == 0 and "--resume" in r.stdout and "--no-hue" in r.stdout


@pytest.mark.parametrize("path", sorted((ROOT / "training" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    get_backbone(cfg.model)
    if path.stem == "salmon":
        assert cfg.augment.hue == 0.0  # colour is the signal


def test_cli_data_check_and_demo(tmp_path: Path, shapes_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fieldid import main

    data = tmp_path / "d"
    shutil.copytree(shapes_dir, data)
    shutil.copy(data / "circle" / "circle_000.png", data / "square" / "copy.png")  # planted duplicate
    assert main(["data", "check", str(data), "--json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert any("square/copy.png" in g for group in report["exact_duplicates"] for g in group)
    assert main(["data", "demo", "salmon", str(tmp_path / "salmon"), "--scale", "0.02"]) == 0
    assert len(list((tmp_path / "salmon").rglob("*.jpg"))) == 12  # 6 wild + 6 farmed
    assert main(["data", "check", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")


def test_atomic_write_gives_the_mode_of_a_plain_open(tmp_path: Path) -> None:
    from fieldid.training.records import atomic_write_text

    (tmp_path / "plain.txt").write_text("x")
    atomic_write_text(tmp_path / "atomic.txt", "x")
    atomic_write_text(tmp_path / "atomic.txt", "y")  # replacing keeps it too
    assert (tmp_path / "atomic.txt").read_text() == "y"
    assert (tmp_path / "atomic.txt").stat().st_mode & 0o777 == (tmp_path / "plain.txt").stat().st_mode & 0o777
    assert not list(tmp_path.glob(".*.tmp"))


def test_speed_choices_time_a_training_step_and_an_inference_pass_per_layout() -> None:
    """`fieldid bench train choices` (the evidence for training's channels-last layout) times both a step
    and an inference pass under each setting, and a channels-last model gives the contiguous one's answers."""
    from fieldid.training.bench import bench_choices
    from fieldid.training.models import create_model, fast_layout

    rows = bench_choices(image_size=64, batch_size=4, steps=1)
    assert [r["setting"] for r in rows[:-1]] == ["fp32", "fp32 channels-last", "bf16 autocast",
                                                 "bf16 autocast channels-last"]
    assert all(r["s_per_step"] > 0 and r["s_per_inference"] > 0 for r in rows[:-1])
    assert rows[0]["vs_fp32"] == rows[0]["inference_vs_fp32"] == 1.0
    torch.manual_seed(0)
    plain = create_model("mobilenet_v2", 3, pretrained=False).eval()
    fast = fast_layout(create_model("mobilenet_v2", 3, pretrained=False).eval())
    fast.load_state_dict(plain.state_dict())
    assert fast.features[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-5)
