"""A stand-in executor for the scheduler's tests: slots that count steps, on a simulated clock.

Each loop pool holds ``slots`` rows; a request's rows run ``prior_steps`` / ``decoder_steps`` steps
(img2img: the ``strength`` tail, as diffusers); every step costs ``step_s`` and every one-shot call
``call_s`` of simulated time, whatever the batch. ``log`` records each call with who was in it.
"""

from __future__ import annotations

from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.work import DECODER, PRIOR, Request


def steps_run(request: Request, stage: str) -> int:
    if stage == PRIOR:
        return request.prior_steps
    if request.task == "img2img" and request.strength is not None:
        return max(1, min(int(request.decoder_steps * request.strength), request.decoder_steps))
    return request.decoder_steps


class CountingExecutor:
    def __init__(self, clock: SimulatedClock, slots: int = 2, call_rows: int = 4, step_s: float = 1.0,
                 call_s: float = 0.5) -> None:
        self.clock, self.slots, self.call_rows, self.step_s, self.call_s = clock, slots, call_rows, step_s, call_s
        self.left: dict[tuple, dict[str, int]] = {}  # pool -> request id -> steps left (in admission order)
        self.log: list[tuple] = []  # ("call"|"step"|"admit"|"release"|"discard", stage, ids)
        self.fail_next: set[str] = set()  # stages whose next call or step raises

    def pool(self, stage, request):
        if stage == DECODER:
            return ("unet_inpaint" if request.task == "inpaint" else "unet", request.height, request.width)
        return (stage,)

    def capacity(self, stage, pool):
        return self.slots if stage in (PRIOR, DECODER) else self.call_rows

    def call(self, stage, pool, requests):
        self._maybe_fail(stage)
        self.log.append(("call", stage, tuple(r.request_id for r in requests)))
        self.clock.advance(self.call_s)

    def admit(self, stage, pool, request):
        self.log.append(("admit", stage, (request.request_id,)))
        self.left.setdefault(pool, {})[request.request_id] = steps_run(request, stage)

    def step(self, stage, pool):
        self._maybe_fail(stage)
        rows = self.left[pool]
        self.log.append(("step", stage, tuple(rows)))
        self.clock.advance(self.step_s)
        for request_id in rows:
            rows[request_id] -= 1
        done = [r for r, n in rows.items() if n == 0]
        for request_id in done:
            del rows[request_id]
        return done

    def release(self, stage, pool, request_id):
        self.log.append(("release", stage, (request_id,)))
        del self.left[pool][request_id]

    def discard(self, request_id):
        self.log.append(("discard", None, (request_id,)))

    def _maybe_fail(self, stage):
        if stage in self.fail_next:
            self.fail_next.discard(stage)
            raise RuntimeError(f"{stage} failed (planted)")
