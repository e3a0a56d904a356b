"""Stop a generation whose client has gone, at the next denoising step.

Triton tells the Python model that a request was cancelled (``request.is_cancelled()``): over gRPC
when the client cancels or its deadline passes; over HTTP Triton 2.51 does not notice a client
that disconnects (measured: the request runs to its end), so an HTTP client that gives up is not
seen (its queue timeout still is, see ``repository.with_queue_policy``).

The executor runs each call inside :func:`cancel_scope` with a check saying whether every request
the call serves is cancelled; :func:`watch_steps` makes the :class:`Components` call that check
before each denoising loop (prior and decoder) and after each of its steps, through the loops' own
step callback, and raise :class:`RequestCancelled`. The loops release their state on any exception.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Callable

_scope = threading.local()


class RequestCancelled(Exception):
    """Every request of this call was cancelled by its client; the call stopped at a step boundary."""

    def __init__(self, message: str = "request cancelled by the client") -> None:
        super().__init__(message)


@contextmanager
def cancel_scope(cancelled: Callable[[], bool] | None):
    """While inside, denoising steps on this thread stop once ``cancelled()`` is true."""
    previous = getattr(_scope, "cancelled", None)
    _scope.cancelled = cancelled
    try:
        yield
    finally:
        _scope.cancelled = previous


def check() -> None:
    cancelled = getattr(_scope, "cancelled", None)
    if cancelled is not None and cancelled():
        raise RequestCancelled()


def watch_steps(components) -> None:
    """Make ``components.denoise`` check :func:`check` before the loop and at every step (once per
    :class:`Components`: several executors may share one)."""
    if getattr(components.denoise, "watches_cancellation", False):
        return
    denoise = components.denoise

    def checked_denoise(spec, table, inputs, callback=None):
        if getattr(_scope, "cancelled", None) is None:
            return denoise(spec, table, inputs, callback)
        check()

        def step(i, t, latents):
            check()
            if callback is not None:
                callback(i, t, latents)

        return denoise(spec, table, inputs, step)

    checked_denoise.watches_cancellation = True
    components.denoise = checked_denoise
