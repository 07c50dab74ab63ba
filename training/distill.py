"""Knowledge distillation: the device model learns from the server model's soft labels.

``fieldid train --teacher SERVER_RUN`` (config key ``teacher``) trains the device model on

    loss = (1 - w) * CE(student, y) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))

with ``w = distill_weight`` and ``T = distill_temperature`` (Hinton et al. 2015; the ``T^2``
keeps the soft-label gradients on the scale of the hard-label ones).

The teacher's logits are computed *once* per training image, through the teacher's own eval
preprocessing (its input size, mean/std), not on every augmented view: a 260-px EfficientNet-
Lite2 forward per training step would multiply the CPU cost of training, while one pass over
the training split costs about as much as one epoch of the student. Each augmented view of an
image is then pulled towards its image's soft label.

The teacher must have the same labels in the same order as the dataset; anything else is a
:class:`DistillError` before any training starts.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError

__all__ = ["DistillError", "LabelsMismatch", "check_same_labels", "distill_loss", "teacher_logits",
           "SoftTargetDataset", "with_teacher"]

log = logging.getLogger("fieldid.distill")


class DistillError(ConfigError):
    """A teacher run that cannot teach this dataset (missing, unfinished, other labels)."""


class LabelsMismatch(DistillError):
    """Device and server models whose class labels (or their order) differ."""


def check_same_labels(device: list[str], server: list[str], *, device_name: str = "device model",
                      server_name: str = "server model") -> None:
    """Refuse a device/server pair whose labels differ in content or order (one clear line).

    Raises:
        LabelsMismatch: naming what differs first.

    Example:
        >>> check_same_labels(["a", "b"], ["b", "a"])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        fieldid.training.distill.LabelsMismatch: device model and server model labels differ: same classes in another order (first difference at index 0: 'a' vs 'b')
    """
    from fieldid.records import labels_difference

    what = labels_difference(device, server, first_name=device_name, second_name=server_name)
    if what:
        raise LabelsMismatch(what)


def distill_loss(hard_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, *, weight: float,
                 temperature: float) -> torch.Tensor:
    """``(1 - weight) * hard_loss + weight * T^2 * KL(teacher_T || student_T)`` (batch mean).

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> float(distill_loss(torch.tensor(1.0), z, z, weight=0.5, temperature=2.0))
        0.5
    """
    t = temperature
    soft = nn.functional.kl_div(nn.functional.log_softmax(student / t, dim=1),
                                nn.functional.log_softmax(teacher.to(student.dtype) / t, dim=1),
                                reduction="batchmean", log_target=True)
    return (1.0 - weight) * hard_loss + weight * (t * t) * soft


@torch.no_grad()
def teacher_logits(teacher_run: str | Path, paths: list[Path], labels: list[str], *,
                   batch_size: int = 32) -> tuple[torch.Tensor, dict[str, Any]]:
    """The teacher run's logits on ``paths`` (its own eval preprocessing), and what to record.

    Raises:
        DistillError: not a finished run, or unreadable images.
        LabelsMismatch: its labels are not exactly ``labels``.
    """
    from .data import CachedImageDataset, ImageCache, eval_transform
    from .records import RecordError, load_record
    from .models import fast_layout, load_run_model

    try:
        rec = load_record(teacher_run)
    except RecordError as e:
        raise DistillError(f"teacher: {e}") from None
    check_same_labels(labels, rec.labels, device_name="dataset", server_name=f"teacher {teacher_run}")
    spec = rec.preprocess_spec
    cache = ImageCache(paths, [0] * len(paths), resize_size=spec.resize_size, interpolation=spec.interpolation,
                       desc="teacher")
    if len(cache) != len(paths):
        raise DistillError(f"teacher: {len(paths) - len(cache)} training image(s) became unreadable")
    model = fast_layout(load_run_model(teacher_run, rec))
    ds = CachedImageDataset(cache, eval_transform(spec, from_cache=True))
    out = []
    for i in range(0, len(ds), batch_size):
        out.append(model(torch.stack([ds[j][0] for j in range(i, min(i + batch_size, len(ds)))])))
        log.info("teacher soft labels: %d/%d images", min(i + batch_size, len(ds)), len(ds))
    logits = torch.cat(out) if out else torch.empty(0, len(labels))
    info = {"teacher_run": str(Path(teacher_run).resolve()), "teacher_backbone": rec.backbone,
            "teacher_model_version": rec.model_version, "teacher_image_size": spec.crop_size,
            "soft_labels": "teacher logits on each training image, teacher's eval preprocessing, computed once"}
    return logits, info


class SoftTargetDataset(Dataset):
    """``(x, (y, teacher_logits))`` items: a training dataset with each image's soft label attached."""

    def __init__(self, base: Any, logits: torch.Tensor) -> None:
        if len(base) != len(logits):
            raise DistillError(f"{len(logits)} soft labels for {len(base)} training images")
        self.base = base
        self.cache = base.cache  # samplers and class counts read the targets from here
        self.logits = logits

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, tuple[int, torch.Tensor]]:
        x, y = self.base[i]
        return x, (y, self.logits[i])


def with_teacher(train_ds: Any, cfg: Any, labels: list[str]) -> tuple[SoftTargetDataset, dict[str, Any]]:
    """Attach ``cfg.teacher``'s soft labels to the training dataset; returns it and the run record entry."""
    logits, info = teacher_logits(cfg.teacher, list(train_ds.cache.paths), labels)
    info.update(weight=cfg.distill_weight, temperature=cfg.distill_temperature,
                loss="(1 - weight) * CE(student, y) + weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))")
    agree = float((logits.argmax(1) == torch.tensor(train_ds.cache.targets)).float().mean()) if len(logits) else 0.0
    info["teacher_train_accuracy"] = round(agree, 4)
    return SoftTargetDataset(train_ds, logits), info
