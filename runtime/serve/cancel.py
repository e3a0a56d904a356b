"""Stop a generation whose client has gone, at the next denoising step.

Two signals say a client has gone:

- gRPC: Triton reports it (``request.is_cancelled()``) when the client cancels or its deadline passes.
- HTTP: Triton 2.51 does not notice a client that disconnects (measured: the request runs to its
  end), so the HTTP front does. It gives every request it forwards an unguessable token in the
  :data:`TOKEN_HEADER` header (a client's own header of that name is dropped); tritonserver runs
  with ``--http-header-forward-pattern`` for it, so the token reaches the model as a request
  parameter. When the client's connection closes while its response is pending, the front creates
  the file named by the token in a private (0700) directory (:class:`CancelMarks`, named to the
  model by the ``cancel_dir`` parameter) and removes it once Triton has answered the request, so a
  mark lives exactly as long as its request (and at most :data:`MARK_MAX_AGE_S`).

The executor runs each call inside :func:`cancel_scope` with a check saying whether every request
the call serves is cancelled, and sets :attr:`Components.should_stop` to :func:`requested` (that
check, on the calling thread): the components check it before each denoising loop (prior and
decoder), the loops after each step (their ``should_stop`` hook: no latents are fetched for it, so
a device loop pays no extra host sync), and stop with ``LoopStopped``, which the executor answers as
:class:`RequestCancelled`. The loops release their state and stay reusable.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

TOKEN_HEADER = "kandinsky-cancel-token"  # lower case: the header the front sets, the parameter the model reads
MARK_MAX_AGE_S = 3600.0  # the front removes a mark at the latest after this long (Triton never answered)
_TOKEN = re.compile(r"^[0-9a-f]{32}$")

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


def requested() -> bool:
    """Whether the calling thread's scope says its clients have all gone (False outside a scope)."""
    cancelled = getattr(_scope, "cancelled", None)
    return cancelled is not None and bool(cancelled())


def new_token() -> str:
    """128 random bits, hex: what the front puts in :data:`TOKEN_HEADER`."""
    return secrets.token_hex(16)


def token_of(parameters: str | dict | None) -> str | None:
    """The cancel token among a request's parameters (``request.parameters()``: JSON), if well-formed.

    Anything else (absent, another type, not 32 lower-case hex digits) is None, so a client-chosen
    value can never name a path outside the marks' directory.
    """
    if isinstance(parameters, str):
        try:
            parameters = json.loads(parameters or "{}")
        except ValueError:
            return None
    for key, value in (parameters or {}).items():
        if key.lower() == TOKEN_HEADER and isinstance(value, str) and _TOKEN.match(value):
            return value
    return None


class CancelMarks:
    """The directory of cancel marks: one empty file per token whose client has gone."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def _path(self, token: str) -> Path:
        if not _TOKEN.match(token):
            raise ValueError(f"cancel token: expected 32 hex digits, found {token!r}")
        return self.directory / token

    def mark(self, token: str) -> None:
        self._path(token).touch(mode=0o600)

    def unmark(self, token: str) -> None:
        self._path(token).unlink(missing_ok=True)

    def is_marked(self, token: str) -> bool:
        return self._path(token).exists()

    def gone(self, token: str | None, cancelled: Callable[[], bool]) -> Callable[[], bool]:
        """``cancelled`` (Triton's own signal) or this token's mark."""
        if token is None:
            return cancelled
        return lambda: cancelled() or self.is_marked(token)
