"""Contenders timed round by round: every side-by-side figure the project publishes comes from here.

A benchmark that times contender A for all its samples and then contender B lets a change of
machine load between the two move the ratio (on a shared machine a full-size UNet measured 0.85x
that way and 2.75x interleaved). :func:`interleave` runs the contenders in turn within each round
(A, B, A, B, ...), so a drift hits every contender alike; the ratio of each round
(``report.with_baseline_ratios(..., interleaved=True)``) then shows how far one figure can be trusted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping

from kandinsky_trt.benchmarks.environment import peak_host_rss_mb, reset_peak_host_rss


@dataclass(frozen=True)
class Timed:
    """One contender's samples (milliseconds, one per round, in round order) and its peak host RSS
    (MB, the largest after any of its calls; the process-wide peak where it cannot be reset)."""

    samples_ms: tuple[float, ...]
    peak_host_rss_mb: float


def interleave(contenders: Mapping[str, Callable[[], object]], rounds: int, warmup: int = 1,
               clock: Callable[[], float] = time.perf_counter) -> dict[str, Timed]:
    """``warmup`` untimed calls of each contender in turn, then ``rounds`` rounds in which each
    contender is called once, in the mapping's order. Returns each contender's :class:`Timed`."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    peaks = dict.fromkeys(names, 0.0)
    for _ in range(rounds):
        for name in names:
            reset_peak_host_rss()
            start = clock()
            contenders[name]()
            samples[name].append((clock() - start) * 1e3)
            peaks[name] = max(peaks[name], peak_host_rss_mb())
    return {name: Timed(tuple(samples[name]), peaks[name]) for name in names}

