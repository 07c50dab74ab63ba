"""Where a run's wall time goes: seconds per step, in the order the steps ran.

``fieldid train`` records them in ``run.json`` (``extra.seconds_by_step``) and logs them in one line;
``fieldid bench real`` prints them beside the reference's time, so a time goal that is missed says
which step to look at.
"""
from __future__ import annotations

import time

__all__ = ["StepClock", "format_steps"]


def format_steps(steps: dict[str, float]) -> str:
    """``"decode 5 s, head phase 8 s, ..."`` in whole seconds; a step that rounds to 0 reads ``<1 s``.

    Example:
        >>> format_steps({"read photos": 0.5, "fine-tune": 1.5, "samples": 0.04})
        'read photos <1 s, fine-tune 2 s, samples <1 s'
    """
    return ", ".join(f"{k} {v:.0f} s" if round(v) >= 1 else f"{k} <1 s" for k, v in steps.items())


class StepClock:
    """Laps of one wall clock: each :meth:`lap` closes a named step at the time since the previous one.

    Example:
        >>> clock = StepClock()
        >>> clock.lap("decode") >= 0.0
        True
        >>> list(clock.steps)
        ['decode']
    """

    def __init__(self) -> None:
        self._start = self._last = time.perf_counter()
        self.steps: dict[str, float] = {}

    def lap(self, step: str) -> float:
        """Close ``step`` and return its seconds (a step named twice adds up)."""
        now = time.perf_counter()
        secs = now - self._last
        self._last = now
        self.steps[step] = self.steps.get(step, 0.0) + secs
        return secs

    @property
    def total(self) -> float:
        return time.perf_counter() - self._start

    def rounded(self) -> dict[str, float]:
        return {k: round(v, 1) for k, v in self.steps.items()}

    def summary(self) -> str:
        """The steps so far, as :func:`format_steps` writes them."""
        return format_steps(self.steps)
