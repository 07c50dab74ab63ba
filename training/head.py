"""The head phase of a run on cached backbone features: the BatchNorm choice, the run's baselines
(majority answer, linear probe) and the starting head, before Lightning fine-tunes the whole net."""
from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import torch
from PIL import ImageOps

from .baselines import adapt_batchnorm, backbone_features, batchnorm_state, fit_run_baselines, set_head
from .compute import resolve_num_workers
from .config import TrainConfig
from .data import CachedImageDataset, balanced_sample_weights, eval_transform
from .records import PreprocessSpec

__all__ = ["head_module", "train_head_on_features", "uses_feature_head", "run_feature_head", "mirror_check",
           "HeadPhase", "MIRROR_IMAGES", "MIRROR_MIN_LOST", "MIRROR_MAX_DROP"]

log = logging.getLogger("fieldid.train")

# ``augment.hflip: auto``: flips stay on unless the run's probe, answering up to MIRROR_IMAGES of its
# val photos and their mirror images, loses more answers to the mirror than it gains: at least
# MIRROR_MIN_LOST photos and MIRROR_MAX_DROP of those checked. Val photos, not training photos: the
# probe knows its training photos by heart, so any change to them (a mirror too) costs answers; on
# the solar cells mirroring cost 5.5 % of the training photos' answers and 0.3 % of the val photos'.
# Measured on val: digit scans lose 6.5 % of their answers to the mirror (a mirrored 2 is no 2),
# faces and textures none, 21 scene classes one photo of 42.
MIRROR_IMAGES = 512
MIRROR_MIN_LOST = 5
MIRROR_MAX_DROP = 0.02


def head_module(model: torch.nn.Module) -> tuple[str, torch.nn.Module] | None:
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

    found = head_module(model)
    if found is None:
        raise ValueError("train_head_on_features needs a model with a single head module")
    name, head = found
    model.eval().to(device)
    n = len(dataset)
    images: torch.Tensor | None = None
    parts, labels, done, next_report = [], [], 0, n // 10
    for x, y in DataLoader(dataset, batch_size=max(cfg.batch_size, 64), shuffle=False,
                           num_workers=resolve_num_workers(cfg) if cache_features else 0):
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


