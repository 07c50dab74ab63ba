"""``fieldid train``: dataset -> run directory (the contract every other part reads).

Run directory layout (paths relative to RUN/):

    run.json              RunRecord: backbone, labels, preprocessing, temperature, fallback threshold
    config.yaml           resolved TrainConfig
    labels.json           class names in class-index order
    preprocess.json       PreprocessSpec (eval preprocessing)
    split.json            which file is in train / val / test
    model.pth             fp32 state dict of the best checkpoint (torch.load(weights_only=True))
    checkpoints/          best.ckpt, last.ckpt (Lightning; --resume continues from last.ckpt)
    calibration.json      temperature, ECE before/after, fallback threshold and its rule
    metrics.json          held-out metrics (test split, else val)
    plots/                confusion_matrix.png, curves.png
    logs/                 CSV (and TensorBoard when installed) logs
"""
from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import io
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fieldid.cli_common import first_line

from .calibrate import choose_fallback_threshold, fit_temperature
from .config import ConfigError, TrainConfig, load_config
from .data import (CachedImageDataset, ImageCache, Split, eval_transform, imbalance_ratio,
                   load_split, make_split, train_transform)
from .samples import write_samples
from .evaluate import compute_metrics, plot_confusion, plot_curves, predict_logits
from .images import DataError
from .probe import majority_scores
from .baselines import (adapt_batchnorm, backbone_features, batchnorm_state, choose_shipped, fit_run_baselines, imbalance_plan, load_probe_head,
                        set_head, val_scores)
from .models import classifier_modules, create_model, get_backbone, load_run_model  # load_run_model: re-exported too
from .records import (PreprocessSpec, RecordError, RunRecord, atomic_write_bytes, atomic_write_json,
                      load_record)

__all__ = ["train", "evaluate", "RunError", "CheckpointError", "build_datasets", "load_run_model", "RESUME_SAFE",
           "matched_image_size", "choose_image_size", "train_head_on_features", "cpu_supports_bf16"]

log = logging.getLogger("fieldid.train")


class RunError(ValueError):
    """The output/run directory cannot be used as asked (exists, unwritable, incomplete)."""


class CheckpointError(RunError):
    """A checkpoint that is missing, truncated or not a fieldid checkpoint."""


# --------------------------------------------------------------------------- checkpoint IO
def _atomic_checkpoint_io():
    from lightning.pytorch.plugins.io import TorchCheckpointIO

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Temp file + rename, so ``kill -9`` mid-save never leaves a half-written checkpoint."""

        def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
            buf = io.BytesIO()
            torch.save(checkpoint, buf)
            atomic_write_bytes(path, buf.getvalue())

        def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
            return load_checkpoint(path)

    return AtomicCheckpointIO()


def _checkpoint_safe_globals() -> list[Any]:
    """Classes allowed in a checkpoint besides tensors and plain containers (``weights_only=True``).

    fieldid's own checkpoints (state dict, optimizer/scheduler state, the callbacks' and loops'
    state) load with none; Lightning's hyper-parameter container is the one class a Lightning
    checkpoint of a module that saves hyper-parameters adds.
    """
    from lightning.fabric.utilities.data import AttributeDict

    return [AttributeDict]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint without running code from it (``torch.load(weights_only=True)``).

    A corrupt or foreign file, and one carrying a pickled callable or any class outside the
    allow-list (:func:`_checkpoint_safe_globals`), is a one-line :class:`CheckpointError`.
    """
    import pickle
    import re

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Runs live on shared disks: a planted checkpoint must not be able to run code on load.
        with torch.serialization.safe_globals(_checkpoint_safe_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # A class or callable outside the allow-list is named as "GLOBAL module.name"; any other
        # unpickling failure (random bytes, a cut file) is damage, not a planted object.
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise CheckpointError(f"{path}: refused: the checkpoint holds {found.group(1)}, which is not a tensor or "
                                  "an allowed type (checkpoints are loaded with weights_only=True)") from None
        raise CheckpointError(f"{path}: corrupt or half-written checkpoint (UnpicklingError)") from None
    except Exception as e:
        raise CheckpointError(f"{path}: corrupt or half-written checkpoint ({type(e).__name__})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a fieldid/Lightning checkpoint")
    return ckpt


# --------------------------------------------------------------------------- data
def build_datasets(split: Split, cfg: TrainConfig, spec: PreprocessSpec):
    """Caches and datasets for train/val/test."""
    caches = {
        name: ImageCache(split.paths(name), split.targets(name), resize_size=spec.resize_size,
                         interpolation=spec.interpolation, enabled=cfg.cache, desc=name)
        for name in ("train", "val", "test")
    }
    skipped = sum(len(c.skipped) for c in caches.values())
    if skipped:
        log.warning("skipped %d unreadable file(s)", skipped)
    if len(caches["train"]) == 0:
        raise DataError(f"{split.root}: no readable training images")
    train_tf = train_transform(spec, cfg.augment)
    eval_tf = eval_transform(spec, from_cache=True)
    datasets = {
        "train": CachedImageDataset(caches["train"], train_tf),
        "val": CachedImageDataset(caches["val"], eval_tf),
        "test": CachedImageDataset(caches["test"], eval_tf),
    }
    return datasets, skipped


def _sample_weights(counts: list[int], targets: list[int]) -> torch.Tensor:
    """Per-image sampling weights that draw every class equally often (``imbalance: sampler``)."""
    per_class = [1.0 / max(1, c) for c in counts]
    return torch.tensor([per_class[y] for y in targets], dtype=torch.double)


def _loaders(datasets: dict, cfg: TrainConfig, counts: list[int], use_sampler: bool):
    from torch.utils.data import DataLoader, WeightedRandomSampler

    g = torch.Generator().manual_seed(cfg.seed)
    workers = _resolve_num_workers(cfg)
    keep = workers > 0  # forked once: workers share the decode cache copy-on-write
    train_targets = datasets["train"].cache.targets
    if use_sampler:
        weights = _sample_weights(counts, train_targets)
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=g)
        train = DataLoader(datasets["train"], batch_size=cfg.batch_size, sampler=sampler,
                           num_workers=workers, drop_last=len(weights) > cfg.batch_size, persistent_workers=keep)
    else:
        train = DataLoader(datasets["train"], batch_size=cfg.batch_size, shuffle=True, generator=g,
                           num_workers=workers, drop_last=len(train_targets) > cfg.batch_size,
                           persistent_workers=keep)
    val_ds = datasets["val"] if len(datasets["val"]) else datasets["train"]
    val = DataLoader(val_ds, batch_size=max(cfg.batch_size, 64), num_workers=workers, persistent_workers=keep)
    return train, val


