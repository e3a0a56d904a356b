"""The recorded scheduler trace that pins the simulator to the scheduler (tests/test_step_batching_sim.py).

``record()`` runs the served scheduler on the step-counting stand-in executor (tests/fakes) with
arrivals submitted at their times, and returns the arrivals and the events in order; the committed
copy is ``golden/step_scheduler_trace.json`` (rewrite it with ``python tests/scheduling_trace.py``
only when a scheduling change is meant to change the order).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fakes.scheduling import CountingExecutor

from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.scheduler import Scheduler
from kandinsky_trt.runtime.scheduling.work import QueueFull, Request

TRACE = Path(__file__).parent / "golden" / "step_scheduler_trace.json"
SLOTS, STEP_S, CALL_S, QUEUE_LIMIT = 2, 1.0, 0.5, 6


def arrivals(n: int = 24, seed: int = 7) -> list[dict]:
    rng, t, out = random.Random(seed), 0.0, []
    for i in range(n):
        t += round(rng.expovariate(0.6), 3)
        task = rng.choice(["text2img", "img2img", "inpaint"])
        out.append({"t": round(t, 3), "request_id": f"r{i}", "task": task, "decoder_steps": rng.choice([3, 5, 10]),
                    "prior_steps": rng.choice([1, 2]), "strength": 0.5 if task == "img2img" else None})
    return out


def request(a: dict) -> Request:
    return Request(a["request_id"], task=a["task"], decoder_steps=a["decoder_steps"], prior_steps=a["prior_steps"],
                   strength=a["strength"])


def events(trace: list[tuple]) -> list[list]:
    """The trace without submissions: [time, event, stage, request_id] (refusals, admissions, retirements, ends)."""
    return [[round(t, 6), e, s, r] for t, e, s, r in trace if e != "submit"]


def record(schedule: list[dict]) -> list[list]:
    clock = SimulatedClock()
    scheduler = Scheduler(CountingExecutor(clock, slots=SLOTS, call_rows=SLOTS, step_s=STEP_S, call_s=CALL_S), clock,
                          queue_limit=QUEUE_LIMIT)
    pending = list(schedule)
    while pending or scheduler.has_work:
        while pending and pending[0]["t"] <= clock.now():
            a = pending.pop(0)
            try:
                scheduler.submit(request(a), at=a["t"])
            except QueueFull:
                pass
        if not scheduler.run_round() and pending:
            clock.advance_to(pending[0]["t"])
    return events(scheduler.trace)


if __name__ == "__main__":
    schedule = arrivals()
    TRACE.write_text(json.dumps({"slots": SLOTS, "step_s": STEP_S, "call_s": CALL_S, "queue_limit": QUEUE_LIMIT,
                                 "arrivals": schedule, "events": record(schedule)}, indent=0) + "\n")
    print(TRACE)
