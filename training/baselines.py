"""What every run checks itself against: the majority answer and a linear probe, fitted for free.

The head phase computes frozen backbone features of every training photo anyway; one more
pass over the (small) val split and an L-BFGS fit give, in seconds, the two baselines a
fine-tuned model must beat. The probe also *is* the head phase (LP-FT), and it is a complete
model (backbone + linear head): when the fine-tuned model scores no higher on val (a tie included),
the run ships the probe instead and says so (:func:`choose_shipped`).

Also here: how class imbalance is handled (:func:`imbalance_plan`), since the same choice shapes
the probe, the loss and the shipped logits.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch

from .config import TrainConfig
from .probe import LinearProbe, fit_probe, majority_scores, objective_score, score_predictions
from .records import atomic_write_bytes, atomic_write_json

__all__ = ["imbalance_plan", "backbone_features", "adapt_batchnorm", "batchnorm_state", "fit_run_baselines", "choose_shipped", "set_head", "load_probe_head",
           "val_scores",
           "BALANCED_AUTO_MODE", "PROBE_HEAD_FILE", "BASELINES_FILE", "record_probe_bar", "probe_bar"]

log = logging.getLogger("fieldid.train")

# imbalance "auto" under objective "balanced": chosen on the real-data benchmark (make bench-real).
BALANCED_AUTO_MODE = "logit_adjust"
PROBE_HEAD_FILE = "probe_head.pt"
BASELINES_FILE = "baselines.json"


def imbalance_plan(cfg: TrainConfig, counts: list[int]) -> tuple[str, torch.Tensor | None, torch.Tensor | None]:
    """``(mode, loss class weights or None, val/shipped logit offset or None)`` for ``cfg.imbalance``.

    ``auto`` is ``none`` under objective ``accuracy``: class weights buy rare-class recall with
    accuracy on the photos' own distribution (the real-data benchmark's inspection set lost 37
    points to them). Under ``balanced`` it is :data:`BALANCED_AUTO_MODE` once the largest class is
    more than ``imbalance_auto_ratio`` times the smallest.

    Example:
        >>> imbalance_plan(TrainConfig(), [100, 10])[0]
        'none'
    """
    nz = [c for c in counts if c > 0]
    ratio = max(nz) / min(nz) if nz else math.inf
    mode = cfg.imbalance
    if mode == "auto":
        mode = "none" if cfg.objective == "accuracy" or ratio <= cfg.imbalance_auto_ratio else BALANCED_AUTO_MODE
    c = torch.tensor([max(1, x) for x in counts], dtype=torch.float)
    weights = offset = None
    if mode in ("loss", "sqrt"):
        w = (1.0 / c) if mode == "loss" else c.rsqrt()
        weights = w / w.mean()
    elif mode == "logit_adjust":
        # Menon et al., "Long-tail learning via logit adjustment" (ICLR 2021): subtracting the log
        # prior from a model trained on the photos' own distribution gives balanced answers.
        offset = -(c / c.sum()).log()
        offset = offset - offset.mean()
    return mode, weights, offset


@torch.no_grad()
def backbone_features(model: torch.nn.Module, head: torch.nn.Module, dataset: Any, *, batch_size: int = 64,
                      num_workers: int = 0, device: str | torch.device = "cpu",
                      label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """What the frozen backbone hands ``head`` for every item of ``dataset`` (model in eval mode), and the targets."""
    from torch.utils.data import DataLoader

    model.eval().to(device)
    seen: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().float().cpu()))
    labels, n, done, next_report = [], len(dataset), 0, len(dataset) // 10
    try:
        for x, y in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            model(x.to(device))
            labels.append(torch.as_tensor(y))
            done += len(x)
            if label and n >= 200 and done >= next_report:
                log.info("%s: backbone features %d/%d images", label, done, n)
                next_report += n // 10
    finally:
        hook.remove()
    if not seen:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(seen), torch.cat(labels).long()


BN_ADAPT_IMAGES = 512  # enough photos for stable per-channel means and variances; a fraction of a pass


@torch.no_grad()
def adapt_batchnorm(model: torch.nn.Module, dataset: Any, *, batch_size: int = 64, num_workers: int = 0,
                    device: str | torch.device = "cpu", limit: int = BN_ADAPT_IMAGES) -> int:
    """Re-estimate every BatchNorm's running statistics on (up to ``limit``) training photos (AdaBN).

    Why: fine-tuning runs BatchNorm in train mode, on the batch's own statistics. On photos unlike
    ImageNet's those differ from the pretrained running statistics (on a real greyscale inspection
    set the pooled features moved by 177 % between the two modes), so a head fitted on eval-mode
    features met different features in the first fine-tuning steps: training loss 5-13 instead of
    ~1, and large gradients into the backbone. With the statistics re-estimated on the user's photos
    first, the probe is fitted on the features the fine-tuning starts from. Li et al., "Revisiting
    Batch Normalization For Practical Domain Adaptation" (2016).

    Returns:
        the number of photos the statistics were estimated on (0: the model has no BatchNorm).
    """
    from torch.utils.data import DataLoader, Subset

    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms or len(dataset) == 0:
        return 0
    momenta = [m.momentum for m in norms]
    g = torch.Generator().manual_seed(0)
    subset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:limit].tolist())
    model.to(device).train()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches: every photo counts the same
    seen = 0
    try:
        for x, _ in DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                               drop_last=len(subset) > batch_size):
            model(x.to(device))
            seen += len(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()
    return seen


def batchnorm_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every BatchNorm buffer (running mean, var, batch count) by state-dict name."""
    norms = {name for name, m in model.named_modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[0] in norms}


