"""The int8 recipe search's choice: the unknown check first, then logits at target, then fidelity."""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pytest

from fieldid.export.recipes import RecipeSearch


@dataclass
class _Recipe:
    name: str

    def describe(self) -> str:
        return self.name


def _logits(flips: int, n: int = 100, noise: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(n, 4)).astype(np.float32)
    ref[np.arange(n), ref.argmax(1)] += 2.0
    got = ref + noise
    for i in range(flips):  # swap the top two classes of image i
        top = np.argsort(-ref[i])[:2]
        got[i, top] = ref[i, top[::-1]]
    return got, ref


def _unknown(passed: bool, agreement: float, median: float = 0.1, clear: float | None = None) -> dict:
    return {"passed": passed, "clear_agreement": agreement if clear is None else clear,
            "decision_agreement": agreement, "median_diff_over_threshold": median}


def test_a_candidate_that_passes_the_unknown_check_beats_better_logits() -> None:
    s = RecipeSearch("t", 0.99)
    perfect, ref = _logits(0)
    one_flip, _ = _logits(1)
    s.add(_Recipe("small"), perfect, ref, time.time(), "small", unknown=_unknown(False, 0.90))
    s.add(_Recipe("larger"), one_flip, ref, time.time(), "larger", unknown=_unknown(True, 0.98))
    assert s.best[1] == "larger" and s.best_agreement == 0.99 and s.best_unknown_passed
    assert [t["unknown_selection"]["passed"] for t in s.tried] == [False, True]


def test_when_none_passes_logits_at_the_bar_come_first_then_closeness_to_the_score_bar() -> None:
    s = RecipeSearch("t", 0.995, bar=0.99)
    perfect, ref = _logits(0)
    one_flip, _ = _logits(1)  # 99%: at the bar, under the selection target
    five_flips, _ = _logits(5)
    s.add(_Recipe("bad logits, close score"), five_flips, ref, time.time(), "a",
          unknown=_unknown(False, 0.99, median=0.21, clear=1.0))
    s.add(_Recipe("full int8"), perfect, ref, time.time(), "b", unknown=_unknown(False, 0.93, median=0.30, clear=0.95))
    assert s.best[1] == "b" and not s.best_unknown_passed  # logits below the bar lose, whatever their score
    # At the bar, two of the score's three parts met (clear 100%, all 99%, median 0.2003 > 0.20) beat none met.
    s.add(_Recipe("stem in fp32"), one_flip, ref, time.time(), "c", unknown=_unknown(False, 0.99, median=0.2003, clear=1.0))
    assert s.best[1] == "c"
    # As many parts met, the smaller median wins; perfect logits do not outrank it.
    s.add(_Recipe("feature conv"), perfect, ref, time.time(), "d", unknown=_unknown(False, 0.99, median=0.28, clear=1.0))
    assert s.best[1] == "c" and s.best_agreement == 0.99


@pytest.mark.parametrize("first, second, winner", [
    # Logits at the target beat logits at the bar, whatever the medians.
    ((1, 0.05), (0, 0.15), "b"),
    # Both under the target: the more faithful logits win; a passed score's median does not rank them.
    ((2, 0.15), (4, 0.05), "a"),
])
def test_candidates_that_pass_the_score_are_ranked_by_their_logits(first, second, winner) -> None:
    s = RecipeSearch("t", 0.995, bar=0.99)
    for name, (flips, median) in zip("ab", (first, second)):
        logits, ref = _logits(flips)
        s.add(_Recipe(f"{100 - flips}%"), logits, ref, time.time(), name, unknown=_unknown(True, 1.0, median=median))
    assert s.best[1] == winner


def test_without_a_detector_the_lower_logit_error_breaks_ties() -> None:
    s = RecipeSearch("t", 0.99)
    close, ref = _logits(0, noise=0.01)
    far, _ = _logits(0, noise=0.2)
    s.add(_Recipe("far"), far, ref, time.time(), "far")
    s.add(_Recipe("close"), close, ref, time.time(), "close")
    assert s.best[1] == "close" and "unknown_selection" not in s.tried[0]
