"""Step-level serving: the model's requests run through one step scheduler, joining and leaving the
running batch at every step (``--scheduling step``; issue 20).

:class:`StepService` owns a :class:`~kandinsky_trt.runtime.scheduling.scheduler.Scheduler` over a
:class:`~kandinsky_trt.runtime.serve.step_executor.ComponentsExecutor` and the one worker thread
that runs it. The model's ``execute`` only decodes and submits (:meth:`StepService.submit`) and
returns; the worker answers each request through its ``reply`` (Triton's response sender) when the
request's items have all finished. Each item of a request is one scheduled request with its own
seed's draws, so its image is the Python API's for that item alone (bit for bit on CPU at the same
profile batch), whatever else shares its steps.

Bounds and leaving early:

- **Queue.** At most ``queue_limit`` requests wait in the scheduler's stage queues; past it an item
  is refused at once (:class:`~kandinsky_trt.runtime.scheduling.work.QueueFull`) and the whole
  request answered UNAVAILABLE (503) with "queue full", its other items withdrawn. Readiness stays
  true: a full queue is load, not a fault.
- **Serial items.** What the stages cannot run (``ComponentsExecutor.refusal``: the prior and
  interpolate tasks, a request with more rows than a loop's slots) runs as one pipeline call on the
  worker thread between two rounds, so it holds every loop for its duration; at most
  ``queue_limit`` such items wait.
- **Cancellation.** Every :data:`CANCEL_POLL_S` the worker asks each held request whether its client
  has gone (gRPC cancellation, or the HTTP front's mark); a gone request's items leave at the next
  step boundary and free their slots.
- **Deadline.** A request's KServe ``timeout`` parameter (microseconds) or the server's
  ``request_timeout_s``: past it, its items leave at the next step boundary (UNAVAILABLE, "timed out").
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.scheduling.scheduler import Scheduler
from kandinsky_trt.runtime.scheduling.work import (CANCELLED, DONE, TIMED_OUT, Finished, QueueFull, Request,
                                                   SchedulingError)
from kandinsky_trt.runtime.serve.calls import Pipelines, combined_request_of, image_outputs, run_item
from kandinsky_trt.runtime.serve.cancel import RequestCancelled, cancel_scope
from kandinsky_trt.runtime.serve.executor import Response, Unavailable, assemble, error_response
from kandinsky_trt.runtime.loops.template import LoopStopped
from kandinsky_trt.runtime.serve.requests import Item, RequestError, decode_request
from kandinsky_trt.runtime.serve.step_executor import ComponentsExecutor
from kandinsky_trt.runtime.serve.step_rows import scheduled_request

log = logging.getLogger(__name__)
CANCEL_POLL_S = 0.05  # how often held requests are asked whether their client has gone
IDLE_WAIT_S = 0.5  # the worker's wait for work when idle (it is woken at once by a submission)


@dataclass(eq=False)
class _Pending:
    """One model request: its items' results as they finish, answered once all are in."""

    reply: Callable[[Response], None]
    gone: Callable[[], bool]
    results: list
    scheduled: set[str] = field(default_factory=set)  # ids of its items still in the scheduler

    def done(self) -> bool:
        return all(r is not None for r in self.results)


