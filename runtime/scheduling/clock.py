"""The scheduler's time: the wall clock when serving, a simulated one when predicting."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds on a monotonic scale (only differences mean anything)."""


class MonotonicClock:
    """The real clock: ``time.monotonic``."""

    def now(self) -> float:
        return time.monotonic()


class SimulatedClock:
    """A clock that moves only when told: a cost-model executor advances it by each call's modelled time."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = float(start)

    def now(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds: expected >= 0, found {seconds}")
        self._now += seconds

    def advance_to(self, t: float) -> None:
        """Jump to ``t`` (an idle wait for the next arrival); never backwards."""
        self._now = max(self._now, float(t))