# --------------------------------------------------------------------------- image size
MIN_MATCHED_SIZE = 96  # below this MobileNet-style nets end with a 2x2 map and lose accuracy
_SIZE_SAMPLE = 256  # photos whose header is read to decide the size (headers only: milliseconds)


def matched_image_size(short_sides: list[int], native: int, crop_pct: float) -> tuple[int, str]:
    """The crop size for photos with these shorter sides, and the rule's one-line reason.

    Rule: take the median shorter side ``m`` of the training photos. When ``m * crop_pct``
    (the crop the eval resize would cut from a photo of that size) is clearly below the
    backbone's native size, train at that crop rounded to a multiple of 32 (at least
    ``MIN_MATCHED_SIZE``), so no compute goes into upscaled pixels; otherwise at the native size.

    Example:
        >>> matched_image_size([100] * 10, 224, 0.875)
        (96, 'photos are small (median shorter side 100 px): training at 96 px instead of the native 224 px')
        >>> matched_image_size([640, 480], 224, 0.875)[0]
        224
    """
    if not short_sides:
        return native, f"no photo size readable: native {native} px"
    m = sorted(short_sides)[len(short_sides) // 2]
    size = max(MIN_MATCHED_SIZE, int(round(m * crop_pct / 32)) * 32)
    if size >= native:
        return native, f"photos (median shorter side {m} px) are not smaller than the native size: {native} px"
    return size, (f"photos are small (median shorter side {m} px): training at {size} px instead of the "
                  f"native {native} px")


def _short_sides(paths: list[Path], limit: int = _SIZE_SAMPLE) -> list[int]:
    """Shorter sides of up to ``limit`` photos (evenly spread), read from the file headers only."""
    from PIL import Image

    step = max(1, len(paths) // limit)
    sides = []
    for p in paths[::step][:limit]:
        try:
            with Image.open(p) as im:
                sides.append(min(im.size))
        except Exception:  # unreadable files are reported (and skipped) by the decode cache
            continue
    return sides


def choose_image_size(split: Split, cfg: TrainConfig) -> tuple[int | None, str]:
    """``cfg.image_size`` when set (an explicit size always wins), else the size matched to the photos."""
    backbone = get_backbone(cfg.model)
    if cfg.image_size is not None:
        return cfg.image_size, f"--image-size {cfg.image_size} px (explicit)"
    if backbone.fixed_input_size:
        return None, f"{cfg.model} takes only its native {backbone.input_size} px"
    return matched_image_size(_short_sides(split.paths("train")), backbone.input_size, backbone.crop_pct)


# --------------------------------------------------------------------------- head on cached features
def _head_module(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
    """The single head module, or ``None`` when there are several (a distilled LeViT averages two)."""
    from .models import classifier_modules

    heads = classifier_modules(model)
    return heads[0] if len(heads) == 1 else None


@torch.no_grad()
def _head_inputs(model: torch.nn.Module, head: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the frozen backbone hands the head for ``images`` (captured at the head's input)."""
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        model(images)
    finally:
        hook.remove()
    return seen[0]


def train_head_on_features(model: torch.nn.Module, dataset: Any, cfg: TrainConfig, *,
                           class_weights: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None,
                           cache_features: bool = True, device: str | torch.device = "cpu") -> list[float]:
    """The head-only phase: ``cfg.head_epochs`` epochs of the head with the backbone frozen.

    With ``cache_features`` each image goes through the backbone once and the head's epochs
    run on the stored features (the backbone is frozen, in eval mode, and ``dataset`` is
    un-augmented, so its output is the same every epoch). Without it every batch goes
    through the backbone again: the reference the cached path must match. Same batches,
    same optimizer (AdamW, warmup + cosine to 0 at ``cfg.head_lr``), same loss.

    Returns:
        the mean training loss of each head epoch.
    """
    from torch.utils.data import DataLoader

    from .module import phase_lr

    found = _head_module(model)
    if found is None:
        raise ValueError("train_head_on_features needs a model with a single head module")
    name, head = found
    model.eval().to(device)
    n = len(dataset)
    images: torch.Tensor | None = None
    parts, labels, done, next_report = [], [], 0, n // 10
    for x, y in DataLoader(dataset, batch_size=max(cfg.batch_size, 64), shuffle=False,
                           num_workers=_resolve_num_workers(cfg) if cache_features else 0):
        parts.append(_head_inputs(model, head, x.to(device)) if cache_features else x)
        labels.append(torch.as_tensor(y))
        done += len(x)
        if cache_features and n >= 200 and done >= next_report:
            log.info("head phase: backbone features %d/%d images", done, n)
            next_report += n // 10
    targets = torch.cat(labels).long()
    if cache_features:
        features = torch.cat(parts)
        log.info("head phase: %d backbone features (%s) cached; the head trains on them", n,
                 "x".join(map(str, features.shape[1:])))
    else:
        images = torch.cat(parts)
    head.train()
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(head.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1.0, weight_decay=cfg.weight_decay)
    loss_fn = torch.nn.CrossEntropyLoss(weight=None if class_weights is None else class_weights.to(device),
                                        label_smoothing=cfg.label_smoothing)
    per_epoch = max(1, n // cfg.batch_size if n > cfg.batch_size else 1)
    total = per_epoch * cfg.head_epochs
    g = torch.Generator().manual_seed(cfg.seed)
    losses, step = [], 0
    for epoch in range(cfg.head_epochs):
        order = (torch.multinomial(sample_weights, n, replacement=True, generator=g) if sample_weights is not None
                 else torch.randperm(n, generator=g))
        epoch_loss = 0.0
        for b in range(per_epoch):
            idx = order[b * cfg.batch_size:(b + 1) * cfg.batch_size]
            if images is None:
                f = features[idx]
            else:
                head.eval()  # dropout off while the backbone runs, as in the cached pass
                f = _head_inputs(model, head, images[idx].to(device))
                head.train()
            for group in opt.param_groups:
                group["lr"] = phase_lr(step, 0, total, cfg.head_lr, cfg.warmup_frac)
            loss = loss_fn(head(f), targets[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            epoch_loss += float(loss.detach()) * len(idx)
            step += 1
        losses.append(epoch_loss / max(1, min(n, per_epoch * cfg.batch_size)))
        log.info("head phase: epoch %d/%d train loss %.4f", epoch + 1, cfg.head_epochs, losses[-1])
    for p in model.parameters():
        p.requires_grad_(True)
    model.train()
    return losses


def _uses_feature_head(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    """Head phase on cached features: one process (DDP ranks would each redo it), one head, and
    at least one epoch left for Lightning's full fine-tuning."""
    return (cfg.head_feature_cache and cfg.head_epochs > 0 and cfg.epochs > cfg.head_epochs
            and str(cfg.devices) == "1" and cfg.num_nodes == 1 and _head_module(model) is not None)


# --------------------------------------------------------------------------- speed settings
def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_supports_bf16() -> bool:
    """Native bf16 arithmetic on this CPU (AVX-512 BF16 or AMX), as oneDNN needs for fast bf16."""
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def _resolve_num_workers(cfg: TrainConfig) -> int:
    """``--num-workers``, else from the core count: half the cores on CPU (the model's threads need
    the rest), up to 8 when a GPU trains (decoding must keep it fed)."""
    if cfg.num_workers is not None:
        return cfg.num_workers
    from .data import default_num_threads

    cores = default_num_threads()
    on_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    return min(8, cores - 1) if on_gpu else min(4, cores // 2)


# --------------------------------------------------------------------------- run directory
def _check_out_dir(out: Path) -> None:
    if out.exists():
        if (out / "run.json").exists():
            raise RunError(f"{out}: a run already exists there; use --resume {out} or choose another --out")
        if not out.is_dir() or any(out.iterdir()):
            raise RunError(f"{out}: exists and is not empty; choose another --out")
    parent = out if out.exists() else out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise RunError(f"{out}: output location is not writable")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _resolve_precision(cfg: TrainConfig) -> str:
    if cfg.precision:
        return cfg.precision
    on_gpu = torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda")
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_bf16_supported() else "16-mixed"
    # bf16 autocast on CPU was measured slower than fp32 for MobileNet-style training, even
    # with AMX (make bench-train, "precision" rows), so fp32 stays the CPU default.
    return "32-true"


def _devices(cfg: TrainConfig) -> Any:
    d = str(cfg.devices)
    return int(d) if d.isdigit() else d


def _strategy(cfg: TrainConfig) -> str:
    """Lightning strategy name, with DDP told that the head-only epochs leave parameters unused.

    DDP registers every parameter when it wraps the model; freezing the backbone afterwards
    (head-only epochs) makes it fail at the next step unless it looks for unused parameters.
    """
    from lightning.fabric.utilities.imports import _IS_INTERACTIVE

    name = cfg.strategy
    devices = _devices(cfg)
    if isinstance(devices, str):
        devices = len(devices.strip(",").split(",")) if "," in devices else (
            torch.cuda.device_count() if devices in ("-1", "auto") and cfg.accelerator != "cpu" else 1)
    if name == "auto" and (devices > 1 or cfg.num_nodes > 1):
        name = "ddp_notebook" if _IS_INTERACTIVE else "ddp"  # what Lightning's "auto" would pick
    if cfg.head_epochs > 0 and name in ("ddp", "ddp_spawn", "ddp_fork", "ddp_notebook"):
        return f"{name}_find_unused_parameters_true"
    return name


def _read_log_rows(path: Path, upto_epoch: int) -> list[dict[str, str]]:
    """CSV-log rows of epochs ``<= upto_epoch`` (Lightning's CSVLogger empties the file on resume)."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        return [r for r in csv.DictReader(fh) if (r.get("epoch") or "").isdigit() and int(r["epoch"]) <= upto_epoch]


def _prepend_log_rows(path: Path, rows: list[dict[str, str]]) -> None:
    """Put the epochs logged before a resume back in front of the resumed run's CSV log."""
    new: list[dict[str, str]] = []
    if path.is_file():
        with path.open(newline="") as fh:
            new = list(csv.DictReader(fh))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows + new for k in r)), restval="")
    writer.writeheader()
    writer.writerows(rows + new)
    atomic_write_bytes(path, buf.getvalue().encode("utf-8"))


def _launch_rank() -> int:
    """Global rank given by a launcher (Lightning's DDP re-exec, torchrun, SLURM); 0 when alone.

    Known before the Trainer exists, so only the first process creates the run directory.
    """
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        value = os.environ.get(var, "0")
        if value.isdigit() and int(value) != 0:
            return int(value)
    return 0


def _write_state_dict(model: torch.nn.Module, path: Path) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _make_trainer(**kwargs: Any) -> Any:
    """``lightning.Trainer(**kwargs)``, with accelerator/device/strategy/precision mistakes as a ConfigError."""
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        return L.Trainer(**kwargs)
    except (MisconfigurationException, ValueError, TypeError, ImportError) as e:
        # Lightning's own checks of --accelerator/--devices/--strategy/--precision/--num-nodes;
        # a missing optional package (deepspeed, transformer_engine) arrives as an ImportError.
        msg = first_line(e)
        flags = " ".join(f"--{k.replace('_', '-')} {kwargs.get(k)}"
                         for k in ("accelerator", "devices", "strategy", "precision", "num_nodes"))
        raise ConfigError(f"Lightning rejects {flags}: {msg}") from None


class _NewRun:
    """The run directory one ``train`` call creates, and how to take it back when the run fails."""

    def __init__(self, out: Path, *, existed: bool) -> None:
        self.out = out
        self.existed = existed  # an empty directory the user made: keep it, remove only what we wrote

    def remove(self) -> None:
        if not self.out.is_dir():
            return
        if not self.existed:
            shutil.rmtree(self.out, ignore_errors=True)
            return
        for child in self.out.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child, ignore_errors=True)
            else:
                child.unlink(missing_ok=True)


def _write_new_run(out: Path, cfg: TrainConfig, split: Split, spec: PreprocessSpec, record: RunRecord) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / ".write-test").touch()
        (out / ".write-test").unlink()
    except OSError as e:
        raise RunError(f"{out}: output location is not writable ({e.strerror})") from None
    cfg.to_yaml(out / "config.yaml")
    split.to_json(out / "split.json")
    atomic_write_json(out / "labels.json", split.labels)
    spec.to_json(out / "preprocess.json")
    record.to_json(out / "run.json")


# Settings a resumed run may change: they alter how long or on what it trains, never what the
# finished run means (data, split, model, image size, schedule shape and seed stay the run's own).
RESUME_SAFE = ("epochs", "num_workers", "cache", "accelerator", "precision")


def _flag_name(key: str) -> str:
    """The ``fieldid train`` flag that sets config ``key``."""
    return {"pretrained": "--no-pretrained", "augment.hue": "--no-hue", "cache": "--no-cache"}.get(
        key, "--" + key.replace("_", "-"))


def _apply_resume_overrides(out: Path, cfg: TrainConfig, overrides: dict[str, Any]) -> TrainConfig:
    """``cfg`` with the safe ``overrides`` applied (in memory; :func:`train` saves it once every check
    passed); any other key is refused."""
    given = {k: v for k, v in overrides.items() if v is not None}
    refused = sorted(k for k in given if k not in RESUME_SAFE)
    if refused:
        flags = ", ".join(_flag_name(k) for k in refused)
        safe = ", ".join(_flag_name(k) for k in RESUME_SAFE)
        raise RunError(f"--resume continues {out} with its own settings; {flags} cannot change on resume "
                       f"(can: {safe}; for other settings start a new run with --out)")
    if not given:
        return cfg
    log.info("resume: applying %s", ", ".join(f"{k}={v}" for k, v in given.items()))
    return cfg.replace(**given)


def _require_validation(split: Split, cfg: TrainConfig) -> None:
    """Refuse ``val_fraction: 0`` without a pre-split ``val/``: early stopping, the temperature and the
    fallback threshold would then be fitted on (augmented) training images."""
    if cfg.val_fraction == 0 and not split.files.get("val"):
        raise ConfigError("val_fraction 0 leaves no validation images: early stopping, temperature scaling and the "
                          "fallback threshold would be fitted on training data; set val_fraction > 0 "
                          "or give the dataset a val/ folder")


def _probe_val(feats: torch.Tensor, ys: torch.Tensor, val_feats: torch.Tensor, val_ys: torch.Tensor, num_classes: int,
               cfg: TrainConfig) -> float:
    """The linear probe's val score on ``cfg.objective`` (the number the run's choices compare)."""
    from .probe import fit_probe

    val = fit_probe(feats, ys, val_feats, val_ys, num_classes, objective=cfg.objective).val
    return round(float(val["balanced_accuracy"] if cfg.objective == "balanced" else val["accuracy"]), 4)


def _run_feature_head(model: torch.nn.Module, datasets: dict, cfg: TrainConfig, spec: PreprocessSpec,
                      weights: torch.Tensor | None, counts: list[int], mode: str, out: Path) -> None:
    """The head phase of :func:`train` on cached features of the un-augmented training photos.

    The features also give the run its baselines (majority answer and linear probe, scored on val);
    with ``head_init: probe`` (the default) the probe is the head the fine-tuning starts from.
    """
    device = "cuda" if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda") else "cpu"
    plain = CachedImageDataset(datasets["train"].cache, eval_transform(spec, from_cache=True))
    name, head = _head_module(model)  # type: ignore[misc]  # _uses_feature_head checked there is one
    t = time.time()
    workers = _resolve_num_workers(cfg)
    pretrained_bn = batchnorm_state(model)
    choice: dict[str, Any] = {"setting": cfg.batchnorm, "used": "pretrained"}
    if cfg.batchnorm == "auto":
        # The run's own evidence first: the probe under the pretrained statistics ... (in a forked RNG:
        # each DataLoader pass draws a seed, and a run that then keeps the re-estimated statistics must
        # be the very run `adapt` gives)
        with torch.random.fork_rng(devices=[]):
            feats, ys = backbone_features(model, head, plain, batch_size=max(cfg.batch_size, 64), num_workers=workers,
                                          device=device, label="head phase (pretrained BatchNorm statistics)")
            val_feats, val_ys = backbone_features(model, head, datasets["val"], batch_size=max(cfg.batch_size, 64),
                                                  num_workers=workers, device=device)
        choice["pretrained_probe_val"] = _probe_val(feats, ys, val_feats, val_ys, len(counts), cfg)
    if cfg.batchnorm in ("adapt", "auto"):
        adapted = adapt_batchnorm(model, plain, batch_size=max(cfg.batch_size, 64), num_workers=workers,
                                  device=device)
        if adapted:
            choice["used"] = "re-estimated"
            log.info("head phase: BatchNorm statistics re-estimated on %d training photos (%.1f s)", adapted,
                     time.time() - t)
    if choice["used"] == "re-estimated" or cfg.batchnorm != "auto":
        feats, ys = backbone_features(model, head, plain, batch_size=max(cfg.batch_size, 64), num_workers=workers,
                                      device=device, label="head phase")
        val_feats, val_ys = backbone_features(model, head, datasets["val"], batch_size=max(cfg.batch_size, 64),
                                              num_workers=workers, device=device)
    if cfg.batchnorm == "auto" and choice["used"] == "re-estimated":
        # ... against the probe under the re-estimated ones (better on the benchmark's real photos, see
        # docs/measured/bench-real.md). The pretrained statistics stay only when their probe scores
        # strictly higher on val: on 48 flat-colour synthetic shapes the re-estimated ones cost 8 % of
        # the answers on new photos, the int8 files' agreement and the unknown score's separation.
        choice["re-estimated_probe_val"] = _probe_val(feats, ys, val_feats, val_ys, len(counts), cfg)
        if choice["pretrained_probe_val"] > choice["re-estimated_probe_val"]:
            model.load_state_dict(pretrained_bn, strict=False)
            choice["used"] = "pretrained"
            feats, ys = backbone_features(model, head, plain, batch_size=max(cfg.batch_size, 64),
                                          num_workers=workers, device=device)
            val_feats, val_ys = backbone_features(model, head, datasets["val"], batch_size=max(cfg.batch_size, 64),
                                                  num_workers=workers, device=device)
        log.info("head phase: BatchNorm statistics %s (linear probe val %s %.4f with the pretrained ones, "
                 "%.4f re-estimated)", choice["used"], cfg.objective, choice["pretrained_probe_val"],
                 choice["re-estimated_probe_val"])
    probe = fit_run_baselines(feats, ys, val_feats, val_ys, len(counts), cfg, out, batchnorm_state(model),
                              batchnorm_choice=choice)
    if cfg.head_init == "probe" and isinstance(head, torch.nn.Linear):
        set_head(head, probe.weight, probe.bias)
        log.info("head phase: the linear probe is the starting head (%.1f s)", time.time() - t)
    else:
        sample_weights = _sample_weights(counts, datasets["train"].cache.targets) if mode == "sampler" else None
        train_head_on_features(model, plain, cfg, class_weights=weights, sample_weights=sample_weights, device=device)
        log.info("head phase: %d epoch(s) on cached features in %.1f s", cfg.head_epochs, time.time() - t)
    model.train()


# --------------------------------------------------------------------------- train
def train(data_dir: str | Path | None, out_dir: str | Path | None, cfg: TrainConfig | None = None, *,
          resume: str | Path | None = None, resume_overrides: dict[str, Any] | None = None,
          callbacks: list[Any] | None = None) -> RunRecord:
    """Fine-tune a backbone on an ImageFolder dataset and write a complete run directory.

    Args:
        data_dir: ImageFolder root (flat class folders, or train/[val/][test/]).
        out_dir: new run directory (must not exist or be empty).
        cfg: training configuration (defaults: :class:`TrainConfig`).
        resume: an interrupted run directory to continue from its last checkpoint; then
            ``data_dir``/``out_dir``/``cfg`` come from that run.
        resume_overrides: settings to change when resuming; only :data:`RESUME_SAFE` keys
            (``epochs``, ``num_workers``, ``cache``, ``accelerator``, ``precision``) are accepted,
            any other is a :class:`RunError`. They are written into the run's ``config.yaml``.
        callbacks: extra Lightning callbacks (``fieldid tune`` adds its pruning callback).

    Returns:
        The run's :class:`RunRecord` (also in ``RUN/run.json``).

    Example:
        >>> rec = train("data/salmon", "runs/salmon", TrainConfig(epochs=3, image_size=128))  # doctest: +SKIP
        >>> rec.labels
        ['farmed', 'wild']
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .module import Classifier, LogProgress

    t0 = time.time()
    history: list[dict[str, str]] = []  # log rows of the epochs a resumed checkpoint already holds
    new_run: _NewRun | None = None  # set when this call creates the run directory
    if resume is not None:
        out = Path(resume)
        if not (out / "run.json").is_file() or not (out / "config.yaml").is_file():
            raise RunError(f"{out}: not a fieldid run directory (run.json/config.yaml missing)")
        cfg = load_config(out / "config.yaml")
        split = load_split(out / "split.json")
        record = RunRecord.from_json(out / "run.json")
        ckpt_path: str | None = str(out / record.last_checkpoint)
        done = -1
        if record.status == "trained":
            raise RunError(f"{out}: run already finished; nothing to resume")
        cfg = _apply_resume_overrides(out, cfg, resume_overrides or {})
        if not Path(ckpt_path).is_file():
            ckpt_path = None  # killed before the first epoch ended: start over inside the same run
            log.warning("no last checkpoint in %s; restarting training from epoch 0", out)
        else:
            try:  # fail early and clearly on a corrupt file
                done = int(load_checkpoint(ckpt_path)["epoch"])
            except CheckpointError as e:
                raise CheckpointError(f"{e}; delete it and rerun --resume to restart this run from epoch 0") from None
            history = _read_log_rows(out / "logs" / "metrics.csv", upto_epoch=done)
    else:
        if data_dir is None or out_dir is None:
            raise RunError("need --data DIR and --out RUN (or --resume RUN)")
        cfg = cfg or TrainConfig()
        cfg.validate()
        out = Path(out_dir)
        writer = _launch_rank() == 0  # DDP: the other ranks (re-executed by the launcher) only read
        if writer:
            _check_out_dir(out)
            new_run = _NewRun(out, existed=out.exists())
        backbone = get_backbone(cfg.model)  # unknown model: fail before touching disk
        split = make_split(data_dir, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                           seed=cfg.seed)
        _require_validation(split, cfg)
        size, size_reason = choose_image_size(split, cfg)
        log.info("image size: %s", size_reason)
        spec = backbone.preprocess(size)
        record = RunRecord(name=out.name, backbone=cfg.model, num_classes=len(split.labels),
                           labels=split.labels, preprocess=spec.to_dict(), status="training", created=_now(),
                           extra={"image_size": spec.crop_size, "image_size_rule": size_reason})
        ckpt_path = None
        done = -1

    # Everything that can reject the input (data, weights, accelerator settings) runs before the
    # run directory is written, so bad input never leaves a half-made run behind.
    spec = record.preprocess_spec
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datasets, skipped = build_datasets(split, cfg, spec)
    counts = [0] * len(split.labels)
    for y in datasets["train"].cache.targets:
        counts[y] += 1
    ratio = imbalance_ratio(counts)
    if cfg.teacher:
        from .distill import with_teacher

        datasets["train"], record.distillation = with_teacher(datasets["train"], cfg, split.labels)
    mode, weights, logit_offset = imbalance_plan(cfg, counts)
    log.info("train %d / val %d / test %d images, %d classes; imbalance ratio %.2f; objective %s -> imbalance: %s",
             len(datasets["train"]), len(datasets["val"]), len(datasets["test"]), len(counts), ratio, cfg.objective,
             mode)
    if cfg.cache:
        log.info("decode cache: %.1f MB uint8", sum(d.cache.nbytes for d in datasets.values()) / 1e6)

    # Resuming from a checkpoint restores every weight, so the pretrained file is not needed then.
    fresh = ckpt_path is None
    model = create_model(cfg.model, len(split.labels), pretrained=cfg.pretrained and fresh,
                         weights_file=cfg.weights if fresh else None, dropout=cfg.dropout)
    # The head-only epochs run on cached backbone features before Lightning starts; Lightning
    # then runs only the full fine-tuning epochs (same decision on --resume: it depends on cfg).
    feature_head = _uses_feature_head(cfg, model)
    fit_cfg = dataclasses.replace(cfg, epochs=cfg.epochs - cfg.head_epochs, head_epochs=0) if feature_head else cfg
    if (resume_overrides or {}).get("epochs") is not None and done + 1 >= fit_cfg.epochs:
        raise RunError(f"{out}: the checkpoint already holds {done + 1 + cfg.epochs - fit_cfg.epochs} epochs; "
                       f"--epochs must be more than that to continue")
    if any(v is not None for v in (resume_overrides or {}).values()):
        cfg.to_yaml(out / "config.yaml")  # a later --resume continues with what this one applied
    module = Classifier(model.train(), fit_cfg, weights, logit_offset)
    train_loader, val_loader = _loaders(datasets, cfg, counts, use_sampler=mode == "sampler")
    precision = _resolve_precision(cfg)
    log.info("speed: precision %s (CPU bf16 support: %s), %d decode worker(s), head phase %s", precision,
             "yes" if cpu_supports_bf16() else "no", _resolve_num_workers(cfg),
             "on cached features" if feature_head else "through the backbone")

    loggers: list[Any] = [CSVLogger(str(out), name="logs", version="")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(str(out), name="logs", version="tensorboard"))
    except ImportError:
        pass
    ckpt_cb = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best", monitor="val_objective",
                              mode="max", save_top_k=1, enable_version_counter=False)
    # Lightning 2.6's save_last writes last.ckpt only in epochs that improve best.ckpt; --resume
    # must lose at most one epoch, so a monitor-free callback rewrites last.ckpt every epoch.
    last_cb = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="last", monitor=None, save_top_k=1,
                              enable_version_counter=False)
    # Stop on the objective's own plateau; the best checkpoint breaks its ties by val loss (val_objective).
    early = EarlyStopping(monitor="val_bal_acc" if cfg.objective == "balanced" else "val_acc", mode="max",
                          patience=cfg.early_stopping_patience)
    # Lightning's bar (rich's) stays blank until the end when stdout is a file or pipe: counted lines then.
    tty = sys.stdout.isatty()
    progress = [] if tty else [LogProgress(log, epoch_offset=cfg.epochs - fit_cfg.epochs, total_epochs=cfg.epochs)]
    trainer = _make_trainer(
        max_epochs=fit_cfg.epochs, min_epochs=min(fit_cfg.epochs, fit_cfg.head_epochs + 1),
        accelerator=cfg.accelerator, devices=_devices(cfg), strategy=_strategy(fit_cfg), num_nodes=cfg.num_nodes,
        precision=precision, logger=loggers, callbacks=[ckpt_cb, last_cb, early, *progress, *(callbacks or [])],
        enable_progress_bar=tty,
        plugins=[_atomic_checkpoint_io()], deterministic=False, log_every_n_steps=1,
        limit_train_batches=cfg.limit_train_batches, enable_model_summary=False,
        default_root_dir=str(out),
    )
    try:
        if new_run is not None:
            _write_new_run(out, cfg, split, spec, record)
        if feature_head and fresh:
            _run_feature_head(model, datasets, cfg, spec, weights, counts, mode, out)
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
    except Exception:
        # Failed before a single optimizer step (strategy setup, a DDP launch, the data loaders):
        # nothing to resume, and a half-made run would only make the rerun ask for --resume.
        if new_run is not None and trainer.global_step == 0:
            new_run.remove()
        raise
    if trainer.global_rank != 0:
        return record  # rank 0 alone finalises the run directory
    if history:
        _prepend_log_rows(out / "logs" / "metrics.csv", history)
    return _finalize(out, record, cfg, split, datasets, ckpt_cb.best_model_path or str(out / "checkpoints/last.ckpt"),
                     skipped=skipped, imbalance={"ratio": ratio, "mode": mode, "train_counts": counts},
                     logit_offset=logit_offset,
                     seconds=time.time() - t0, epochs_run=trainer.current_epoch + cfg.epochs - fit_cfg.epochs,
                     head_phase={"head_phase": "cached features" if feature_head else "through the backbone",
                                 "precision": precision, "num_workers": _resolve_num_workers(cfg)})


def _ship_better(model: torch.nn.Module, val_logits: torch.Tensor, val_y: torch.Tensor, cfg: TrainConfig, out: Path,
                 split: Split, val_dataset: Any) -> tuple[torch.nn.Module, torch.Tensor, dict[str, Any]]:
    """The fine-tuned model, or the run's linear probe when that scored higher on val; logged beside the baselines."""
    n = len(split.labels)
    shipped, baselines = choose_shipped(val_scores(val_logits, val_y, n), out, cfg.objective)
    baselines.setdefault("majority", majority_scores(torch.tensor(split.targets("train")), val_y, n))
    if shipped == "probe":
        probe_model = create_model(cfg.model, n, pretrained=cfg.pretrained, weights_file=cfg.weights,
                                   dropout=cfg.dropout).eval()
        _, head = classifier_modules(probe_model)[0]
        head_state = load_probe_head(out)
        set_head(head, head_state["weight"], head_state["bias"])
        # The BatchNorm statistics the probe was fitted under (re-estimated on the training photos).
        bn = {k[len("bn."):]: v for k, v in head_state.items() if k.startswith("bn.")}
        if bn:
            probe_model.load_state_dict(bn, strict=False)
        model = probe_model
        val_logits, _ = predict_logits(model, val_dataset)
    key = "balanced_accuracy" if cfg.objective == "balanced" else "accuracy"
    parts = [f"fine-tuned {baselines['fine_tuned'][key]:.4f}"]
    if "probe" in baselines:
        parts.append(f"linear probe {baselines['probe'][key]:.4f}")
    if "majority" in baselines:
        parts.append(f"always the commonest class {baselines['majority'][key]:.4f}")
    log.info("val %s: %s -> shipping the %s model", key.replace("_", " "), ", ".join(parts), shipped)
    if shipped == "probe":
        log.warning("the fine-tuned model scored lower on val than the linear probe on its frozen backbone; "
                    "the run ships the probe (backbone + fitted linear head)")
    shipped_scores = val_scores(val_logits, val_y, n)
    if "majority" in baselines and shipped_scores["accuracy"] < baselines["majority"]["accuracy"]:
        log.error("the shipped model answers fewer val photos right (%.4f) than always answering the commonest "
                  "class (%.4f): check the labels and the data before using it", shipped_scores["accuracy"],
                  baselines["majority"]["accuracy"])
    return model, val_logits, baselines


def _finalize(out: Path, record: RunRecord, cfg: TrainConfig, split: Split, datasets: dict, best_path: str, *,
              skipped: int, imbalance: dict, seconds: float, epochs_run: int, head_phase: dict,
              logit_offset: torch.Tensor | None = None) -> RunRecord:
    """Best weights (or the probe, when it beat them on val) -> model.pth, temperature + fallback
    threshold + unknown detector on val, metrics on test."""
    spec = record.preprocess_spec
    ckpt = load_checkpoint(best_path)
    model = create_model(cfg.model, len(split.labels), pretrained=False, dropout=cfg.dropout)
    model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    model.eval()
    if logit_offset is not None:  # post-hoc logit adjustment ships inside the head's bias
        _, head = classifier_modules(model)[0]
        with torch.no_grad():
            head.bias.add_(logit_offset.to(head.bias))

    cal_name = "val" if len(datasets["val"]) else "train"
    val_logits, val_y = predict_logits(model, datasets[cal_name])
    model, val_logits, baselines = _ship_better(model, val_logits, val_y, cfg, out, split, datasets[cal_name])
    _write_state_dict(model, out / record.weights)
    temperature = fit_temperature(val_logits, val_y)
    fallback = choose_fallback_threshold((val_logits / temperature).softmax(1), val_y,
                                         target_accuracy=cfg.fallback_target_accuracy,
                                         min_threshold=cfg.min_fallback_threshold)
    val_metrics = compute_metrics(val_logits, val_y, split.labels, temperature=temperature)
    atomic_write_json(out / "calibration.json", {
        "schema_version": 1, "fitted_on": cal_name, "temperature": temperature,
        "ece_raw": val_metrics["ece_raw"], "ece_calibrated": val_metrics["ece_calibrated"],
        "nll_raw": val_metrics["nll_raw"], "nll_calibrated": val_metrics["nll_calibrated"],
        "fallback_threshold": fallback.threshold, "fallback_rule": fallback.rule,
        "fallback_accepted_fraction": fallback.accepted_fraction,
        "fallback_accepted_accuracy": fallback.accepted_accuracy,
    })
    eval_name = "test" if len(datasets["test"]) else cal_name
    logits, y = (val_logits, val_y) if eval_name == cal_name else predict_logits(model, datasets[eval_name])
    metrics = compute_metrics(logits, y, split.labels, temperature=temperature)
    metrics.update({"split": eval_name, "val": {k: val_metrics[k] for k in ("accuracy", "macro_f1")},
                    "training": {"seconds": round(seconds, 1), "epochs": epochs_run, "speed": head_phase,
                                 "skipped_unreadable": skipped, "imbalance": imbalance,
                                 "objective": cfg.objective, "baselines": baselines,
                                 "shipped": baselines["shipped"],
                                 "best_checkpoint": Path(best_path).name}})
    atomic_write_json(out / record.metrics, metrics)
    plot_confusion(metrics, out / "plots" / "confusion_matrix.png", title=f"{out.name} ({eval_name})")
    plot_curves(out / "logs" / "metrics.csv", out / "plots" / "curves.png")

    from .ood import fit_run_detector, model_version

    train_eval = CachedImageDataset(datasets["train"].cache, eval_transform(spec, from_cache=True))
    record.unknown = fit_run_detector(model, train_eval, datasets[cal_name], out, heldout_name=cal_name,
                                      num_classes=len(split.labels))
    record.model_version = model_version(out, record)
    record.temperature = temperature
    record.fallback_threshold = fallback.threshold
    record.fallback_rule = fallback.rule
    record.best_checkpoint = f"checkpoints/{Path(best_path).name}"
    record.status = "trained"
    record.extra = {**record.extra, "data_root": split.root, "test_accuracy": metrics["accuracy"],
                    "objective": cfg.objective, "imbalance_mode": imbalance["mode"], "shipped": baselines["shipped"],
                    "baselines_val": {k: baselines[k] for k in ("majority", "probe", "fine_tuned") if k in baselines},
                    "test_macro_f1": metrics["macro_f1"], "image_size": record.preprocess["crop_size"]}
    record.extra["samples"] = write_samples(out, split, record.preprocess_spec, datasets)  # export needs no dataset
    record.to_json(out / "run.json")
    log.info("run %s: %s accuracy %.4f macro-F1 %.4f (T=%.3f, fallback below %.2f) in %.0f s", out, eval_name,
             metrics["accuracy"], metrics["macro_f1"], temperature, fallback.threshold, seconds)
    return record


# --------------------------------------------------------------------------- evaluate
def _other_metrics_name(data: Path) -> str:
    """``metrics-<folder>.json`` for a folder that is not the run's dataset (safe file-name characters only)."""
    import re

    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", data.name).strip("._") or "data"
    return f"metrics-{stem}.json"


def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, *, batch_size: int = 64,
             out: str | Path | None = None) -> dict[str, Any]:
    """Evaluate a finished run.

    ``data_dir`` resolution: a tree with ``test/`` -> that split; the run's own dataset ->
    its held-out test split (the split file is the truth, so no leakage); any other folder
    -> every image in it (class folders must be among the run's labels).

    Where it writes: the run's own held-out split -> ``RUN/metrics.json`` and the plots (the
    numbers export copies into the bundle); any other folder -> ``RUN/metrics-<folder>.json``
    and ``RUN/plots/confusion_matrix-<folder>.png``, never the run's held-out metrics.
    ``out`` names the metrics file instead. The returned dict carries ``metrics_file``.
    """
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    spec = record.preprocess_spec
    split = load_split(run_dir / record.split)
    index = {name: i for i, name in enumerate(record.labels)}
    data = Path(data_dir).resolve() if data_dir else Path(split.root)
    own = data == Path(split.root).resolve()
    if own:
        paths, targets, which = split.paths("test"), split.targets("test"), "test"
        if not paths:
            paths, targets, which = split.paths("val"), split.targets("val"), "val"
    else:
        from .images import scan_image_folder

        listing = scan_image_folder(data)
        part = "test" if "test" in listing.splits else ("all" if "all" in listing.splits else "val")
        if part not in listing.splits:
            raise DataError(f"{data}: no test/ or val/ split to evaluate")
        unknown = sorted(set(listing.splits[part]) - set(index))
        if unknown:
            raise DataError(f"{data}: class folder(s) {', '.join(unknown)} not among the run's labels")
        paths, targets = [], []
        for name, files in listing.splits[part].items():
            paths += files
            targets += [index[name]] * len(files)
        which = part
    target = Path(out) if out is not None else run_dir / (record.metrics if own else _other_metrics_name(data))
    if out is not None and target.resolve() == (run_dir / record.metrics).resolve() and not own:
        raise RunError(f"{target}: is the run's held-out metrics file; choose another --out")
    cache = ImageCache(paths, targets, resize_size=spec.resize_size, interpolation=spec.interpolation)
    if len(cache) == 0:
        raise DataError(f"{data}: no readable images to evaluate")
    model = load_run_model(run_dir, record)
    logits, y = predict_logits(model, CachedImageDataset(cache, eval_transform(spec)), batch_size=batch_size)
    metrics = compute_metrics(logits, y, record.labels, temperature=record.temperature)
    metrics.update({"split": which, "data": str(data), "skipped_unreadable": len(cache.skipped)})
    previous = run_dir / record.metrics
    if own and previous.is_file():
        import json

        old = json.loads(previous.read_text())
        if isinstance(old, dict) and "training" in old:
            metrics["training"] = old["training"]
    atomic_write_json(target, metrics)
    suffix = "" if own and out is None else "-" + target.stem.removeprefix("metrics-")
    plot_confusion(metrics, run_dir / "plots" / f"confusion_matrix{suffix}.png", title=f"{run_dir.name} ({which})")
    if own and out is None:
        plot_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots" / "curves.png")
    metrics["metrics_file"] = str(target)
    return metrics
