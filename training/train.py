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
import datetime as _dt
import io
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from fieldid.cli_common import first_line

from .calibrate import choose_fallback_threshold, fit_temperature
from .config import ConfigError, TrainConfig, load_config
from .data import (CachedImageDataset, ImageCache, Split, class_weights, eval_transform, imbalance_ratio,
                   load_split, make_split, train_transform)
from .evaluate import compute_metrics, plot_confusion, plot_curves, predict_logits
from .images import DataError
from .models import create_model, get_backbone
from .records import (PreprocessSpec, RecordError, RunRecord, atomic_write_bytes, atomic_write_json,
                      load_record)

__all__ = ["train", "evaluate", "RunError", "CheckpointError", "build_datasets", "load_run_model"]

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


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a Lightning checkpoint, turning a corrupt/foreign file into a clear error."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        # Our checkpoints hold only tensors, numbers, strings and the config dict; Lightning's
        # loop state needs full unpickling, and the file is one this run wrote itself.
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
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


def _loaders(datasets: dict, cfg: TrainConfig, counts: list[int], use_sampler: bool):
    from torch.utils.data import DataLoader, WeightedRandomSampler

    g = torch.Generator().manual_seed(cfg.seed)
    train_targets = datasets["train"].cache.targets
    if use_sampler:
        per_class = [1.0 / max(1, c) for c in counts]
        weights = torch.tensor([per_class[y] for y in train_targets], dtype=torch.double)
        sampler = WeightedRandomSampler(weights, num_samples=len(weights), replacement=True, generator=g)
        train = DataLoader(datasets["train"], batch_size=cfg.batch_size, sampler=sampler,
                           num_workers=cfg.num_workers, drop_last=len(weights) > cfg.batch_size)
    else:
        train = DataLoader(datasets["train"], batch_size=cfg.batch_size, shuffle=True, generator=g,
                           num_workers=cfg.num_workers, drop_last=len(train_targets) > cfg.batch_size,
                           persistent_workers=cfg.num_workers > 0)
    val_ds = datasets["val"] if len(datasets["val"]) else datasets["train"]
    val = DataLoader(val_ds, batch_size=max(cfg.batch_size, 64), num_workers=cfg.num_workers)
    return train, val


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


def load_run_model(run_dir: str | Path, record: RunRecord | None = None) -> torch.nn.Module:
    """The run's fine-tuned model (fp32, eval mode) from ``model.pth`` — no pretrained weights needed."""
    run_dir = Path(run_dir)
    record = record or load_record(run_dir)
    model = create_model(record.backbone, record.num_classes, pretrained=False)
    sd = torch.load(run_dir / record.weights, map_location="cpu", weights_only=True)
    model.load_state_dict(sd)
    return model.eval()


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


