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

import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

import torch

from .baselines import imbalance_plan, probe_bar, record_probe_bar
from .checkpoints import CheckpointError, atomic_checkpoint_io, load_checkpoint
from .clock import StepClock
from .compute import (cpu_supports_bf16, launch_rank, lightning_devices, lightning_strategy, make_trainer,
                      resolve_num_workers, resolve_precision)
from .config import ConfigError, TrainConfig, load_config
from .data import (CachedImageDataset, ImageCache, Split, balanced_sample_weights, eval_transform, imbalance_ratio,
                   load_split, make_split, train_transform)
from .finalize import finalize
from .head import HeadPhase, run_feature_head, uses_feature_head
from .image_size import choose_image_size
from .images import DataError
from .models import create_model, fast_layout, get_backbone
from .module import StopWhenPerfect
from .records import PreprocessSpec, RunRecord
from .resume import apply_resume_overrides, prepend_log_rows, read_log_rows
from .rundir import NewRun, RunError, check_out_dir, utc_now, write_new_run

__all__ = ["train", "build_datasets"]

log = logging.getLogger("fieldid.train")


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
    workers = resolve_num_workers(cfg)
    keep = workers > 0  # forked once: workers share the decode cache copy-on-write
    train_targets = datasets["train"].cache.targets
    if use_sampler:
        weights = balanced_sample_weights(counts, train_targets)
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



def require_validation(split: Split, cfg: TrainConfig) -> None:
    """Refuse ``val_fraction: 0`` without a pre-split ``val/``: early stopping, the temperature and the
    fallback threshold would then be fitted on (augmented) training images."""
    if cfg.val_fraction == 0 and not split.files.get("val"):
        raise ConfigError("val_fraction 0 leaves no validation images: early stopping, temperature scaling and the "
                          "fallback threshold would be fitted on training data; set val_fraction > 0 "
                          "or give the dataset a val/ folder")


# A val score equal to the probe's counts as reaching it (the same torchmetrics sum, in float32): an
# epoch that reaches the probe keeps the fine-tune going, though a tie at the end ships the probe
# (finalize) -- the next epoch may pass it. A bar that only a higher score clears is not measured.
PROBE_SCORE_TOLERANCE = 1e-6


def seed_early_stopping(early: Any, probe_monitor: dict[str, float]) -> float:
    """Make the linear probe the score the fine-tuning epochs must beat; returns that score.

    ``probe_monitor``: the probe's val scores as validation computes them (head.HeadPhase). The run
    ships the probe unless the fine-tuned model scores higher on val (finalize), so an epoch that
    does not reach the probe on val is no more progress than one that does not beat the best epoch:
    the plateau rule counts both. On the inspection set (elpv) the fine-tune stayed below its probe from
    the first epoch (0.681, 0.722, 0.719, 0.722 against 0.749) and four epochs of ~150 s ran before
    the run shipped the probe anyway; on the sets whose fine-tune beats the probe it does so within
    its first two epochs (docs/measured/bench-real-quick.md), where this changes nothing.
    """
    score = float(probe_monitor[early.monitor])
    early.best_score = torch.tensor(score - PROBE_SCORE_TOLERANCE)
    return score


def _record_stop(early: Any, perfect: StopWhenPerfect | None, epochs_run: int, cfg: TrainConfig,
                 record: RunRecord, probe_score: float | None = None) -> None:
    """Say in the log and ``run.json`` (``extra.stopped``) why training ended before the epoch cap."""
    from lightning.pytorch.callbacks.early_stopping import EarlyStoppingReason

    if epochs_run >= cfg.epochs:
        return
    if perfect is not None and perfect.stopped_epoch is not None:
        why = (f"every val photo has been right ({perfect.monitor} 1.0) and this epoch did not beat "
               "the best (val loss as tie-break)")
    elif early.stopping_reason == EarlyStoppingReason.PATIENCE_EXHAUSTED:
        why = f"{early.monitor} did not improve for {cfg.early_stopping_patience} epoch(s)"
        if probe_score is not None:
            why += f" on the best so far (the linear probe's {probe_score:.4f} included)"
    else:
        return
    record.extra["stopped"] = {"epoch": epochs_run, "cap": cfg.epochs, "reason": why}
    log.info("stopped after epoch %d of at most %d: %s", epochs_run, cfg.epochs, why)