def uses_feature_head(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    """Head phase on cached features: one process (DDP ranks would each redo it), one head, and
    at least one epoch left for Lightning's full fine-tuning."""
    return (cfg.head_feature_cache and cfg.head_epochs > 0 and cfg.epochs > cfg.head_epochs
            and str(cfg.devices) == "1" and cfg.num_nodes == 1 and head_module(model) is not None)


def _probe_val(feats: torch.Tensor, ys: torch.Tensor, val_feats: torch.Tensor, val_ys: torch.Tensor, num_classes: int,
               cfg: TrainConfig) -> float:
    """The linear probe's val score on ``cfg.objective`` (the number the run's choices compare)."""
    from .probe import fit_probe, objective_score

    val = fit_probe(feats, ys, val_feats, val_ys, num_classes, objective=cfg.objective).val
    return round(float(objective_score(val, cfg.objective)), 4)


def mirror_check(model: torch.nn.Module, head: torch.nn.Module, cache: Any, spec: PreprocessSpec,
                 logits_of: Any, feats: torch.Tensor, ys: torch.Tensor, *, seed: int, batch_size: int = 64,
                 num_workers: int = 0, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Whether a mirror image shows the same class, judged by the run's probe (``augment.hflip: auto``).

    ``cache``, ``feats``, ``ys``: the val photos, their head-input features and targets (in ``cache``
    order); ``logits_of`` maps features to the probe's logits. Up to :data:`MIRROR_IMAGES` of those
    photos (seeded) are mirrored and answered again; flips stay on unless the mirror costs at least
    :data:`MIRROR_MIN_LOST` answers, net, and :data:`MIRROR_MAX_DROP` of the photos checked (a val
    split of a few photos therefore keeps them on).
    """
    from torch.utils.data import Subset
    from torchvision import transforms as T

    n = len(cache)
    if n == 0:
        return {"setting": "auto", "used": True, "photos_checked": 0, "rule": "no val photos to check: flips on"}
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:MIRROR_IMAGES]
    mirror = T.Compose([T.Lambda(ImageOps.mirror), eval_transform(spec, from_cache=True)])
    mirrored = Subset(CachedImageDataset(cache, mirror), idx.tolist())
    feats_m, _ = backbone_features(model, head, mirrored, batch_size=batch_size, num_workers=num_workers,
                                   device=device)
    y = ys[idx]
    right = logits_of(feats[idx]).argmax(1) == y
    right_m = logits_of(feats_m).argmax(1) == y
    lost, gained = int((right & ~right_m).sum()), int((~right & right_m).sum())
    checked = len(idx)
    off = lost - gained >= max(MIRROR_MIN_LOST, MIRROR_MAX_DROP * checked)
    return {"setting": "auto", "used": not off, "photos_checked": checked, "probe_right": int(right.sum()),
            "mirrored_right": int(right_m.sum()), "lost_to_mirror": lost, "gained_by_mirror": gained,
            "rule": (f"flips off when mirroring costs the probe >= {MIRROR_MIN_LOST} answers net and >= "
                     f"{MIRROR_MAX_DROP:.0%} of the photos checked")}


@dataclasses.dataclass
class HeadPhase:
    """What the head phase hands the rest of the run.

    ``flips``: the mirror check's decision (``augment.hflip: auto``), else None. ``probe_monitor``: the
    linear probe's ``val_acc`` and ``val_bal_acc`` as Lightning's validation computes them (the scores the fine-tuning epochs have to beat). ``features``: the probe's
    training features, their targets and its val features, computed on the CPU under the BatchNorm
    statistics the probe keeps: when the run ships the probe they are the shipped model's own, and
    the unknown detector needs no pass of its own (None when computed on another device).
    """

    flips: dict[str, Any] | None
    probe_monitor: dict[str, float]
    features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None


def draw_loader_seeds(passes: int) -> None:
    """Advance torch's global RNG as ``passes`` passes over an unshuffled DataLoader do: each iterator
    draws one int64 base seed (torch.utils.data.dataloader._BaseDataLoaderIter); an eval transform
    draws nothing more."""
    for _ in range(passes):
        torch.empty((), dtype=torch.int64).random_()


def run_feature_head(model: torch.nn.Module, datasets: dict, cfg: TrainConfig, spec: PreprocessSpec,
                      weights: torch.Tensor | None, counts: list[int], mode: str, out: Path,
                      labels: list[str] | None = None) -> HeadPhase:
    """The head phase of :func:`train` on cached features of the un-augmented training photos.

    The features also give the run its baselines (majority answer and linear probe, scored on val);
    with ``head_init: probe`` (the default) the probe is the head the fine-tuning starts from. With
    ``augment.hflip: auto`` the probe also decides whether training flips photos (:func:`mirror_check`).
    """
    device = "cuda" if torch.cuda.is_available() and cfg.accelerator in ("auto", "gpu", "cuda") else "cpu"
    plain = CachedImageDataset(datasets["train"].cache, eval_transform(spec, from_cache=True))
    name, head = head_module(model)  # type: ignore[misc]  # uses_feature_head checked there is one
    t = time.time()
    workers = resolve_num_workers(cfg)
    batch = max(cfg.batch_size, 64)

    def features(label: str = "") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Head-input features and targets of the un-augmented training photos, then of the val photos,
        under the model's current BatchNorm statistics."""
        train_part = backbone_features(model, head, plain, batch_size=batch, num_workers=workers, device=device,
                                       label=label)
        val_part = backbone_features(model, head, datasets["val"], batch_size=batch, num_workers=workers,
                                     device=device)
        return (*train_part, *val_part)

    pretrained_bn = batchnorm_state(model)
    choice: dict[str, Any] = {"setting": cfg.batchnorm, "used": "pretrained"}
    if cfg.batchnorm == "auto":
        # The run's own evidence first: the probe under the pretrained statistics ... (in a forked RNG:
        # each DataLoader pass draws a seed, and a run that then keeps the re-estimated statistics must
        # be the very run `adapt` gives)
        with torch.random.fork_rng(devices=[]):
            pretrained_pass = features("head phase (pretrained BatchNorm statistics)")
        feats, ys, val_feats, val_ys = pretrained_pass
        choice["pretrained_probe_val"] = _probe_val(feats, ys, val_feats, val_ys, len(counts), cfg)
    if cfg.batchnorm in ("adapt", "auto"):
        adapted = adapt_batchnorm(model, plain, batch_size=batch, num_workers=workers, device=device)
        if adapted:
            choice["used"] = "re-estimated"
            log.info("head phase: BatchNorm statistics re-estimated on %d training photos (%.1f s)", adapted,
                     time.time() - t)
    if choice["used"] == "re-estimated" or cfg.batchnorm != "auto":
        feats, ys, val_feats, val_ys = features("head phase")
    if cfg.batchnorm == "auto" and choice["used"] == "re-estimated":
        # ... against the probe under the re-estimated ones (better on the benchmark's real photos, see
        # docs/measured/bench-real.md). The pretrained statistics stay only when their probe scores
        # strictly higher on val: on 48 flat-colour synthetic shapes the re-estimated ones cost 8 % of
        # the answers on new photos, the int8 files' agreement and the unknown score's separation.
        choice["re-estimated_probe_val"] = _probe_val(feats, ys, val_feats, val_ys, len(counts), cfg)
        if choice["pretrained_probe_val"] > choice["re-estimated_probe_val"]:
            model.load_state_dict(pretrained_bn, strict=False)
            choice["used"] = "pretrained"
            # The forked pass's features are these (the same photos through the same weights): a pass
            # again cost a third of the head phase (110 s of elpv's 1,364-s run). Its two DataLoaders'
            # seed draws are still made, so the run's RNG stream stays the one a second pass gave (and
            # the measured rows of docs/measured/ were made with).
            feats, ys, val_feats, val_ys = pretrained_pass
            draw_loader_seeds(2)
        del pretrained_pass  # the re-estimated ones won, or its features are feats now: not held twice
        log.info("head phase: BatchNorm statistics %s (linear probe val %s %.4f with the pretrained ones, "
                 "%.4f re-estimated)", choice["used"], cfg.objective, choice["pretrained_probe_val"],
                 choice["re-estimated_probe_val"])
    probe = fit_run_baselines(feats, ys, val_feats, val_ys, len(counts), cfg, out, batchnorm_state(model),
                              batchnorm_choice=choice, labels=labels)
    flips: dict[str, Any] | None = None
    if cfg.augment.hflip == "auto":
        with torch.random.fork_rng(devices=[]):  # the run's RNG stream stays the one a fixed setting gives
            flips = mirror_check(model, head, datasets["val"].cache, spec, probe.logits, val_feats, val_ys,
                                 seed=cfg.seed, batch_size=batch, num_workers=workers, device=device)
        log.info("head phase: horizontal flips %s (the probe answers %d of %d val photos right, %d of their "
                 "mirror images)", "on" if flips["used"] else "off: a mirror image is another class here",
                 flips["probe_right"], flips["photos_checked"], flips["mirrored_right"])
    if cfg.head_init == "probe" and isinstance(head, torch.nn.Linear):
        set_head(head, probe.weight, probe.bias)
        log.info("head phase: the linear probe is the starting head (%.1f s)", time.time() - t)
    else:
        sample_weights = balanced_sample_weights(counts, datasets["train"].cache.targets) if mode == "sampler" else None
        train_head_on_features(model, plain, cfg, class_weights=weights, sample_weights=sample_weights, device=device)
        log.info("head phase: %d epoch(s) on cached features in %.1f s", cfg.head_epochs, time.time() - t)
    model.train()
    from .module import monitor_scores

    monitor = monitor_scores(probe.logits(val_feats), val_ys, len(counts)) if len(val_ys) else {}
    return HeadPhase(flips, monitor, (feats, ys, val_feats) if device == "cpu" else None)
