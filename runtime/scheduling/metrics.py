"""The scheduler's counters: what the issue asks to export (per-stage slot occupancy, queue depth,
queue time, step time, admitted / retired / cancelled / refused counts). Plain numbers, cheap to
update on every step; :meth:`Metrics.snapshot` gives a JSON-ready dict for a metrics endpoint."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StageMetrics:
    """One stage, over all its pools. ``calls`` are steps (loop stages) or batched calls (one-shot)."""

    admitted: int = 0
    retired: int = 0
    calls: int = 0
    busy_s: float = 0.0  # time inside the executor's calls
    rows_run: int = 0  # occupied rows summed over calls
    rows_offered: int = 0  # capacity summed over calls

    @property
    def occupancy(self) -> float:
        """Mean share of the slots (or call rows) that held a request, per call."""
        return self.rows_run / self.rows_offered if self.rows_offered else 0.0

    @property
    def mean_call_s(self) -> float:
        return self.busy_s / self.calls if self.calls else 0.0


@dataclass
class Metrics:
    submitted: int = 0
    refused: int = 0
    completed: int = 0
    cancelled: int = 0
    timed_out: int = 0
    failed: int = 0
    queue_depth: int = 0  # requests waiting now (in any stage queue)
    max_queue_depth: int = 0
    queue_s_total: float = 0.0  # over requests that ended
    queue_s_max: float = 0.0
    stages: dict[str, StageMetrics] = field(default_factory=dict)

    def stage(self, name: str) -> StageMetrics:
        return self.stages.setdefault(name, StageMetrics())

    def record_call(self, stage: str, seconds: float, rows: int, capacity: int) -> None:
        s = self.stage(stage)
        s.calls += 1
        s.busy_s += seconds
        s.rows_run += rows
        s.rows_offered += capacity

    def record_queue_time(self, seconds: float) -> None:
        self.queue_s_total += seconds
        self.queue_s_max = max(self.queue_s_max, seconds)

    def set_queue_depth(self, depth: int) -> None:
        self.queue_depth = depth
        self.max_queue_depth = max(self.max_queue_depth, depth)

    def snapshot(self) -> dict:
        out = asdict(self)
        ended = self.completed + self.cancelled + self.timed_out + self.failed
        out["queue_s_mean"] = self.queue_s_total / ended if ended else 0.0
        for name, s in self.stages.items():
            out["stages"][name].update(occupancy=s.occupancy, mean_call_s=s.mean_call_s)
        return out
