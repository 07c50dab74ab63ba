"""Photos whose given label is probably wrong: the confident-learning rule on out-of-sample probabilities.

Steps (Northcutt, Jiang, Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels",
JAIR 70, 2021):

1. **Out-of-sample probabilities.** A linear probe (L2 multinomial logistic regression fitted by
   L-BFGS, :func:`fieldid.training.probe.fit_logistic`) on frozen backbone features, k-fold
   cross-validated and stratified, so every photo is scored by a probe that never saw it. The L2
   strength is the one with the lowest cross-validated log loss over
   :data:`fieldid.training.probe.L2_GRID`.
2. **Per-class thresholds** ``t_j``: the mean probability of class ``j`` over the photos *given*
   class ``j`` (the class's mean self-confidence).
3. **Confident joint** ``C[i][j]``: a photo given ``i`` counts for the class ``j`` of highest
   probability among the classes whose probability reaches their threshold. Photos off the
   diagonal (``j != i``) whose probe also prefers another class than the given one (cleanlab's
   extra filter) are the label issues; ``j`` is the suggested label.
4. **Ranking** by self-confidence (``1 - p[given]`` is the score, default) or by the normalised
   margin (``(p[given] - max p[other] + 1) / 2``, score ``1 -`` that).

Classes confused *both ways* more than chance (:func:`confused_pairs`) are reported apart: many
photos going ``A -> B`` and ``B -> A`` point at an unclear boundary (ordinal grades, a vague
definition), which relabelling one photo at a time does not fix.

Why implemented here rather than imported: cleanlab and cleanvision are AGPL-3.0 and fieldid is
Apache-2.0; the rule is a published algorithm of a few dozen lines, and this keeps the check
torch + numpy only (no scikit-learn, which is not a core dependency).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from .images import DataError
from .neighbours import one_thread
from .probe import L2_GRID, fit_logistic

__all__ = [
    "LabelCheck",
    "RANK_BY",
    "binomial_sf",
    "confident_learning",
    "confused_pairs",
    "find_label_issues",
    "out_of_sample_probs",
    "stratified_folds",
]

RANK_BY = ("self_confidence", "normalized_margin")
DEFAULT_FOLDS = 5
# A pair is "confused both ways" when each direction is this unlikely under chance, after a
# Bonferroni correction over all class pairs (and holds at least MIN_PAIR_COUNT photos).
PAIR_ALPHA = 0.01
MIN_PAIR_COUNT = 3


@dataclass
class LabelCheck:
    """Result of :func:`find_label_issues`.

    Attributes:
        issues: one dict per flagged photo, most suspicious first: ``index`` (row of the
            input), ``given`` and ``suggested`` (class indices), ``score`` (0..1, higher = more
            likely wrong), ``self_confidence`` (out-of-sample probability of the given class),
            ``margin`` (``p[given] - max p[other]``), ``boundary`` (the pair is confused both ways).
        probs: out-of-sample class probabilities ``(n, classes)``.
        thresholds: per-class thresholds ``t_j``.
        confident_joint: ``C[given][suggested]`` counts (classes x classes).
        pairs: :func:`confused_pairs` output.
        info: folds, L2 strength, out-of-sample accuracy of the probe, per-class counts.
    """

    issues: list[dict[str, Any]]
    probs: np.ndarray
    thresholds: np.ndarray
    confident_joint: np.ndarray
    pairs: list[dict[str, Any]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def stratified_folds(labels: Sequence[int], folds: int, seed: int = 0) -> np.ndarray:
    """Fold number of every photo: each class dealt round-robin over ``folds`` after a seeded shuffle.

    Example:
        >>> stratified_folds([0, 0, 1, 1], 2).tolist().count(0)
        2
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    out = np.zeros(len(labels), dtype=np.int64)
    offset = 0
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        # Rotating the start by class keeps fold sizes even when many classes are small.
        out[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return out


def _fold_probs(x: torch.Tensor, y: torch.Tensor, fold: np.ndarray, k: int, num_classes: int,
                l2: float) -> np.ndarray:
    probs = np.zeros((len(y), num_classes), dtype=np.float64)
    for f in range(k):
        test = torch.from_numpy(fold == f)
        w, b = fit_logistic(x[~test], y[~test], num_classes, l2=l2)
        probs[test.numpy()] = torch.softmax(x[test] @ w.T + b, dim=1).double().numpy()
    return probs


def out_of_sample_probs(features: np.ndarray, labels: Sequence[int], num_classes: int, *,
                        folds: int = DEFAULT_FOLDS, seed: int = 0,
                        l2_grid: Sequence[float] = L2_GRID) -> tuple[np.ndarray, dict[str, Any]]:
    """Cross-validated probe probabilities: each photo scored by a probe fitted without it.

    Raises:
        DataError: a class with fewer than 2 photos (no fold could hold it out and still fit it).
    """
    y_np = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(y_np, minlength=num_classes)
    present = counts[counts > 0]
    if len(present) < 2:
        raise DataError("the label check needs photos of at least 2 classes")
    if present.min() < 2:
        raise DataError(f"the label check needs at least 2 photos in every class (smallest has {present.min()})")
    k = int(min(folds, present.min()))
    fold = stratified_folds(y_np, k, seed)
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
    y = torch.from_numpy(y_np)
    best: tuple[float, float, np.ndarray] | None = None
    # Small products: one thread (on 2 loaded cores a 58 x 1280 fit took 13 s on two threads, 0.09 s on one).
    with one_thread():
        for l2 in sorted(l2_grid, reverse=True):
            probs = _fold_probs(x, y, fold, k, num_classes, l2)
            loss = float(-np.log(np.clip(probs[np.arange(len(y_np)), y_np], 1e-12, None)).mean())
            if best is None or loss < best[0] - 1e-9:
                best = (loss, l2, probs)
    assert best is not None
    loss, l2, probs = best
    accuracy = float((probs.argmax(1) == y_np).mean())
    majority = float(counts.max() / counts.sum())
    # A probe no better than always answering the commonest class knows nothing about the labels:
    # its disagreements are noise, and the caller should say so (and not act on them).
    info = {"folds": k, "l2": l2, "log_loss": round(loss, 4), "accuracy": round(accuracy, 4),
            "majority_accuracy": round(majority, 4), "better_than_majority": accuracy > majority}
    return probs, info


def confident_learning(probs: np.ndarray, labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The rule itself on out-of-sample ``probs``.

    Returns:
        ``(thresholds, confident_joint, suggested)`` where ``suggested[i]`` is the confident
        class of photo ``i`` (``-1`` when no class reaches its threshold).

    Example:
        >>> p = np.array([[.9, .1], [.9, .1], [.2, .8], [.9, .1]])
        >>> t, C, s = confident_learning(p, [0, 0, 1, 1])
        >>> s.tolist(), C.tolist()
        ([0, 0, 1, 0], [[2, 0], [1, 1]])
    """
    y = np.asarray(labels, dtype=np.int64)
    n, k = probs.shape
    thresholds = np.ones(k)
    for j in range(k):
        if (y == j).any():
            thresholds[j] = probs[y == j, j].mean()
    # A hair of slack so a photo exactly at the mean counts (float noise must not decide it).
    above = probs >= thresholds[None, :] - 1e-12
    masked = np.where(above, probs, -1.0)
    suggested = np.where(above.any(1), masked.argmax(1), -1)
    joint = np.zeros((k, k), dtype=np.int64)
    ok = suggested >= 0
    np.add.at(joint, (y[ok], suggested[ok]), 1)
    return thresholds, joint, suggested


def binomial_sf(count: int, n: int, p: float) -> float:
    """P(X >= count) for X ~ Binomial(n, p), in log space (no scipy)."""
    if count <= 0:
        return 1.0
    if count > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(x + 1) - math.lgamma(n - x + 1) + x * lp + (n - x) * lq
             for x in range(count, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def confused_pairs(joint: np.ndarray, counts: Sequence[int], class_names: Sequence[str], *,
                   alpha: float = PAIR_ALPHA, min_count: int = MIN_PAIR_COUNT) -> list[dict[str, Any]]:
    """Class pairs whose photos are flagged *towards each other* in both directions more than chance.

    Chance: a flagged photo given class ``i`` is suggested class ``j`` with probability
    ``n_j / (N - n_i)`` (labelling slips land on other classes in proportion to how common they
    are). Each direction must be significant at ``alpha`` / number of pairs (one-sided binomial
    test) and hold at least ``min_count`` photos. Needs 3+ classes: with two, every mix-up is
    between them and there is no chance level to compare with.
    """
    k = joint.shape[0]
    if k < 3:
        return []
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    off = joint.copy()
    np.fill_diagonal(off, 0)
    flagged = off.sum(1)
    n_pairs = k * (k - 1) // 2
    out = []
    for i in range(k):
        for j in range(i + 1, k):
            stats = []
            for a, b in ((i, j), (j, i)):
                rest = total - counts[a]
                q = counts[b] / rest if rest > 0 else 0.0
                stats.append((int(off[a, b]), float(flagged[a] * q), binomial_sf(int(off[a, b]), int(flagged[a]), q)))
            if all(c >= min_count and c > e and p < alpha / n_pairs for c, e, p in stats):
                out.append({"classes": [class_names[i], class_names[j]],
                            "counts": [stats[0][0], stats[1][0]],
                            "expected": [round(stats[0][1], 2), round(stats[1][1], 2)],
                            "p_value": float(f"{max(stats[0][2], stats[1][2]):.3g}")})
    out.sort(key=lambda r: -(r["counts"][0] + r["counts"][1]))
    return out


def find_label_issues(features: np.ndarray, labels: Sequence[int], class_names: Sequence[str], *,
                      folds: int = DEFAULT_FOLDS, seed: int = 0, rank_by: str = "self_confidence",
                      probs: np.ndarray | None = None) -> LabelCheck:
    """Flag and rank photos whose given label the out-of-sample probe confidently disputes.

    Args:
        features: backbone features ``(n, dim)`` (:mod:`fieldid.training.features`).
        labels: given class index of each photo.
        class_names: names of the class indices.
        folds: cross-validation folds (fewer when the smallest class is smaller).
        seed: fold assignment seed.
        rank_by: ``self_confidence`` or ``normalized_margin``.
        probs: precomputed out-of-sample probabilities (skips the probe).

    Returns:
        A :class:`LabelCheck`.

    Example:
        >>> rng = np.random.default_rng(0)
        >>> y = np.repeat([0, 1, 2], 30)
        >>> x = np.eye(3)[y] * 4 + rng.normal(size=(90, 3))
        >>> y_noisy = y.copy(); y_noisy[0] = 2
        >>> find_label_issues(x, y_noisy, ["a", "b", "c"]).issues[0]["index"]
        0
    """
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {', '.join(RANK_BY)}, got {rank_by!r}")
    y = np.asarray(labels, dtype=np.int64)
    k = len(class_names)
    info: dict[str, Any] = {}
    if probs is None:
        probs, info = out_of_sample_probs(features, y, k, folds=folds, seed=seed)
    thresholds, joint, suggested = confident_learning(probs, y)
    pairs = confused_pairs(joint, np.bincount(y, minlength=k), class_names)
    boundary = {tuple(sorted((class_names.index(a), class_names.index(b)))) for a, b in (p["classes"] for p in pairs)}
    rows = np.arange(len(y))
    self_conf = probs[rows, y]
    other = probs.copy()
    other[rows, y] = -np.inf
    margin = self_conf - other.max(1)
    flagged = np.flatnonzero((suggested >= 0) & (suggested != y) & (probs.argmax(1) != y))
    quality = self_conf if rank_by == "self_confidence" else (margin + 1) / 2
    issues = [{"index": int(i), "given": int(y[i]), "suggested": int(suggested[i]),
               "score": round(float(1 - quality[i]), 4), "self_confidence": round(float(self_conf[i]), 4),
               "margin": round(float(margin[i]), 4),
               "boundary": tuple(sorted((int(y[i]), int(suggested[i])))) in boundary}
              for i in flagged]
    issues.sort(key=lambda r: (-r["score"], r["index"]))
    info = {**info, "rank_by": rank_by, "flagged": len(issues),
            "thresholds": {class_names[j]: round(float(t), 4) for j, t in enumerate(thresholds)}}
    return LabelCheck(issues=issues, probs=probs, thresholds=thresholds, confident_joint=joint, pairs=pairs, info=info)