# --------------------------------------------------------------------------- train
def train(data_dir: str | Path | None, out_dir: str | Path | None, cfg: TrainConfig | None = None, *,
          resume: str | Path | None = None, callbacks: list[Any] | None = None) -> RunRecord:
    """Fine-tune a backbone on an ImageFolder dataset and write a complete run directory.

    Args:
        data_dir: ImageFolder root (flat class folders, or train/[val/][test/]).
        out_dir: new run directory (must not exist or be empty).
        cfg: training configuration (defaults: :class:`TrainConfig`).
        resume: an interrupted run directory to continue from its last checkpoint; then
            ``data_dir``/``out_dir``/``cfg`` come from that run.
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

    from .module import Classifier

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
        if record.status == "trained":
            raise RunError(f"{out}: run already finished; nothing to resume")
        if not Path(ckpt_path).is_file():
            ckpt_path = None  # killed before the first epoch ended: start over inside the same run
            log.warning("no last checkpoint in %s; restarting training from epoch 0", out)
        else:
            try:  # fail early and clearly on a corrupt file
                done = load_checkpoint(ckpt_path)["epoch"]
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
        spec = backbone.preprocess(cfg.image_size)
        record = RunRecord(name=out.name, backbone=cfg.model, num_classes=len(split.labels),
                           labels=split.labels, preprocess=spec.to_dict(), status="training", created=_now())
        ckpt_path = None

    # Everything that can reject the input (data, weights, accelerator settings) runs before the
    # run directory is written, so bad input never leaves a half-made run behind.
    spec = record.preprocess_spec
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datasets, skipped = build_datasets(split, cfg, spec)
    counts = [0] * len(split.labels)
    for y in datasets["train"].cache.targets:
        counts[y] += 1
    ratio = imbalance_ratio(counts)
    mode = cfg.imbalance
    if mode == "auto":
        mode = "loss" if ratio > cfg.imbalance_auto_ratio else "none"
    log.info("train %d / val %d / test %d images, %d classes; imbalance ratio %.2f -> weighting: %s",
             len(datasets["train"]), len(datasets["val"]), len(datasets["test"]), len(counts), ratio, mode)
    if cfg.cache:
        log.info("decode cache: %.1f MB uint8", sum(d.cache.nbytes for d in datasets.values()) / 1e6)

    # Resuming from a checkpoint restores every weight, so the pretrained file is not needed then.
    fresh = ckpt_path is None
    model = create_model(cfg.model, len(split.labels), pretrained=cfg.pretrained and fresh,
                         weights_file=cfg.weights if fresh else None, dropout=cfg.dropout)
    weights = class_weights(counts) if mode == "loss" else None
    module = Classifier(model.train(), cfg, weights)
    train_loader, val_loader = _loaders(datasets, cfg, counts, use_sampler=mode == "sampler")

    loggers: list[Any] = [CSVLogger(str(out), name="logs", version="")]
    try:
        from lightning.pytorch.loggers import TensorBoardLogger
        import tensorboard  # noqa: F401

        loggers.append(TensorBoardLogger(str(out), name="logs", version="tensorboard"))
    except ImportError:
        pass
    ckpt_cb = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best", monitor="val_macro_f1",
                              mode="max", save_top_k=1, enable_version_counter=False)
    # Lightning 2.6's save_last writes last.ckpt only in epochs that improve best.ckpt; --resume
    # must lose at most one epoch, so a monitor-free callback rewrites last.ckpt every epoch.
    last_cb = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="last", monitor=None, save_top_k=1,
                              enable_version_counter=False)
    early = EarlyStopping(monitor="val_macro_f1", mode="max", patience=cfg.early_stopping_patience)
    trainer = _make_trainer(
        max_epochs=cfg.epochs, min_epochs=min(cfg.epochs, cfg.head_epochs + 1),
        accelerator=cfg.accelerator, devices=_devices(cfg), strategy=_strategy(cfg), num_nodes=cfg.num_nodes,
        precision=_resolve_precision(cfg), logger=loggers, callbacks=[ckpt_cb, last_cb, early, *(callbacks or [])],
        plugins=[_atomic_checkpoint_io()], deterministic=False, log_every_n_steps=1,
        limit_train_batches=cfg.limit_train_batches, enable_model_summary=False,
        default_root_dir=str(out),
    )
    try:
        if new_run is not None:
            _write_new_run(out, cfg, split, spec, record)
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
                     seconds=time.time() - t0, epochs_run=trainer.current_epoch)


def _finalize(out: Path, record: RunRecord, cfg: TrainConfig, split: Split, datasets: dict, best_path: str, *,
              skipped: int, imbalance: dict, seconds: float, epochs_run: int) -> RunRecord:
    """Best weights -> model.pth, temperature + fallback threshold on val, metrics on test, plots."""
    ckpt = load_checkpoint(best_path)
    model = create_model(cfg.model, len(split.labels), pretrained=False, dropout=cfg.dropout)
    model.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    model.eval()
    _write_state_dict(model, out / record.weights)

    cal_name = "val" if len(datasets["val"]) else "train"
    val_logits, val_y = predict_logits(model, datasets[cal_name])
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
                    "training": {"seconds": round(seconds, 1), "epochs": epochs_run,
                                 "skipped_unreadable": skipped, "imbalance": imbalance,
                                 "best_checkpoint": Path(best_path).name}})
    atomic_write_json(out / record.metrics, metrics)
    plot_confusion(metrics, out / "plots" / "confusion_matrix.png", title=f"{out.name} ({eval_name})")
    plot_curves(out / "logs" / "metrics.csv", out / "plots" / "curves.png")

    record.temperature = temperature
    record.fallback_threshold = fallback.threshold
    record.fallback_rule = fallback.rule
    record.best_checkpoint = f"checkpoints/{Path(best_path).name}"
    record.status = "trained"
    record.extra = {"data_root": split.root, "test_accuracy": metrics["accuracy"],
                    "test_macro_f1": metrics["macro_f1"], "image_size": record.preprocess["crop_size"]}
    record.to_json(out / "run.json")
    log.info("run %s: %s accuracy %.4f macro-F1 %.4f (T=%.3f, fallback below %.2f) in %.0f s", out, eval_name,
             metrics["accuracy"], metrics["macro_f1"], temperature, fallback.threshold, seconds)
    return record


# --------------------------------------------------------------------------- evaluate
def evaluate(run_dir: str | Path, data_dir: str | Path | None = None, *, batch_size: int = 64) -> dict[str, Any]:
    """Evaluate a finished run.

    ``data_dir`` resolution: a tree with ``test/`` -> that split; the run's own dataset ->
    its held-out test split (the split file is the truth, so no leakage); any other folder
    -> every image in it (class folders must be among the run's labels).
    Writes ``RUN/metrics.json`` and the plots, returns the metrics.
    """
    run_dir = Path(run_dir)
    record = load_record(run_dir)
    spec = record.preprocess_spec
    split = load_split(run_dir / record.split)
    index = {name: i for i, name in enumerate(record.labels)}
    data = Path(data_dir).resolve() if data_dir else Path(split.root)
    if data == Path(split.root).resolve():
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
    cache = ImageCache(paths, targets, resize_size=spec.resize_size, interpolation=spec.interpolation)
    if len(cache) == 0:
        raise DataError(f"{data}: no readable images to evaluate")
    model = load_run_model(run_dir, record)
    logits, y = predict_logits(model, CachedImageDataset(cache, eval_transform(spec)), batch_size=batch_size)
    metrics = compute_metrics(logits, y, record.labels, temperature=record.temperature)
    metrics.update({"split": which, "data": str(data), "skipped_unreadable": len(cache.skipped)})
    previous = run_dir / record.metrics
    if previous.is_file():
        import json

        old = json.loads(previous.read_text())
        if "training" in old:
            metrics["training"] = old["training"]
    atomic_write_json(run_dir / record.metrics, metrics)
    plot_confusion(metrics, run_dir / "plots" / "confusion_matrix.png", title=f"{run_dir.name} ({which})")
    plot_curves(run_dir / "logs" / "metrics.csv", run_dir / "plots" / "curves.png")
    return metrics
