"""The step scheduler on a simulated GPU: a cost-model executor and a simulated clock (issue 20, item 6).

This is a *model*, not a measurement. The scheduler is the served one
(:class:`kandinsky_trt.runtime.scheduling.scheduler.Scheduler`, unchanged); what is simulated is the
hardware under it: :class:`SimulatedExecutor` keeps the slots' bookkeeping (steps left per row) and
advances a :class:`SimulatedClock` by each call's modelled time, taken from a :class:`RooflineCost`:

    t(network, rows) = overhead_s + max(rows * flop / (compute_efficiency * peak_flop_per_s),
                                        (weight_bytes + rows * io_bytes) / (bandwidth_efficiency * bytes_per_s))

with the per-network FLOPs and bytes of one image row (classifier-free guidance's doubled batch
included) counted by ``benchmarks/flops.py`` and the device peaks of ``benchmarks/gpu_specs.py``.
``rows`` is the *profile* batch the call runs at (static shapes: an empty slot costs what a full one
costs): a loop of slots runs at its slot count; request-level groups and one-shot calls run at the
smallest built batch that holds them (``profile_batches``).

Torch-free: the costs come in as numbers (``step_batching_sim.py`` counts them); tests drive it with
constant costs.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Hashable, Sequence

from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.scheduler import Scheduler
from kandinsky_trt.runtime.scheduling.work import DECODE, DECODER, PRIOR, Finished, QueueFull, Request

LOOP_NETWORK = {PRIOR: "prior", DECODER: "unet"}


def steps_run(request: Request, stage: str) -> int:
    """Steps a row runs in a loop stage: img2img runs the ``strength`` tail of its schedule (diffusers'
    ``int(steps * strength)``, at least one)."""
    if stage == PRIOR:
        return request.prior_steps
    if request.task == "img2img" and request.strength is not None:
        return max(1, min(int(request.decoder_steps * request.strength), request.decoder_steps))
    return request.decoder_steps


@dataclass(frozen=True)
class NetworkFloor:
    """One image row of one network call: FLOPs, bytes read once per call, bytes per row of I/O."""

    gflop: float
    weight_bytes: int
    io_bytes: int


@dataclass(frozen=True)
class RooflineCost:
    """Modelled seconds of each call (see the module docstring); the assumptions are the fields."""

    floors: dict[str, NetworkFloor]
    peak_flop_per_s: float
    bytes_per_s: float
    compute_efficiency: float = 0.30
    bandwidth_efficiency: float = 0.60
    overhead_s: float = 50e-6  # per network call: graph launch, per-row input copies, the scheduler round
    profile_batches: tuple[int, ...] = (1, 2, 4, 8)
    # (batch, compute efficiency) from that batch up, overriding compute_efficiency: small batches
    # fill the GPU worse. None: one efficiency at every batch.
    batch_efficiency: tuple[tuple[int, float], ...] | None = None

    def efficiency(self, rows: int) -> float:
        if not self.batch_efficiency:
            return self.compute_efficiency
        return [e for b, e in sorted(self.batch_efficiency) if b <= rows or b == min(self.batch_efficiency)[0]][-1]

    def network_s(self, network: str, rows: int) -> float:
        if rows == 0:
            return 0.0
        f = self.floors[network]
        compute = rows * f.gflop * 1e9 / (self.efficiency(rows) * self.peak_flop_per_s)
        memory = (f.weight_bytes + rows * f.io_bytes) / (self.bandwidth_efficiency * self.bytes_per_s)
        return self.overhead_s + max(compute, memory)

    def fit(self, rows: int) -> int:
        """The smallest built profile batch holding ``rows`` (rows past the largest: several calls' worth)."""
        largest = max(self.profile_batches)
        fitting = [b for b in self.profile_batches if b >= rows]
        return min(fitting) if fitting else largest * math.ceil(rows / largest)

    def call_s(self, stage: str, requests: Sequence[Request]) -> float:
        """A one-shot call: the two text encoders (+ the MoVQ encoder for init images), or the MoVQ decoder."""
        rows = self.fit(sum(r.rows for r in requests))
        if stage == DECODE:
            return self.network_s("movq_decoder", rows)
        prior_rows = self.fit(sum(r.rows_at(PRIOR) for r in requests))  # with a negative prompt, 2 per image
        images = sum(r.rows for r in requests if r.task != "text2img")
        return (self.network_s("text_encoder", rows) + self.network_s("prior_text_encoder", prior_rows)
                + self.network_s("movq_encoder", self.fit(images) if images else 0))

    def step_s(self, stage: str, pool: Hashable, rows: int) -> float:
        network = pool[0] if stage == DECODER else LOOP_NETWORK[stage]
        return self.network_s(network, rows) + self.overhead_s  # + the step graph's launch (elementwise)


@dataclass(frozen=True)
class ConstantCost:
    """Fixed seconds per step and per call, whatever the batch (tests, the trace pin)."""

    step: float = 1.0
    call: float = 0.5

    def fit(self, rows: int) -> int:
        return rows

    def call_s(self, stage, requests) -> float:
        return self.call

    def step_s(self, stage, pool, rows) -> float:
        return self.step


class SimulatedExecutor:
    """An :class:`~kandinsky_trt.runtime.scheduling.executor.Executor` whose calls only take modelled time.

    Args:
        clock: advanced by each call's cost.
        cost: :class:`RooflineCost` or :class:`ConstantCost`.
        slots: slots of every loop pool; one-shot calls hold as many rows.
        loop_batch: ``"slots"``: a step costs the loop's profile batch (the loop of slots as built);
            ``"fit"``: the smallest profile batch holding the occupied rows (a request-level group
            run as one chunk at the profile that fits it).
    """

    def __init__(self, clock: SimulatedClock, cost, slots: int = 8, loop_batch: str = "slots") -> None:
        if loop_batch not in ("slots", "fit"):
            raise ValueError(f"loop_batch: expected 'slots' or 'fit', found {loop_batch!r}")
        self.clock, self.cost, self.slots, self.loop_batch = clock, cost, slots, loop_batch
        self._left: dict[Hashable, dict[str, list[int]]] = {}  # pool -> id -> [steps left, rows]

    def pool(self, stage: str, request: Request) -> Hashable:
        size = (request.height, request.width)
        if stage == DECODER:
            return ("unet_inpaint" if request.task == "inpaint" else "unet", *size)
        return (stage, *size) if stage == DECODE else (stage,)

    def capacity(self, stage: str, pool: Hashable) -> int:
        return self.slots

    def call(self, stage: str, pool: Hashable, requests: Sequence[Request]) -> None:
        self.clock.advance(self.cost.call_s(stage, requests))

    def admit(self, stage: str, pool: Hashable, request: Request) -> None:
        self._left.setdefault(pool, {})[request.request_id] = [steps_run(request, stage), request.rows_at(stage)]

    def step(self, stage: str, pool: Hashable) -> list[str]:
        rows = self._left[pool]
        occupied = sum(r for _, r in rows.values())
        batch = self.slots if self.loop_batch == "slots" else self.cost.fit(occupied)
        self.clock.advance(self.cost.step_s(stage, pool, batch))
        for entry in rows.values():
            entry[0] -= 1
        done = [request_id for request_id, (left, _) in rows.items() if left == 0]
        for request_id in done:
            del rows[request_id]
        return done

    def release(self, stage: str, pool: Hashable, request_id: str) -> None:
        del self._left[pool][request_id]

    def discard(self, request_id: str) -> None:
        pass  # nothing is kept between stages


# -- the workload and the run ----------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Open-loop Poisson arrivals of one size; each request's classes drawn uniformly."""

    rate_per_s: float
    requests: int
    seed: int = 0
    decoder_steps: tuple[int, ...] = (10, 25, 50, 100)
    prior_steps: tuple[int, ...] = (5, 25)
    tasks: tuple[str, ...] = ("text2img", "img2img")
    strength: float = 0.3  # img2img (diffusers' default)
    size: tuple[int, int] = (512, 512)


def arrivals(w: Workload) -> list[tuple[float, Request]]:
    rng, t, out = random.Random(w.seed), 0.0, []
    for i in range(w.requests):
        t += rng.expovariate(w.rate_per_s)
        task = rng.choice(w.tasks)
        out.append((t, Request(f"r{i}", task=task, height=w.size[0], width=w.size[1],
                               prior_steps=rng.choice(w.prior_steps), decoder_steps=rng.choice(w.decoder_steps),
                               strength=w.strength if task == "img2img" else None)))
    return out


@dataclass
class SimRun:
    finished: list[Finished]
    refused: list[str]
    scheduler: Scheduler
    end_s: float
    trace: list[tuple] = field(default_factory=list)


def simulate(schedule: Sequence[tuple[float, Request]], executor: SimulatedExecutor, policy,
             queue_limit: int = 1024) -> SimRun:
    """Drive the scheduler with ``schedule`` (arrival time, request) on the executor's simulated clock.

    Requests that arrived during a call are submitted, at their arrival times, at the next boundary
    (what a server's submit threads would have queued meanwhile); when nothing can run the clock
    jumps to the next arrival.
    """
    clock, finished, refused = executor.clock, [], []
    scheduler = Scheduler(executor, clock, policy, queue_limit=queue_limit, on_finish=finished.append)
    i = 0
    while i < len(schedule) or scheduler.has_work:
        while i < len(schedule) and schedule[i][0] <= clock.now():
            try:
                scheduler.submit(schedule[i][1], at=schedule[i][0])
            except QueueFull:
                refused.append(schedule[i][1].request_id)
            i += 1
        if not scheduler.run_round():
            if i == len(schedule) and scheduler.has_work:
                raise RuntimeError("the scheduler holds requests but ran nothing (a scheduling bug)")
            if i < len(schedule):
                clock.advance_to(schedule[i][0])
    return SimRun(finished, refused, scheduler, clock.now(), scheduler.trace)
