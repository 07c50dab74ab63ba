"""The LightningModule: head-only warm-up, then full fine-tuning with warmup + cosine."""
from __future__ import annotations

import math
import time

import lightning as L
import torch
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from .config import TrainConfig
from .distill import distill_loss
from .models import classifier_modules, model_num_classes

__all__ = ["Classifier", "phase_lr"]


def phase_lr(step: int, phase_start: int, phase_steps: int, peak: float, warmup_frac: float) -> float:
    """Linear warmup to ``peak`` then cosine to 0 within one phase; 0 outside it."""
    if phase_steps <= 0 or step < phase_start or step >= phase_start + phase_steps:
        return 0.0
    t = step - phase_start
    warm = max(1, int(warmup_frac * phase_steps))
    if t < warm:
        return peak * (t + 1) / warm
    progress = (t - warm) / max(1, phase_steps - warm)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


class Classifier(L.LightningModule):
    """Fine-tunes ``model``: ``head_epochs`` with the backbone frozen, then everything.

    Why two phases: a random head on a pretrained backbone sends large gradients into the
    backbone and wrecks its features in the first steps; training the head first avoids that.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, class_weights: torch.Tensor | None = None,
                 logit_offset: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        # Every head module trains in the head-only phase (a distilled LeViT has two).
        self.head_names = [name for name, _ in classifier_modules(model)]
        num_classes = model_num_classes(model)
        self.register_buffer("class_weights", class_weights if class_weights is not None else torch.ones(num_classes))
        # Post-hoc logit adjustment (imbalance: logit_adjust): val answers are judged as the shipped
        # model will give them, with -log(prior) added (finalising folds it into the head's bias).
        self.register_buffer("logit_offset", logit_offset if logit_offset is not None else torch.zeros(num_classes))
        self.loss_fn = nn.CrossEntropyLoss(weight=self.class_weights, label_smoothing=cfg.label_smoothing)
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_bal_acc = MulticlassAccuracy(num_classes=num_classes, average="macro")  # mean per-class recall
        self.val_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")

    def _is_head(self, param_name: str) -> bool:
        return any(param_name.startswith(f"model.{name}.") for name in self.head_names)

    def _set_backbone_trainable(self, trainable: bool) -> None:
        for name, p in self.named_parameters():
            if not self._is_head(name):
                p.requires_grad_(trainable)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_epoch_start(self) -> None:
        head_phase = self.current_epoch < self.cfg.head_epochs
        self._set_backbone_trainable(not head_phase)
        if head_phase:
            # Frozen backbone: keep its BatchNorm statistics frozen too.
            self.model.eval()
            for name in self.head_names:
                self.model.get_submodule(name).train()
        else:
            # Lightning only restores the mode it found around validation and never calls .train()
            # itself, so the eval() above would otherwise freeze BatchNorm and dropout for good.
            self.model.train()
            if self.cfg.batchnorm == "frozen":
                # The pretrained running statistics stay as they are (inference-mode BatchNorm; its
                # scale and shift still train): the features the starting probe was fitted on.
                for m in self.model.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        teacher = None
        if isinstance(y, (list, tuple)):  # distillation: (targets, the teacher's logits); training/distill.py
            y, teacher = y
        if x.is_cuda:  # channels-last is the fast layout for convs under CUDA AMP
            x = x.contiguous(memory_format=torch.channels_last)
        logits = self(x)
        loss = self.loss_fn(logits, y)
        if teacher is not None:
            loss = distill_loss(loss, logits, teacher, weight=self.cfg.distill_weight,
                                temperature=self.cfg.distill_temperature)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("lr", self.optimizers().param_groups[0]["lr"], on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x) + self.logit_offset
        loss = nn.functional.cross_entropy(logits, y)
        self.val_acc.update(logits, y)
        self.val_bal_acc.update(logits, y)
        self.val_f1.update(logits, y)
        self._val_loss_sum = getattr(self, "_val_loss_sum", 0.0) + float(loss) * len(y)
        self._val_count = getattr(self, "_val_count", 0) + len(y)
        self.log("val_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y), sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        acc, bal = self.val_acc.compute(), self.val_bal_acc.compute()
        self.log("val_acc", acc, prog_bar=True, sync_dist=True)
        self.log("val_bal_acc", bal, sync_dist=True)
        self.log("val_macro_f1", self.val_f1.compute(), prog_bar=True, sync_dist=True)
        # The monitor of best checkpoint and early stopping: the objective's metric, ties (common on
        # small val sets, where accuracy moves in steps of one photo) broken by the lower val loss.
        val_loss = self._val_loss_sum / max(1, self._val_count)
        metric = bal if self.cfg.objective == "balanced" else acc
        self.log("val_objective", metric - 1e-4 * min(val_loss, 10.0), sync_dist=True)
        self._val_loss_sum, self._val_count = 0.0, 0
        self.val_acc.reset()
        self.val_bal_acc.reset()
        self.val_f1.reset()

    def configure_optimizers(self):  # type: ignore[override]
        head = [p for n, p in self.named_parameters() if self._is_head(n)]
        backbone = [p for n, p in self.named_parameters() if not self._is_head(n)]
        # lr=1.0 with LambdaLR returning absolute rates keeps both phases in one schedule,
        # which Lightning checkpoints and restores on --resume.
        opt = torch.optim.AdamW([{"params": backbone}, {"params": head}], lr=1.0,
                                weight_decay=self.cfg.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        head_steps = per_epoch * self.cfg.head_epochs
        ft_steps = max(0, total - head_steps)
        cfg = self.cfg

        def backbone_lr(step: int) -> float:
            return phase_lr(step, head_steps, ft_steps, cfg.lr, cfg.warmup_frac)

        def head_lr(step: int) -> float:
            if step < head_steps:
                return phase_lr(step, 0, head_steps, cfg.head_lr, cfg.warmup_frac)
            return phase_lr(step, head_steps, ft_steps, cfg.lr, cfg.warmup_frac)

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [backbone_lr, head_lr])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def monitor_scores(logits: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """``val_acc`` and ``val_bal_acc`` of ``logits`` exactly as validation computes them (torchmetrics),
    for a model scored outside Lightning (the run's linear probe). The probe's own ``balanced_accuracy``
    (probe.score_predictions) skips classes without val photos, torchmetrics counts a predicted one as
    recall 0: compared with each other they could differ by a class."""
    acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
    bal = MulticlassAccuracy(num_classes=num_classes, average="macro")
    return {"val_acc": float(acc(logits, targets)), "val_bal_acc": float(bal(logits, targets))}


class StopWhenPerfect(L.Callback):
    """Once every val photo has been right, stop at the first epoch that does not beat the best.

    With val accuracy at 1.0 nothing scores higher, and the best checkpoint is chosen among the
    perfect epochs by val loss alone (``val_objective``): an epoch that fails to beat it has either
    lost a val photo or raised the loss, the turn the plateau rule waits ``patience`` epochs to be
    sure of. Measured on the benchmark (make bench-real-quick): faces and digits reached 1.0, the
    next epoch raised the val loss (digits also lost a val photo, then came back to 1.0 with a higher
    loss) and the shipped checkpoint stays the same; on the synthetic salmon set the loss kept
    falling after 1.0 and the run goes on, as it should (stopping at the first perfect epoch cost it
    one test photo of 10). Early stopping's plateau rule still applies alongside.
    """

    def __init__(self, monitor: str = "val_acc", head_epochs: int = 0) -> None:
        self.monitor = monitor
        # Head-only epochs inside Lightning (DDP, no feature cache) are not fine-tuning: not counted,
        # so a run decides alike on one device (head phase on cached features) and on several.
        self.head_epochs = head_epochs
        self.best = -math.inf  # the best val_objective seen, this rule's own (not the checkpoint's)
        self.perfect_seen = False
        self.stopped_epoch: int | None = None

    def state_dict(self) -> dict[str, float | bool]:
        """Saved in the checkpoints, so a ``--resume``d run stops where an uninterrupted one would."""
        return {"best": self.best, "perfect_seen": self.perfect_seen}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = float(state_dict.get("best", -math.inf))
        self.perfect_seen = bool(state_dict.get("perfect_seen", False))

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch < self.head_epochs:
            return
        m = trainer.callback_metrics
        if self.monitor not in m or "val_objective" not in m:
            return
        objective = float(m["val_objective"])
        improved, self.best = objective > self.best, max(self.best, objective)
        self.perfect_seen = self.perfect_seen or float(m[self.monitor]) >= 1.0
        # Lightning keeps a should_stop raised before min_epochs and stops at min_epochs even after
        # an epoch that beat the best: signal only where the run may really stop.
        may_stop = trainer.current_epoch + 1 >= (trainer.fit_loop.min_epochs or 0)
        self.stopped_epoch = None
        if self.perfect_seen and not improved and may_stop:
            trainer.should_stop = True
            self.stopped_epoch = trainer.current_epoch


class LogProgress(L.Callback):
    """Counted progress lines for the fine-tuning epochs when no terminal shows Lightning's bar.

    Lightning's default bar is rich's when rich is installed, and rich draws nothing until the end
    when the output goes to a file or pipe: a logged ``make train`` sat silent for minutes per run.
    This logs each epoch's batches in quarters and, at the epoch's end, its val metrics.
    """

    def __init__(self, log, epoch_offset: int = 0, total_epochs: int | None = None) -> None:
        self._log = log
        self._offset = epoch_offset  # head-phase epochs run before Lightning's first epoch
        self._total = total_epochs
        self._t = 0.0

    def _epoch(self, trainer: L.Trainer) -> str:
        total = self._total if self._total is not None else trainer.max_epochs + self._offset
        return f"epoch {trainer.current_epoch + 1 + self._offset}/{total}"

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t = time.monotonic()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        n = trainer.num_training_batches
        if not math.isfinite(n):
            return
        n = int(n)
        if (batch_idx + 1) % max(1, math.ceil(n / 4)) == 0 or batch_idx + 1 == n:
            self._log.info("%s: batch %d/%d (%.0f s)", self._epoch(trainer), batch_idx + 1, n,
                           time.monotonic() - self._t)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning validates before this hook, and the module's own epoch-end hook (which logs the
        # val metrics) runs after the callbacks' validation hooks: here they are all in.
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in sorted(m.items()))
        self._log.info("%s: %s (%.0f s)", self._epoch(trainer), shown or "validated", time.monotonic() - self._t)
