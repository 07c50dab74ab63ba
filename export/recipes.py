"""Choosing an int8 recipe: every candidate is scored against fp32 on the selection images.

Only the best candidate's result is kept; each candidate leaves one row of summary numbers
(agreement, relative logit error, seconds) for the manifest, not its logits.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from .registry import ExportError

if TYPE_CHECKING:  # pragma: no cover
    from .verify import ExportContext

__all__ = ["RecipeSearch", "fidelity"]

log = logging.getLogger("fieldid.export")


def fidelity(logits: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """How faithfully ``logits`` (e.g. int8) follow ``ref`` (fp32) on the same images.

    Returns:
        ``selection_agreement`` (top-1) and ``relative_logit_error`` (mean |diff| divided by
        the mean per-image standard deviation of ``ref``, so it is comparable across models).
    """
    logits = np.asarray(logits, np.float32)
    ref = np.asarray(ref, np.float32)
    spread = float(ref.std(axis=1).mean()) or 1.0
    return {"selection_agreement": float((logits.argmax(1) == ref.argmax(1)).mean()),
            "relative_logit_error": float(np.abs(logits - ref).mean() / spread)}


def _closeness(unknown: dict[str, Any] | None) -> tuple[int, float]:
    """How close a candidate's ``unknown_score`` is to its bar: (parts met, -median diff).

    A passed bar (or no detector) is (3, 0): among candidates that pass, the logits decide, not the median.
    """
    if unknown is None or unknown["passed"]:
        return 3, 0.0
    from .unknown import int8_unknown_parts_met

    median = float(unknown["median_diff_over_threshold"])
    return int8_unknown_parts_met(unknown["clear_agreement"], unknown["decision_agreement"], median), -median


class RecipeSearch:
    """Keeps the best int8 candidate: the ``unknown_score`` bar (with a detector), then top-1 agreement,
    then lowest relative error (:meth:`add` has the whole order).

    Top-1 agreement alone is too coarse on a few hundred images (two recipes can both reach
    100% there and still differ on the test split), so ties go to :func:`fidelity`'s error.
    """

    def __init__(self, name: str, target: float = 1.0, bar: float = 0.99) -> None:
        self.name = name
        self.target = target  # the selection agreement a candidate should reach
        self.bar = bar  # the verification's top-1 agreement bar (export.verify.INT8_MIN_AGREEMENT)
        self.tried: list[dict[str, Any]] = []
        self._best: tuple[tuple[bool, bool, tuple[int, float], float, float], Any, Any] | None = None
        self._faithful: tuple[tuple[float, float], Any] | None = None  # by logits alone: (agreement, -error), recipe

    def add(self, recipe: Any, logits: np.ndarray, ref: np.ndarray, started: float, result: Any,
            unknown: dict[str, Any] | None = None) -> float:
        """Score one candidate (``recipe.describe()``); ``result`` is kept if it is the best. Returns its agreement.

        ``unknown``: the candidate's ``unknown_score`` bar on the selection inputs
        (``unknown.int8_unknown_bar``), for runs with a detector. A candidate that passes it beats
        one that does not, whatever their logits: a file whose unknown check fails is not used.
        Among those that pass, logits at the selection target come first. Among those that miss, the
        logits need only meet the bar itself (a file that misses the score on selection passes the
        check only if it is close on both; the half-point margin buys nothing then), and closeness to
        the score bar decides: more of its three parts met, then the smaller median score diff -- a
        statistic of every selection input, steadier than the decision agreement that a few images
        near the threshold decide (textures, .pte: the candidates at 100% logits missed the median by
        0.28 of the threshold, the stem one at 99% by 0.2003 against 0.20, and passed the check).
        Then logits agreement, then relative logit error.
        """
        fid = fidelity(logits, ref)
        row = {"recipe": recipe.describe(), **fid, "seconds": round(time.time() - started, 1)}
        if unknown is not None:
            row["unknown_selection"] = {k: unknown[k] for k in ("passed", "clear_agreement", "decision_agreement",
                                                                "median_diff_over_threshold")}
        self.tried.append(row)
        log.info("%s candidate %-62s selection agreement %.4f, relative logit error %.4f%s", self.name,
                 recipe.describe(), fid["selection_agreement"], fid["relative_logit_error"],
                 "" if unknown is None else f", unknown decisions agree {unknown['decision_agreement']:.4f} "
                                            f"({'passes' if unknown['passed'] else 'misses'} the int8 bar)")
        passed = unknown is None or bool(unknown["passed"])
        score = (passed, fid["selection_agreement"] >= (self.target if passed else self.bar),
                 _closeness(unknown), fid["selection_agreement"], -fid["relative_logit_error"])
        if self._best is None or score > self._best[0]:
            self._best = (score, recipe, result)
        faithful = (fid["selection_agreement"], -fid["relative_logit_error"])
        if self._faithful is None or faithful > self._faithful[0]:
            self._faithful = (faithful, recipe)
        return fid["selection_agreement"]

    @property
    def best(self) -> tuple[Any, Any]:
        """``(recipe, result)`` of the best candidate so far."""
        if self._best is None:
            raise ExportError(f"{self.name}: no quantization candidate was tried")
        return self._best[1], self._best[2]

    @property
    def best_unknown_passed(self) -> bool:
        """The best candidate passes the ``unknown_score`` bar (or the run has no detector)."""
        return bool(self._best and self._best[0][0])

    @property
    def most_faithful(self) -> tuple[Any, float]:
        """``(recipe, selection agreement)`` of the candidate whose logits follow fp32 best (highest
        agreement, then lowest relative error; the first such one) -- the best may be one that holds the score."""
        if self._faithful is None:
            raise ExportError(f"{self.name}: no quantization candidate was tried")
        return self._faithful[1], self._faithful[0][0]

    @property
    def best_agreement(self) -> float:
        return self._best[0][3] if self._best else 0.0

    def manifest_record(self, ctx: "ExportContext", recipe: Any, target: float) -> dict[str, Any]:
        """The ``quantization`` entry of the manifest for the chosen recipe."""
        from dataclasses import asdict

        return {**asdict(recipe), "method": recipe.describe(), "calibration_images": int(len(ctx.calibration)),
                "calibration_source": "training split, eval preprocessing", "selection_source": ctx.selection_source,
                "selection_images": int(len(ctx.selection)), "selection_target_agreement": target,
                "candidates_tried": self.tried}
