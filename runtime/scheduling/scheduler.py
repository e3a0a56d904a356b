"""The scheduler: one object owns the queued and running requests and moves them through the stages.

State machine of a request (:class:`~.work.Job`)::

    submit ──▶ queued(encode) ──call──▶ queued(prior) ──admit──▶ running(prior slot) ──retire──▶
    queued(decoder) ──admit──▶ running(decoder slot) ──retire──▶ queued(decode) ──call──▶ done
    (from any queued or running state, at a step boundary: cancelled | timed_out; on an executor
    error: failed; at submit, past the queue bound: refused, never queued)

One :meth:`Scheduler.run_round` is one step boundary for every pool: take the new requests, drop the
cancelled and the timed out (their slots freed), run one batched entry call, then per loop pool admit
into the free slots and run one step (retiring the rows that finished, which join the next stage's
queue at once), then one batched MoVQ decode call. So between two steps of a UNet run at most one
entry call, one step of each other pool and one decode call: decoding never holds the UNet longer
than one decode call. Who is admitted is the policy's (:mod:`.admission`); FCFS within a queue.

The queue is bounded: :meth:`submit` refuses at once (:class:`~.work.QueueFull`) when
``queue_limit`` requests are already waiting in stage queues (those in a slot or a call are not
waiting). :meth:`submit` and :meth:`cancel` may be called from any thread; ``run_round`` from one
worker thread. Given the executor, the clock and the submissions, everything is deterministic.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Hashable

from kandinsky_trt.runtime.scheduling.admission import StepLevel
from kandinsky_trt.runtime.scheduling.clock import Clock, MonotonicClock
from kandinsky_trt.runtime.scheduling.executor import Executor
from kandinsky_trt.runtime.scheduling.metrics import Metrics
from kandinsky_trt.runtime.scheduling.work import (CANCELLED, DECODE, DONE, ENCODE, FAILED, LOOP_STAGES, STAGES,
                                                   TIMED_OUT, Finished, Job, QueueFull, Request, RequestTooLarge,
                                                   SchedulingError)

log = logging.getLogger(__name__)
ONE_SHOT_ORDER = (DECODE,)  # the one-shot stage run after the loops each round (the entry call runs first)


class Scheduler:
    """Step-level (or, with ``policy=RequestLevel(n)``, request-level) scheduling over an executor.

    Args:
        executor: runs the stages (:class:`~.executor.Executor`).
        clock: the time source; a simulated clock for predictions.
        policy: :class:`~.admission.StepLevel` (default) or :class:`~.admission.RequestLevel`.
        queue_limit: most requests waiting in stage queues before :meth:`submit` refuses.
        on_finish: called on the worker thread with each :class:`~.work.Finished`.
    """

    def __init__(self, executor: Executor, clock: Clock | None = None, policy=None, queue_limit: int = 64,
                 on_finish: Callable[[Finished], None] | None = None) -> None:
        if queue_limit < 1:
            raise ValueError(f"queue_limit: expected >= 1, found {queue_limit}")
        self.executor, self.clock = executor, clock or MonotonicClock()
        self.policy, self.queue_limit, self.on_finish = policy or StepLevel(), queue_limit, on_finish
        self.metrics = Metrics()
        self.trace: list[tuple] = []  # (time, event, stage, request_id): submit/refuse/admit/retire/<end status>
        self._lock = threading.Lock()
        self._inbox: list[Job] = []
        self._cancels: set[str] = set()
        self._jobs: dict[str, Job] = {}  # accepted and not ended, in arrival order
        self._timed: dict[str, Job] = {}  # those of them with a deadline (checked at every boundary)
        self._queues: dict[tuple[str, Hashable], list[Job]] = {}  # (stage, pool) -> FCFS queue
        self._slots: dict[tuple[str, Hashable], list[Job]] = {}  # loop (stage, pool) -> jobs in its slots
        self._waiting = 0
        self._seq = 0

    # -- any thread ----------------------------------------------------------------------------

    def submit(self, request: Request, at: float | None = None) -> None:
        """Queue ``request`` (arrived at ``at``, default now).

        Raises:
            QueueFull: ``queue_limit`` requests are waiting (refused at once; counted as refused).
            RequestTooLarge: it needs more rows than some stage's pool holds.
            SchedulingError: its ``request_id`` is already held.
        """
        now = self.clock.now() if at is None else at
        with self._lock:
            if self._waiting + len(self._inbox) >= self.queue_limit:
                self.metrics.refused += 1
                self.trace.append((now, "refuse", None, request.request_id))
                raise QueueFull(f"queue full: {self.queue_limit} requests are waiting (the limit); retry later")
            if request.request_id in self._jobs or any(j.request.request_id == request.request_id for j in self._inbox):
                raise SchedulingError(f"request_id: expected a new id, found {request.request_id!r} already queued")
            self._check_fits(request)
            self._inbox.append(Job(request, self._seq, now, queued_at=now))
            self._seq += 1
            self.metrics.submitted += 1
            self.trace.append((now, "submit", None, request.request_id))

    def cancel(self, request_id: str) -> bool:
        """Ask that ``request_id`` leave at the next step boundary; False if it is not held."""
        with self._lock:
            held = request_id in self._jobs or any(j.request.request_id == request_id for j in self._inbox)
            if held:
                self._cancels.add(request_id)
            return held

    def withdraw(self, request_id: str) -> bool:
        """Take back a request not yet taken from the inbox, at once and with no ``on_finish`` (its
        submitter is the one withdrawing it, e.g. a sibling item was refused); False if it was taken
        already (then :meth:`cancel` it)."""
        with self._lock:
            waiting = [j for j in self._inbox if j.request.request_id == request_id]
            if waiting:
                self._inbox.remove(waiting[0])
                self.metrics.submitted -= 1
                self.trace.append((self.clock.now(), "withdraw", None, request_id))
            return bool(waiting)

    @property
    def has_work(self) -> bool:
        with self._lock:
            return bool(self._jobs or self._inbox)

    def occupancy(self) -> dict[str, tuple[int, int]]:
        """Per loop stage: (rows in slots now, slots of the pools used so far). Worker thread only."""
        out = {stage: (0, 0) for stage in STAGES if stage in LOOP_STAGES}
        for (stage, pool), running in self._slots.items():
            rows, slots = out[stage]
            out[stage] = (rows + sum(j.rows for j in running), slots + self.executor.capacity(stage, pool))
        return out

    def _check_fits(self, request: Request) -> None:
        for stage in STAGES:
            pool = self.executor.pool(stage, request)
            capacity = self.executor.capacity(stage, pool)
            if request.rows_at(stage) > capacity:
                raise RequestTooLarge(f"rows: expected at most {capacity} (the {stage} pool {pool!r}), "
                                      f"found {request.rows_at(stage)}")

    # -- the worker ----------------------------------------------------------------------------

    def run_round(self) -> bool:
        """One step boundary of every pool (see the module docstring); False when there was nothing to run."""
        self._drop_leavers(self._take_inbox())
        did = self._run_entry()
        for stage in (s for s in STAGES if s in LOOP_STAGES):
            for pool in self._pools(stage):
                self._admit(stage, pool)
                did |= self._step(stage, pool)
        for stage in ONE_SHOT_ORDER:
            did |= self._run_one_shot(stage, self._oldest_pool(stage), self.policy.admit)
        self.metrics.set_queue_depth(self._waiting)
        return did

    def run_until_idle(self, max_rounds: int = 1_000_000) -> None:
        """Run rounds until nothing is held (tests and simulations; a server runs rounds forever)."""
        for _ in range(max_rounds):
            if not self.has_work or not self.run_round():
                return

    def _take_inbox(self) -> set[str]:
        """The new requests into the entry queue; returns the cancellations asked meanwhile (taken in
        the same locked moment, so a cancel never refers to a request still in the inbox)."""
        with self._lock:
            arrived, self._inbox = self._inbox, []
            cancels, self._cancels = self._cancels, set()
        for job in arrived:
            self._jobs[job.request.request_id] = job
            if job.deadline is not None:
                self._timed[job.request.request_id] = job
            self._enqueue(job, ENCODE)
        return cancels

    def _drop_leavers(self, cancels: set[str]) -> None:
        for request_id in sorted(cancels & self._jobs.keys(), key=lambda r: self._jobs[r].seq):
            self._leave(self._jobs[request_id], CANCELLED)
        now = self.clock.now()
        for job in [j for j in self._timed.values() if now >= j.deadline]:
            self._leave(job, TIMED_OUT)

    def _run_entry(self) -> bool:
        pool = self._oldest_pool(ENCODE)
        if pool is None:
            return False
        in_flight = len(self._jobs) - len(self._queues[ENCODE, pool])
        entry = lambda queue, rows: self.policy.entry(queue, in_flight, rows)  # noqa: E731
        return self._run_one_shot(ENCODE, pool, entry)

    def _run_one_shot(self, stage: str, pool: Hashable, choose) -> bool:
        """One batched call of ``stage``'s ``pool`` for the jobs ``choose(queue, rows)`` picks."""
        if pool is None:
            return False
        capacity = self.executor.capacity(stage, pool)
        jobs = choose(self._queues[stage, pool], capacity)
        if not jobs:
            return False
        for job in jobs:
            self._start(job)
        start = self.clock.now()
        try:
            self.executor.call(stage, pool, [job.request for job in jobs])
        except Exception as err:  # noqa: BLE001 - an executor failure ends these requests, not the server
            log.exception("%s call failed for %d request(s)", stage, len(jobs))
            for job in jobs:
                self._leave(job, FAILED, f"{stage}: {err}")
            return True
        self.metrics.record_call(stage, self.clock.now() - start, sum(j.rows for j in jobs), capacity)
        for job in jobs:
            self._retire(job)
        return True

    def _admit(self, stage: str, pool: Hashable) -> None:
        running = self._slots.setdefault((stage, pool), [])
        free = self.executor.capacity(stage, pool) - sum(j.rows for j in running)
        queue = self._queues.get((stage, pool), [])
        for job in self.policy.admit(queue, free) if queue and free > 0 else []:
            self._start(job)
            try:
                self.executor.admit(stage, pool, job.request)
            except Exception as err:  # noqa: BLE001
                log.exception("%s admit failed for %s", stage, job.request.request_id)
                self._leave(job, FAILED, f"{stage} admit: {err}")
                continue
            running.append(job)

    def _step(self, stage: str, pool: Hashable) -> bool:
        running = self._slots.get((stage, pool))
        if not running:
            return False
        start = self.clock.now()
        try:
            done = self.executor.step(stage, pool)
        except Exception as err:  # noqa: BLE001 - the pool's rows are lost; its slots are released
            log.exception("%s step failed", stage)
            for job in list(running):
                self._leave(job, FAILED, f"{stage} step: {err}")
            return True
        capacity = self.executor.capacity(stage, pool)
        self.metrics.record_call(stage, self.clock.now() - start, sum(j.rows for j in running), capacity)
        by_id = {job.request.request_id: job for job in running}
        for request_id in done:
            job = by_id[request_id]
            running.remove(job)
            self._retire(job)
        return True

    # -- moves ---------------------------------------------------------------------------------

    def _enqueue(self, job: Job, stage: str) -> None:
        pool = self.executor.pool(stage, job.request)
        job.stage, job.pool, job.place, job.queued_at, job.overtaken = stage, pool, "queued", self.clock.now(), 0
        self._queues.setdefault((stage, pool), []).append(job)
        with self._lock:
            self._waiting += 1

    def _dequeue(self, job: Job) -> None:
        self._queues[job.stage, job.pool].remove(job)
        job.queue_s += self.clock.now() - job.queued_at
        with self._lock:
            self._waiting -= 1

    def _start(self, job: Job) -> None:
        self._dequeue(job)
        job.place = "running"
        self.metrics.stage(job.stage).admitted += 1
        self.trace.append((self.clock.now(), "admit", job.stage, job.request.request_id))

    def _retire(self, job: Job) -> None:
        """``job`` finished its stage: into the next stage's queue, or done."""
        self.metrics.stage(job.stage).retired += 1
        self.trace.append((self.clock.now(), "retire", job.stage, job.request.request_id))
        following = STAGES.index(job.stage) + 1
        if following == len(STAGES):
            self._end(job, DONE)
        else:
            self._enqueue(job, STAGES[following])

    def _leave(self, job: Job, status: str, error: str | None = None) -> None:
        """``job`` leaves early: out of its queue or its slots, its kept results dropped."""
        if job.place == "queued":
            self._dequeue(job)
        elif job.stage in LOOP_STAGES and job in self._slots.get((job.stage, job.pool), []):
            self._slots[job.stage, job.pool].remove(job)
            self.executor.release(job.stage, job.pool, job.request.request_id)
        self.executor.discard(job.request.request_id)
        self._end(job, status, error)

    def _end(self, job: Job, status: str, error: str | None = None) -> None:
        del self._jobs[job.request.request_id]
        self._timed.pop(job.request.request_id, None)
        counter = {DONE: "completed", CANCELLED: "cancelled", TIMED_OUT: "timed_out", FAILED: "failed"}[status]
        setattr(self.metrics, counter, getattr(self.metrics, counter) + 1)
        self.metrics.record_queue_time(job.queue_s)
        now = self.clock.now()
        self.trace.append((now, status, job.stage, job.request.request_id))
        if self.on_finish is not None:
            self.on_finish(Finished(job.request, status, job.arrived_at, now, job.queue_s, error))

    # -- pools ---------------------------------------------------------------------------------

    def _pools(self, stage: str) -> list[Hashable]:
        """``stage``'s pools that hold or await work, in the order they were first used (deterministic)."""
        seen = dict.fromkeys(p for s, p in self._queues if s == stage)
        seen.update(dict.fromkeys(p for s, p in self._slots if s == stage))
        return list(seen)

    def _oldest_pool(self, stage: str) -> Hashable | None:
        """The pool of ``stage`` whose oldest waiting job arrived first (one call per round: FCFS across pools)."""
        heads = [(q[0].seq, pool) for (s, pool), q in self._queues.items() if s == stage and q]
        return min(heads, key=lambda h: h[0])[1] if heads else None