class StepService:
    """Serves model requests on ``components`` through the step scheduler (see the module docstring)."""

    def __init__(self, components: Components, max_images: int, queue_limit: int,
                 request_timeout_s: float | None = None, on_round: Callable[["StepService", bool], None] | None = None,
                 start: bool = True) -> None:
        """``start=False``: no worker thread; the caller turns the worker by :meth:`run_once` (tests)."""
        self.pipelines = Pipelines(components)
        self.max_images, self.queue_limit, self.request_timeout_s = max_images, queue_limit, request_timeout_s
        self._start_afresh()
        self.on_round = on_round  # (service, idle) after every turn: e.g. publish the metrics (worker thread)
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._owners: dict[str, tuple[_Pending, int]] = {}  # scheduled id -> (its request, item index)
        self._pending: list[_Pending] = []
        self._serial: deque[tuple[_Pending, int, Item]] = deque()
        self._stopping = False
        self._next_poll = 0.0
        self._thread = threading.Thread(target=self._work, name="kandinsky-step-scheduler", daemon=True)
        if start:
            self._thread.start()

    # -- any thread (Triton's execute) ---------------------------------------------------------

    def submit(self, inputs: dict, gone: Callable[[], bool], reply: Callable[[Response], None],
               timeout_s: float | None = None) -> None:
        """Decode and queue one request; ``reply`` is called once, on this or the worker thread."""
        try:
            items = decode_request(inputs, self.max_images)
        except RequestError as err:
            return _send(reply, error_response(err))
        if _has_gone(gone):
            return _send(reply, error_response(RequestCancelled()))
        pending = _Pending(reply, gone, [None] * len(items))
        built = []  # checked and prepared here, outside the lock the worker takes every turn
        for index, item in enumerate(items):
            try:
                built.append((index, item, self._scheduled(item, timeout_s or self.request_timeout_s)))
            except Exception as err:  # noqa: BLE001 - this item's own error (bad arguments): the request's answer
                pending.results[index] = err
                return _send(reply, assemble(pending.results))
        with self._lock:
            if self._stopping:
                return _send(reply, error_response(Unavailable("server: shutting down; retry on another replica")))
            try:
                for index, item, request in built:
                    self._queue_item(pending, index, item, request)
            except QueueFull as err:
                self._withdraw(pending)
                return _send(reply, error_response(Unavailable(str(err))))
            if any(isinstance(r, BaseException) for r in pending.results):  # the scheduler refused an item
                self._withdraw(pending)
                return _send(reply, assemble(pending.results))
            self._pending.append(pending)
            self._wake.notify()

    def _queue_item(self, pending: _Pending, index: int, item: Item, request: Request | None) -> None:
        """Into the scheduler, or (``request`` None) the serial queue; under the lock."""
        if request is None:
            if len(self._serial) >= self.queue_limit:
                raise QueueFull(f"queue full: {self.queue_limit} requests are waiting (the limit); retry later")
            self._serial.append((pending, index, item))
            return
        try:
            self.scheduler.submit(request)
        except SchedulingError as err:
            if isinstance(err, QueueFull):
                raise
            pending.results[index] = err
            return
        pending.scheduled.add(request.request_id)
        self._owners[request.request_id] = (pending, index)

    def _scheduled(self, item: Item, timeout_s: float | None) -> Request | None:
        """The scheduler's request for ``item``; None when the stages cannot run it (serial path)."""
        if item.task not in ("text2img", "img2img", "inpaint"):
            return None
        combined = combined_request_of(self.pipelines, [item], args.rng(item.seed))
        if self.executor.refusal(item.task, combined) is not None:
            return None
        return scheduled_request(f"r{next(self._ids)}", item.task, combined, timeout_s)

    def _withdraw(self, pending: _Pending) -> None:
        """Take a refused request's queued items back (under the lock)."""
        for request_id in pending.scheduled:
            if not self.scheduler.withdraw(request_id):
                self.scheduler.cancel(request_id)
            self._owners.pop(request_id, None)
        pending.scheduled.clear()
        self._serial = deque(s for s in self._serial if s[0] is not pending)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Answer everything held UNAVAILABLE, stop the worker, free the loops."""
        with self._lock:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        else:
            self._fail_all(Unavailable("server: shutting down; retry on another replica"), restart=False)

    # -- the worker ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            try:
                if not self.run_once(wait=True):
                    break
            except Exception as err:  # noqa: BLE001 - e.g. publishing metrics failed: the worker must live on
                log.exception("step scheduler worker turn failed; answering every held request and resetting")
                self._fail_all(err)
        self._fail_all(Unavailable("server: shutting down; retry on another replica"), restart=False)

    def run_once(self, wait: bool = False) -> bool:
        """One turn of the worker: poll for gone clients (every :data:`CANCEL_POLL_S`), run one serial
        item if any, one scheduler round, publish. With ``wait``, first wait for work. False once stopping."""
        with self._lock:
            while wait and not (self._stopping or self._serial or self.scheduler.has_work):
                self._wake.wait(IDLE_WAIT_S)
            if self._stopping:
                return False
            serial = self._serial.popleft() if self._serial else None
        if time.monotonic() >= self._next_poll:
            self._poll_gone()
            self._next_poll = time.monotonic() + CANCEL_POLL_S
        try:
            if serial is not None:
                self._run_serial(*serial)
            self.scheduler.run_round()
        except Exception as err:  # noqa: BLE001 - the scheduler's own failure: answer everyone, start afresh
            log.exception("step scheduler round failed; answering every held request and resetting")
            self._fail_all(err)
        if self.on_round is not None:
            self.on_round(self, not self.scheduler.has_work)
        return True

    def _poll_gone(self) -> None:
        with self._lock:
            held = [p for p in self._pending if p.scheduled]
        for pending in held:
            if _has_gone(pending.gone):
                for request_id in list(pending.scheduled):
                    self.scheduler.cancel(request_id)

    def _run_serial(self, pending: _Pending, index: int, item: Item) -> None:
        try:
            with cancel_scope(pending.gone):
                result = run_item(self.pipelines, item)
        except LoopStopped:
            result = RequestCancelled()
        except Exception as err:  # noqa: BLE001 - this item's failure, answered to its request
            result = err
        self._settle(pending, index, result)

    def _finished(self, finished: Finished) -> None:
        """The scheduler's word on one item (worker thread)."""
        request_id = finished.request.request_id
        with self._lock:
            owner = self._owners.pop(request_id, None)
        if owner is None:
            self.executor.discard(request_id)
            return
        pending, index = owner
        pending.scheduled.discard(request_id)
        if finished.status == DONE:
            result = image_outputs(self.executor.results[request_id])
        elif finished.status == CANCELLED:
            result = RequestCancelled()
        elif finished.status == TIMED_OUT:
            result = Unavailable(f"request: timed out after {finished.request.timeout_s:g} s (its timeout); "
                                 f"it left at a step boundary")
        else:
            result = RuntimeError(finished.error or "failed")
        self.executor.discard(request_id)
        self._settle(pending, index, result)

    def _settle(self, pending: _Pending, index: int, result) -> None:
        pending.results[index] = result
        if isinstance(result, BaseException):  # the request fails as a whole: its other items leave
            for request_id in list(pending.scheduled):
                self.scheduler.cancel(request_id)
            with self._lock:
                for _, other, _ in [s for s in self._serial if s[0] is pending]:
                    pending.results[other] = RequestCancelled()
                self._serial = deque(s for s in self._serial if s[0] is not pending)
        if pending.done():
            with self._lock:
                self._pending.remove(pending)
            _send(pending.reply, assemble(pending.results))

    def _start_afresh(self) -> None:
        """Empty loops and an empty scheduler over them."""
        self.executor = ComponentsExecutor(self.pipelines.components)
        self.scheduler = Scheduler(self.executor, queue_limit=self.queue_limit, on_finish=self._finished)

    def _fail_all(self, err: BaseException, restart: bool = True) -> None:
        """Answer every held request with ``err``; with ``restart``, fresh loops and a fresh scheduler."""
        with self._lock:
            held, self._pending = self._pending, []
            self._owners.clear()
            self._serial.clear()
            self.executor.close()
            if restart:
                self._start_afresh()
        for pending in held:
            _send(pending.reply, error_response(err))


def _has_gone(gone: Callable[[], bool]) -> bool:
    """Whether a client has gone; a check that fails says nothing, so the request goes on."""
    try:
        return bool(gone())
    except Exception:  # noqa: BLE001
        log.warning("could not tell whether a client has gone; its request goes on", exc_info=True)
        return False


def _send(reply: Callable[[Response], None], response: Response) -> None:
    """Answer one request; a reply that fails (its client's stream is gone) is logged, never raised into
    the scheduler's round, where it would end the other requests' work."""
    try:
        reply(response)
    except Exception:  # noqa: BLE001
        log.warning("could not send a response (kind %s)", response.kind, exc_info=True)