def set_head(head: torch.nn.Linear, weight: torch.Tensor, bias: torch.Tensor) -> None:
    """Copy a probe's weight and bias into ``head`` (same shape)."""
    with torch.no_grad():
        head.weight.copy_(weight.to(head.weight))
        head.bias.copy_(bias.to(head.bias))


def fit_run_baselines(train_features: torch.Tensor, train_targets: torch.Tensor, val_features: torch.Tensor,
                      val_targets: torch.Tensor, num_classes: int, cfg: TrainConfig, out: Path,
                      batchnorm: dict[str, torch.Tensor] | None = None,
                      batchnorm_choice: dict[str, Any] | None = None, labels: list[str] | None = None) -> LinearProbe:
    """Fit the probe and the majority answer, write them into the run, log their val scores.

    ``batchnorm`` (the adapted BatchNorm buffers the features were computed with) is stored with
    the probe's head: together with the pretrained weights they rebuild the probe model exactly.
    """
    probe = fit_probe(train_features, train_targets, val_features, val_targets, num_classes, objective=cfg.objective)
    majority = majority_scores(train_targets, val_targets, num_classes)
    atomic_write_bytes(out / PROBE_HEAD_FILE, _tensor_bytes({"weight": probe.weight, "bias": probe.bias,
                                                             **{f"bn.{k}": v for k, v in (batchnorm or {}).items()}}))
    atomic_write_json(out / BASELINES_FILE, {"schema_version": 1, "objective": cfg.objective,
                                             "val_images": int(len(val_targets)),
                                             "majority": majority, "probe": {**probe.val, "l2": probe.l2},
                                             **({"batchnorm": batchnorm_choice} if batchnorm_choice else {})})
    tied = majority.get("tied_classes")
    answer = (f"one of the {len(tied)} classes tied for commonest" if tied else
              f"'{labels[majority['class']] if labels else majority['class']}'")
    log.info("baselines on val (%d photos): always %s accuracy %.4f; linear probe accuracy %.4f, balanced %.4f "
             "(L2 %g)", len(val_targets), answer, majority["accuracy"], probe.val["accuracy"],
             probe.val["balanced_accuracy"], probe.l2)
    return probe


def record_probe_bar(out: Path, monitor: str, score: float) -> None:
    """Write into ``baselines.json`` that the probe's ``score`` on ``monitor`` is the score the
    fine-tuning epochs must beat (train.seed_early_stopping): a ``--resume`` of the run reads it back
    (:func:`probe_bar`) to say why the run stopped, as the first process would have."""
    import json

    path = out / BASELINES_FILE
    base = json.loads(path.read_text(encoding="utf-8"))
    base["early_stopping_bar"] = {"monitor": monitor, "score": score}
    atomic_write_json(path, base)


def probe_bar(out: Path, monitor: str) -> float | None:
    """The probe score :func:`record_probe_bar` wrote for ``monitor``; None when the run has none
    (no head phase on cached features, no pretrained weights, or another monitor)."""
    import json

    try:
        bar = json.loads((out / BASELINES_FILE).read_text(encoding="utf-8")).get("early_stopping_bar")
    except (OSError, ValueError):
        return None
    return float(bar["score"]) if isinstance(bar, dict) and bar.get("monitor") == monitor else None


def _tensor_bytes(obj: dict[str, torch.Tensor]) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def choose_shipped(fine_tuned_val: dict[str, float], out: Path, objective: str, *,
                   probe_shippable: bool = True) -> tuple[str, dict[str, Any]]:
    """``("fine-tuned" | "probe", baselines)``: the probe wins when it scores at least as well on val.

    Ties go to the probe: its backbone is the pretrained one left as it was, with a head fitted by
    convex regression, where the tied fine-tune moved every weight on the same few photos. On the
    benchmark's sets where the two tie (faces, textures, salmon: val 1.0 on each of three seeds) the
    probe answered as many test photos right (mean 1.000, 1.000, 0.933 both), sent fewer to the
    server (faces 0 % vs 0-18 %, salmon 0-20 % vs 10-30 %) and its int8 files met more bars (faces'
    ``.pte`` and salmon's logit bars pass where the fine-tune's missed; docs/training.md).

    ``probe_shippable``: False when the probe's backbone cannot be rebuilt (no pretrained weights:
    its random initial weights are gone); the probe's scores are then recorded, never shipped.

    ``baselines`` is what the run records: the majority's, the probe's and the fine-tuned model's
    val scores, the objective and which model shipped. Runs without a probe (head phase through
    the backbone) compare with the majority answer only.
    """
    path = out / BASELINES_FILE
    import json

    base = json.loads(path.read_text()) if path.is_file() else {"objective": objective}
    base["fine_tuned"] = fine_tuned_val
    shipped = "fine-tuned"
    probe = base.get("probe")
    if (probe_shippable and probe is not None and (out / PROBE_HEAD_FILE).is_file()
            and objective_score(probe, objective) >= objective_score(fine_tuned_val, objective)):
        shipped = "probe"
    base["shipped"] = shipped
    return shipped, base


def load_probe_head(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / PROBE_HEAD_FILE, weights_only=True)


def val_scores(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    return score_predictions(logits.argmax(1), targets, num_classes)
