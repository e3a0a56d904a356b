"""The step scheduler's metrics on Triton's ``/metrics`` (custom metric families of the Python backend).

Families (``stage`` is ``encode``, ``prior``, ``decoder`` or ``decode``):

- ``kandinsky_sched_requests_total{event}``: submitted, refused (queue full), completed, cancelled,
  timed_out, failed: counters.
- ``kandinsky_sched_rows_total{stage,event}``: admitted, retired: counters.
- ``kandinsky_sched_calls_total{stage}``, ``kandinsky_sched_busy_seconds_total{stage}``: steps (or
  one-shot calls) and the time inside them; their rates' ratio is the mean step time.
- ``kandinsky_sched_rows_run_total{stage}``, ``kandinsky_sched_rows_offered_total{stage}``: occupied
  and offered rows summed over calls; their rates' ratio is the slot occupancy over any window.
- ``kandinsky_sched_slots_occupied{stage}``, ``kandinsky_sched_slots{stage}``: loop stages' rows in
  slots now, and their slots (gauges).
- ``kandinsky_sched_queue_depth``: requests waiting in stage queues now (gauge);
  ``kandinsky_sched_queue_seconds_total`` and ``kandinsky_sched_ended_total``: queue time summed over
  ended requests, and their count (mean queue time = ratio of rates).

Every metric also carries ``instance`` (the Triton model instance: each has its own scheduler, so
gauges of two instances must not overwrite each other; sum over it for the model). Counters only go
up: each publish adds the difference from the last snapshot. Published from the scheduler's worker
thread at most every :data:`PUBLISH_INTERVAL_S`, and at once when the work runs out.
"""

from __future__ import annotations

import time

PUBLISH_INTERVAL_S = 0.25
REQUEST_EVENTS = ("submitted", "refused", "completed", "cancelled", "timed_out", "failed")
# Metrics snapshot key -> (family, its event label or None)
STAGE_COUNTERS = {"admitted": ("rows", "admitted"), "retired": ("rows", "retired"), "calls": ("calls", None),
                  "busy_s": ("busy_seconds", None), "rows_run": ("rows_run", None),
                  "rows_offered": ("rows_offered", None)}
STAGES = ("encode", "prior", "decoder", "decode")
LOOP_STAGES = ("prior", "decoder")


class TritonStepMetrics:
    """Publishes a :class:`~kandinsky_trt.runtime.scheduling.metrics.Metrics` to Triton's metric families."""

    def __init__(self, pb_utils, instance: str) -> None:
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        family = lambda name, kind, text: pb_utils.MetricFamily(name=name, description=text, kind=kind)  # noqa: E731
        # Families must outlive their metrics: kept on self.
        self.families = {
            "requests": family("kandinsky_sched_requests_total", counter, "step scheduler: requests by event"),
            "rows": family("kandinsky_sched_rows_total", counter, "step scheduler: rows admitted/retired per stage"),
            "calls": family("kandinsky_sched_calls_total", counter, "step scheduler: steps or calls per stage"),
            "busy_seconds": family("kandinsky_sched_busy_seconds_total", counter,
                                   "step scheduler: seconds inside each stage's steps or calls"),
            "rows_run": family("kandinsky_sched_rows_run_total", counter,
                               "step scheduler: occupied rows summed over steps or calls"),
            "rows_offered": family("kandinsky_sched_rows_offered_total", counter,
                                   "step scheduler: offered rows (slots) summed over steps or calls"),
            "occupied": family("kandinsky_sched_slots_occupied", gauge, "step scheduler: rows in slots now"),
            "slots": family("kandinsky_sched_slots", gauge, "step scheduler: slots of the loops in use"),
            "depth": family("kandinsky_sched_queue_depth", gauge, "step scheduler: requests waiting now"),
            "queue_seconds": family("kandinsky_sched_queue_seconds_total", counter,
                                    "step scheduler: seconds waited in stage queues, over ended requests"),
            "ended": family("kandinsky_sched_ended_total", counter, "step scheduler: requests that ended"),
        }
        f, mine = self.families, {"instance": instance}
        self.requests = {e: f["requests"].Metric(labels={**mine, "event": e}) for e in REQUEST_EVENTS}
        self.stage = {(key, stage): f[name].Metric(labels={**mine, "stage": stage, **({"event": e} if e else {})})
                      for key, (name, e) in STAGE_COUNTERS.items() for stage in STAGES}
        self.occupied = {s: f["occupied"].Metric(labels={**mine, "stage": s}) for s in LOOP_STAGES}
        self.slots = {s: f["slots"].Metric(labels={**mine, "stage": s}) for s in LOOP_STAGES}
        self.depth = f["depth"].Metric(labels=mine)
        self.queue_seconds = f["queue_seconds"].Metric(labels=mine)
        self.ended = f["ended"].Metric(labels=mine)
        self._last: dict = {}
        self._published_at = 0.0

    def publish(self, snapshot: dict, occupancy: dict[str, tuple[int, int]], force: bool = False) -> None:
        """Counters advance by what changed since the last publish; gauges are set."""
        now = time.monotonic()
        if not force and now - self._published_at < PUBLISH_INTERVAL_S:
            return
        self._published_at = now
        for event in REQUEST_EVENTS:
            self._add(self.requests[event], ("requests", event), snapshot[event])
        for (key, stage), metric in self.stage.items():
            self._add(metric, (key, stage), snapshot["stages"].get(stage, {}).get(key, 0))
        ended = sum(snapshot[e] for e in ("completed", "cancelled", "timed_out", "failed"))
        self._add(self.ended, ("ended",), ended)
        self._add(self.queue_seconds, ("queue_seconds",), snapshot["queue_s_total"])
        self.depth.set(snapshot["queue_depth"])
        for stage in LOOP_STAGES:
            rows, slots = occupancy.get(stage, (0, 0))
            self.occupied[stage].set(rows)
            self.slots[stage].set(slots)

    def _add(self, metric, key: tuple, total: float) -> None:
        last = self._last.get(key, 0)
        delta = total - last if total >= last else total  # below the last: a fresh scheduler counts from 0
        if delta > 0:
            metric.increment(delta)
        self._last[key] = total
