"""Who goes in: step-level admission (any row into any free slot) and request-level batching (today's).

Both answer two questions over a queue in FCFS order (a list of :class:`Job`, oldest first):
``entry``: which waiting requests start (the first stage's call), ``admit``: which queued jobs go into
the free slots of a loop pool (or into one call of a one-shot pool).

Starvation. Within a queue, admission is FCFS with bounded backfill: a job whose rows do not fit the
free slots may be passed by later jobs that fit, at most ``max_overtakes`` times; once a job has been
passed that often, nobody behind it is admitted until it fits (the slots it needs drain, since every
admitted row ends within its own step count). Between queues nothing starves: each scheduler round
gives every pool with work one call or one step. With one row per request (the served case) nothing
is ever passed and the rule is plain FCFS.
"""

from __future__ import annotations

from typing import Sequence

from kandinsky_trt.runtime.scheduling.work import Job


def fcfs_backfill(queue: Sequence[Job], free: int, max_overtakes: int) -> list[Job]:
    """The jobs of ``queue`` admitted into ``free`` rows, FCFS, passing a job that does not fit at
    most ``max_overtakes`` times (each pass is counted on the passed job)."""
    chosen, passed = [], []
    for job in queue:
        if any(p.overtaken >= max_overtakes for p in passed):
            break  # a job has been passed enough: keep the slots draining for it
        if job.rows <= free:
            chosen.append(job)
            free -= job.rows
            for p in passed:
                p.overtaken += 1
        else:
            passed.append(job)
        if free == 0:
            break
    return chosen


class StepLevel:
    """Step-level batching: every request starts at once (batched into the next first-stage call) and
    every free slot is refilled at every step boundary, FCFS with bounded backfill."""

    name = "step-level"

    def __init__(self, max_overtakes: int = 4) -> None:
        if max_overtakes < 0:
            raise ValueError(f"max_overtakes: expected >= 0, found {max_overtakes}")
        self.max_overtakes = max_overtakes

    def entry(self, queue: Sequence[Job], in_flight: int, rows: int) -> list[Job]:
        return fcfs_backfill(queue, rows, self.max_overtakes)

    def admit(self, queue: Sequence[Job], free: int) -> list[Job]:
        return fcfs_backfill(queue, free, self.max_overtakes)


class RequestLevel:
    """Request-level batching, as ``serve.batching`` does it: when nothing is in flight, the oldest
    request and the waiting ones with its :attr:`Request.batch_key` (up to ``max_rows`` rows, FCFS)
    start together and run to the end; everything else waits. ``max_rows=1``: no batching."""

    def __init__(self, max_rows: int) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows: expected >= 1, found {max_rows}")
        self.max_rows = max_rows
        self.name = "no batching" if max_rows == 1 else "request-level"

    def entry(self, queue: Sequence[Job], in_flight: int, rows: int) -> list[Job]:
        if in_flight or not queue:
            return []
        key, free = queue[0].request.batch_key, min(rows, self.max_rows)
        group = []
        for job in queue:
            if job.request.batch_key == key and job.rows <= free:
                group.append(job)
                free -= job.rows
        return group

    def admit(self, queue: Sequence[Job], free: int) -> list[Job]:
        # only one group is in flight and it was sized to fit: plain FCFS
        return fcfs_backfill(queue, free, 0)