def _apply_flips(flips: dict[str, Any], train_ds: Any, cfg: TrainConfig, spec: PreprocessSpec, record: RunRecord,
                 out: Path) -> None:
    """The mirror check's decision: the training transform, ``config.yaml`` (``--resume`` reads it
    there) and ``run.json``'s ``hflip`` entry with its numbers."""
    cfg.augment.hflip = bool(flips["used"])
    plain = getattr(train_ds, "base", train_ds)  # a distilled run wraps the photos with their soft labels
    plain.transform = train_transform(spec, cfg.augment)
    cfg.to_yaml(out / "config.yaml")
    record.extra["hflip"] = flips
    record.to_json(out / "run.json")


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
        >>> rec.labels  # doctest: +SKIP
        ['farmed', 'wild']
    """
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    from .module import Classifier, LogProgress

    clock = StepClock()  # where the run's time goes (run.json extra.seconds_by_step; its total: training.seconds)
    history: list[dict[str, str]] = []  # log rows of the epochs a resumed checkpoint already holds
    new_run: NewRun | None = None  # set when this call creates the run directory
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
        cfg = apply_resume_overrides(out, cfg, resume_overrides or {})
        if not Path(ckpt_path).is_file():
            ckpt_path = None  # killed before the first epoch ended: start over inside the same run
            log.warning("no last checkpoint in %s; restarting training from epoch 0", out)
        else:
            try:  # fail early and clearly on a corrupt file
                done = int(load_checkpoint(ckpt_path)["epoch"])
            except CheckpointError as e:
                raise CheckpointError(f"{e}; delete it and rerun --resume to restart this run from epoch 0") from None
            history = read_log_rows(out / "logs" / "metrics.csv", upto_epoch=done)
    else:
        if data_dir is None or out_dir is None:
            raise RunError("need --data DIR and --out RUN (or --resume RUN)")
        cfg = cfg or TrainConfig()
        cfg.validate()
        out = Path(out_dir)
        writer = launch_rank() == 0  # DDP: the other ranks (re-executed by the launcher) only read
        if writer:
            check_out_dir(out)
            new_run = NewRun(out, existed=out.exists())
        backbone = get_backbone(cfg.model)  # unknown model: fail before touching disk
        split = make_split(data_dir, val_fraction=cfg.val_fraction, test_fraction=cfg.test_fraction,
                           seed=cfg.seed)
        require_validation(split, cfg)
        if writer and split.presplit and not split.files["test"]:  # the user's split is kept; say what it means
            log.warning("%s: pre-split without test/ photos: the run's scores are on val, which also chose the "
                        "model (an optimistic estimate); add test/ for an honest one", data_dir)
        size, size_reason = choose_image_size(split, cfg)
        log.info("image size: %s", size_reason)
        spec = backbone.preprocess(size)
        record = RunRecord(name=out.name, backbone=cfg.model, num_classes=len(split.labels),
                           labels=split.labels, preprocess=spec.to_dict(), status="training", created=utc_now(),
                           extra={"image_size": spec.crop_size, "image_size_rule": size_reason})
        ckpt_path = None
        done = -1

    # Everything that can reject the input (data, weights, accelerator settings) runs before the
    # run directory is written, so bad input never leaves a half-made run behind.
    spec = record.preprocess_spec
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datasets, skipped = build_datasets(split, cfg, spec)
    clock.lap("read photos")
    counts = [0] * len(split.labels)
    for y in datasets["train"].cache.targets:
        counts[y] += 1
    ratio = imbalance_ratio(counts)
    if cfg.teacher:
        from .distill import with_teacher

        datasets["train"], record.distillation = with_teacher(datasets["train"], cfg, split.labels)
        clock.lap("teacher answers")
    mode, weights, logit_offset = imbalance_plan(cfg, counts)
    log.info("train %d / val %d / test %d images, %d classes; imbalance ratio %.2f; objective %s -> imbalance: %s",
             len(datasets["train"]), len(datasets["val"]), len(datasets["test"]), len(counts), ratio, cfg.objective,
             mode)
    if cfg.cache:
        log.info("decode cache: %.1f MB uint8", sum(d.cache.nbytes for d in datasets.values()) / 1e6)

    # Resuming from a checkpoint restores every weight, so the pretrained file is not needed then.
    fresh = ckpt_path is None
    model = fast_layout(create_model(cfg.model, len(split.labels), pretrained=cfg.pretrained and fresh,
                                     weights_file=cfg.weights if fresh else None, dropout=cfg.dropout))
    # The head-only epochs run on cached backbone features before Lightning starts; Lightning
    # then runs only the full fine-tuning epochs (same decision on --resume: it depends on cfg).
    feature_head = uses_feature_head(cfg, model)
    fit_cfg = dataclasses.replace(cfg, epochs=cfg.epochs - cfg.head_epochs, head_epochs=0) if feature_head else cfg
    if (resume_overrides or {}).get("epochs") is not None and done + 1 >= fit_cfg.epochs:
        raise RunError(f"{out}: the checkpoint already holds {done + 1 + cfg.epochs - fit_cfg.epochs} epochs; "
                       f"--epochs must be more than that to continue")
    if any(v is not None for v in (resume_overrides or {}).values()):
        cfg.to_yaml(out / "config.yaml")  # a later --resume continues with what this one applied
    module = Classifier(model.train(), fit_cfg, weights, logit_offset)
    train_loader, val_loader = _loaders(datasets, cfg, counts, use_sampler=mode == "sampler")
    precision = resolve_precision(cfg)
    log.info("speed: precision %s (CPU bf16 support: %s), %d decode worker(s), head phase %s", precision,
             "yes" if cpu_supports_bf16() else "no", resolve_num_workers(cfg),
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
    monitor = "val_bal_acc" if cfg.objective == "balanced" else "val_acc"
    early = EarlyStopping(monitor=monitor, mode="max", patience=cfg.early_stopping_patience)
    # And, once every val photo has been right, at the first epoch that does not beat the best
    # (StopWhenPerfect says why). Patience >= the fine-tuning epochs asks for every epoch: then
    # no early stop of either kind.
    perfect = StopWhenPerfect(monitor, fit_cfg.head_epochs) if cfg.early_stopping_patience < fit_cfg.epochs else None
    # Lightning's bar (rich's) stays blank until the end when stdout is a file or pipe: counted lines then.
    tty = sys.stdout.isatty()
    progress = [] if tty else [LogProgress(log, epoch_offset=cfg.epochs - fit_cfg.epochs, total_epochs=cfg.epochs)]
    trainer = make_trainer(
        max_epochs=fit_cfg.epochs, min_epochs=min(fit_cfg.epochs, fit_cfg.head_epochs + 1),
        accelerator=cfg.accelerator, devices=lightning_devices(cfg), strategy=lightning_strategy(fit_cfg),
        num_nodes=cfg.num_nodes,
        precision=precision, logger=loggers, callbacks=[ckpt_cb, last_cb, early, *([perfect] if perfect else []), *progress,
                                                     *(callbacks or [])],
        enable_progress_bar=tty,
        plugins=[atomic_checkpoint_io()], deterministic=False, log_every_n_steps=1,
        limit_train_batches=cfg.limit_train_batches, enable_model_summary=False,
        default_root_dir=str(out),
    )
    phase: HeadPhase | None = None
    probe_score: float | None = None  # the probe's val score, when it is the score to beat
    try:
        if new_run is not None:
            write_new_run(out, cfg, split, spec, record)
        clock.lap("set-up")
        if feature_head and fresh:
            phase = run_feature_head(model, datasets, cfg, spec, weights, counts, mode, out, labels=split.labels)
            if phase.flips is not None:
                _apply_flips(phase.flips, datasets["train"], cfg, spec, record, out)
            # Only a probe the run can ship sets the bar: without pretrained weights its random backbone
            # is not rebuilt at the end (finalize compares, and ships the fine-tuned model).
            if phase.probe_monitor and cfg.pretrained:
                probe_score = seed_early_stopping(early, phase.probe_monitor)
                record_probe_bar(out, early.monitor, probe_score)
        elif not fresh:
            probe_score = probe_bar(out, early.monitor)  # the seeded score itself is in the checkpoint
        elif cfg.augment.hflip == "auto":  # a fresh run (a resumed one took the branch above)
            record.extra["hflip"] = {"setting": "auto", "used": True,
                                     "rule": "no head phase on cached features to check mirror images: flips on"}
        if phase is not None:
            clock.lap("head phase")
        trainer.fit(module, train_loader, val_loader, ckpt_path=ckpt_path)
        clock.lap("fine-tune")
    except Exception:
        # Failed before a single optimizer step (strategy setup, a DDP launch, the data loaders):
        # nothing to resume, and a half-made run would only make the rerun ask for --resume.
        if new_run is not None and trainer.global_step == 0:
            new_run.remove()
        raise
    if trainer.global_rank != 0:
        return record  # rank 0 alone finalises the run directory
    _record_stop(early, perfect, trainer.current_epoch + cfg.epochs - fit_cfg.epochs, cfg, record, probe_score)
    if history:
        prepend_log_rows(out / "logs" / "metrics.csv", history)
    return finalize(out, record, cfg, split, datasets, ckpt_cb.best_model_path or str(out / "checkpoints/last.ckpt"),
                     skipped=skipped, imbalance={"ratio": ratio, "mode": mode, "train_counts": counts},
                     logit_offset=logit_offset, probe_features=phase.features if phase else None,
                     seconds=clock.total, epochs_run=trainer.current_epoch + cfg.epochs - fit_cfg.epochs,
                     head_phase={"head_phase": "cached features" if feature_head else "through the backbone",
                                 "precision": precision, "num_workers": resolve_num_workers(cfg)}, clock=clock)
