"""The linear probe: multinomial logistic regression on frozen backbone features, fitted by L-BFGS.

Every run fits it on the features its head phase computes anyway (seconds on a CPU), records its
val score beside the fine-tuned model's and keeps it when fine-tuning did no better; the fine-tune's
head also starts from it (LP-FT: Kumar et al., "Fine-Tuning can Distort Pretrained Features",
ICLR 2022 — a fitted head sends small, informative gradients into the backbone instead of a random
head's large ones). ``fieldid data check`` uses it for out-of-sample probabilities and the real-data
benchmark as its "linear probe" baseline. torch only: scikit-learn is not a core dependency.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["LinearProbe", "fit_logistic", "fit_probe", "score_predictions", "majority_scores", "objective_key",
           "objective_score", "L2_GRID"]

# Weight-decay strengths tried; the one with the best val score wins (ties: the stronger one).
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


@dataclass
class LinearProbe:
    """A fitted probe on raw features (standardisation folded in): ``logits = x @ weight.T + bias``."""

    weight: torch.Tensor  # (classes, features)
    bias: torch.Tensor  # (classes,)
    l2: float
    val: dict[str, float]  # score_predictions of the val photos

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.float() @ self.weight.T + self.bias


def fit_logistic(features: torch.Tensor, targets: torch.Tensor, num_classes: int, *, l2: float = 1e-3,
                 sample_weights: torch.Tensor | None = None, max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of an L2-regularised softmax regression on raw ``features``.

    Features are centred and scaled (one scale for all) for a well-conditioned L-BFGS, and that is
    folded back into the returned weight and bias, so they apply to raw features (and drop into a
    model's ``nn.Linear``) with the weight magnitudes the fit chose.

    Example:
        >>> w, b = fit_logistic(torch.eye(4).repeat(5, 1), torch.arange(4).repeat(5), 4)
        >>> int((torch.eye(4) @ w.T + b).argmax(1).eq(torch.arange(4)).sum())
        4
    """
    x = features.detach().float().cpu()
    y = targets.detach().long().cpu()
    # One scale for all features, not one per feature: per-feature standardisation folded back
    # into the weight blows up the weights of near-constant channels (1/std), and the fine-tuning
    # that starts from this head then sees logits in the hundreds on augmented photos (a real
    # inspection set's first-epoch training loss was 13) and wrecks the backbone it should spare.
    mean, std = x.mean(0), x.std().clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(num_classes, z.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    sw = None if sample_weights is None else (sample_weights.float().cpu() / sample_weights.float().mean())
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        per = torch.nn.functional.cross_entropy(z @ w.T + b, y, reduction="none")
        loss = (per * sw).mean() if sw is not None else per.mean()
        loss = loss + 0.5 * l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        weight = w / std
        bias = b - (weight * mean).sum(1)
    return weight.detach(), bias.detach()


def score_predictions(pred: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro-F1 and balanced accuracy (mean per-class recall over the classes present)."""
    pred, targets = pred.long().cpu(), targets.long().cpu()
    n = max(1, len(targets))
    f1s, recalls = [], []
    for c in range(num_classes):
        tp = int(((pred == c) & (targets == c)).sum())
        fp = int(((pred == c) & (targets != c)).sum())
        fn = int(((pred != c) & (targets == c)).sum())
        if tp + fn:
            recalls.append(tp / (tp + fn))
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": round(int((pred == targets).sum()) / n, 4),
            "macro_f1": round(sum(f1s) / max(1, len(f1s)), 4),
            "balanced_accuracy": round(sum(recalls) / max(1, len(recalls)), 4)}


def majority_scores(train_targets: torch.Tensor, targets: torch.Tensor, num_classes: int) -> dict[str, Any]:
    """Scores of always answering the commonest training class (scikit-learn's DummyClassifier),
    averaged over the classes that tie for commonest.

    Why the average: in a balanced training set (a user who labelled 16 photos per grade) every
    class is the commonest. scikit-learn then answers the first by index, the folder name that
    sorts first, and that answer's score measures how common that one folder's class happens to be
    among the scored photos: on the benchmark's few-photo inspection set, "0_functional" sorts
    first and is 57 % of the test photos, so the rule scored 0.575 where each tied answer scores
    0.04-0.57 and their mean 0.25. The mean is what the rule scores with the tie broken at random.

    Returns:
        :func:`score_predictions` keys, ``class`` (the first commonest class) and, when several
        tie, ``tied_classes``.

    Example:
        >>> s = majority_scores(torch.tensor([0, 1]), torch.tensor([0, 0, 0, 1]), 2)
        >>> s["accuracy"], s["tied_classes"]
        (0.5, [0, 1])
    """
    counts = torch.bincount(train_targets.long().cpu(), minlength=num_classes)
    tied = torch.nonzero(counts == counts.max()).flatten().tolist()
    per = [score_predictions(torch.full_like(targets.long().cpu(), c), targets, num_classes) for c in tied]
    mean = {key: round(sum(p[key] for p in per) / len(per), 4) for key in per[0]}
    return {**mean, "class": tied[0], **({"tied_classes": tied} if len(tied) > 1 else {})}


def objective_key(objective: str) -> str:
    """The key of :func:`score_predictions` that ``--objective`` optimises (``accuracy`` or ``balanced_accuracy``)."""
    return "balanced_accuracy" if objective == "balanced" else "accuracy"


def objective_score(scores: dict[str, float], objective: str) -> float:
    """The score ``--objective`` optimises (accuracy or balanced accuracy): what every choice of a run compares."""
    return scores[objective_key(objective)]


def fit_probe(train_features: torch.Tensor, train_targets: torch.Tensor, val_features: torch.Tensor,
              val_targets: torch.Tensor, num_classes: int, *, objective: str = "accuracy",
              l2_grid: tuple[float, ...] = L2_GRID) -> LinearProbe:
    """The probe of the best val score (``objective``: accuracy or balanced accuracy) over ``l2_grid``.

    With ``objective="balanced"`` every class weighs the same in the fit (inverse-frequency sample
    weights); with ``"accuracy"`` every photo does, as the photos' own distribution has it.
    """
    counts = torch.bincount(train_targets.long().cpu(), minlength=num_classes).float().clamp_min(1)
    sw = (1.0 / counts)[train_targets.long().cpu()] if objective == "balanced" else None
    best: LinearProbe | None = None
    for l2 in sorted(l2_grid, reverse=True):
        w, b = fit_logistic(train_features, train_targets, num_classes, l2=l2, sample_weights=sw)
        pred = (val_features.float().cpu() @ w.T + b).argmax(1)
        scores = score_predictions(pred, val_targets, num_classes)
        if best is None or objective_score(scores, objective) > objective_score(best.val, objective):
            best = LinearProbe(weight=w, bias=b, l2=l2, val=scores)
    assert best is not None
    return best
