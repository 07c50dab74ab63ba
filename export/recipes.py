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


class RecipeSearch:
    """Keeps the most faithful int8 candidate: highest top-1 agreement, then lowest relative error.

    Top-1 agreement alone is too coarse on a few hundred images (two recipes can both reach
    100% there and still differ on the test split), so ties go to :func:`fidelity`'s error.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.tried: list[dict[str, Any]] = []
        self._best: tuple[tuple[float, float], Any, Any] | None = None

    def add(self, recipe: Any, logits: np.ndarray, ref: np.ndarray, started: float, result: Any) -> float:
        """Score one candidate (``recipe.describe()``); ``result`` is kept if it is the best. Returns its agreement."""
        fid = fidelity(logits, ref)
        self.tried.append({"recipe": recipe.describe(), **fid, "seconds": round(time.time() - started, 1)})
        log.info("%s candidate %-62s selection agreement %.4f, relative logit error %.4f", self.name,
                 recipe.describe(), fid["selection_agreement"], fid["relative_logit_error"])
        score = (fid["selection_agreement"], -fid["relative_logit_error"])
        if self._best is None or score > self._best[0]:
            self._best = (score, recipe, result)
        return fid["selection_agreement"]

    @property
    def best(self) -> tuple[Any, Any]:
        """``(recipe, result)`` of the best candidate so far."""
        if self._best is None:
            raise ExportError(f"{self.name}: no quantization candidate was tried")
        return self._best[1], self._best[2]

    @property
    def best_agreement(self) -> float:
        return self._best[0][0] if self._best else 0.0

    def manifest_record(self, ctx: "ExportContext", recipe: Any, target: float) -> dict[str, Any]:
        """The ``quantization`` entry of the manifest for the chosen recipe."""
        from dataclasses import asdict

        return {**asdict(recipe), "method": recipe.describe(), "calibration_images": int(len(ctx.calibration)),
                "calibration_source": "training split, eval preprocessing", "selection_source": ctx.selection_source,
                "selection_images": int(len(ctx.selection)), "selection_target_agreement": target,
                "candidates_tried": self.tried}
