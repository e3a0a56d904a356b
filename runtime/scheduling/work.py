"""What a request asks of the scheduler, the stages it passes, and the errors it can meet."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

ENCODE, PRIOR, DECODER, DECODE = "encode", "prior", "decoder", "decode"
STAGES = (ENCODE, PRIOR, DECODER, DECODE)  # every request passes them in this order
LOOP_STAGES = frozenset({PRIOR, DECODER})  # run as slots, one step at a time; the others are one-shot calls
TASKS = ("text2img", "img2img", "inpaint")

# How a request ended (``Finished.status``).
DONE, CANCELLED, TIMED_OUT, FAILED = "done", "cancelled", "timed_out", "failed"


class SchedulingError(KandinskyTrtError):
    """A request the scheduler cannot take."""


class QueueFull(SchedulingError):
    """The bounded queue is full: the request is refused at once (the server answers UNAVAILABLE / 503)."""


class RequestTooLarge(SchedulingError, ValueError):
    """A request needs more rows than a stage's slots or calls hold: it could never be admitted."""


@dataclass(frozen=True)
class Request:
    """One generation request as the scheduler sees it (the executor reads ``payload`` too).

    Args:
        request_id: unique among the requests the scheduler holds.
        task: ``"text2img"``, ``"img2img"`` or ``"inpaint"``.
        height, width: output size in pixels (selects the profile, hence the slots).
        prior_steps, decoder_steps: requested step counts (img2img runs the tail ``strength`` of them).
        guidance_scale, prior_guidance_scale: per row; any values share a step.
        strength: img2img's share of the schedule, None elsewhere.
        rows: its images: the decoder's slots (and the MoVQ decoder's rows), all admitted together.
        prior_rows: the prior's slots when they differ from ``rows`` (a negative prompt: the prior
            also samples the negatives, ``2 * rows``); None: ``rows``. See :meth:`rows_at`.
        timeout_s: the request is dropped at the first step boundary past ``arrival + timeout_s``.
        payload: what the executor needs (prompts, images, seeds); the scheduler never reads it.
    """

    request_id: str
    task: str = "text2img"
    height: int = 512
    width: int = 512
    prior_steps: int = 25
    decoder_steps: int = 100
    guidance_scale: float = 4.0
    prior_guidance_scale: float = 4.0
    strength: float | None = None
    rows: int = 1
    prior_rows: int | None = None
    timeout_s: float | None = None
    payload: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise SchedulingError(f"task: expected one of {TASKS}, found {self.task!r}")
        counts = ("prior_steps", "decoder_steps", "rows") + (("prior_rows",) if self.prior_rows is not None else ())
        for name in counts:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise SchedulingError(f"{name}: expected an integer >= 1, found {value!r}")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise SchedulingError(f"timeout_s: expected a positive number of seconds or None, found {self.timeout_s!r}")

    def rows_at(self, stage: str) -> int:
        """Rows it holds at ``stage``: the prior's in the prior loop and in the entry call (its text
        encoder encodes them), ``rows`` in the decoder loop and the MoVQ decoder call."""
        prior = self.rows if self.prior_rows is None else self.prior_rows
        return {PRIOR: prior, ENCODE: max(prior, self.rows)}.get(stage, self.rows)

    @property
    def batch_key(self) -> tuple:
        """What request-level batching groups by (today's ``serve.batching.group_key``, less the prompts)."""
        return (self.task, self.height, self.width, self.prior_steps, self.decoder_steps, self.guidance_scale,
                self.prior_guidance_scale, self.strength, self.rows, self.prior_rows)


@dataclass(frozen=True)
class Finished:
    """How one request ended, with its times on the scheduler's clock (seconds).

    ``queue_s`` is the time it spent waiting in stage queues (not in a slot or a call).
    """

    request: Request
    status: str
    arrived_at: float
    finished_at: float
    queue_s: float
    error: str | None = None

    @property
    def latency_s(self) -> float:
        return self.finished_at - self.arrived_at


@dataclass(eq=False)
class Job:
    """The scheduler's state of one request (mutable; only the scheduler's thread touches it).

    ``place`` is where it is: ``"queued"`` in its stage's queue, ``"running"`` in a slot or a call.
    ``overtaken`` counts the requests admitted past it in its current queue (the starvation rule).
    """

    request: Request
    seq: int  # arrival order: FCFS ties and the trace
    arrived_at: float
    stage: str = ENCODE
    pool: Any = None
    place: str = "queued"
    queued_at: float = 0.0
    queue_s: float = 0.0
    overtaken: int = 0

    @property
    def rows(self) -> int:
        """Rows it holds at its current stage (:meth:`Request.rows_at`)."""
        return self.request.rows_at(self.stage)

    @property
    def deadline(self) -> float | None:
        timeout = self.request.timeout_s
        return None if timeout is None else self.arrived_at + timeout
