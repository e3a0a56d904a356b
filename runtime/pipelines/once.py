"""A cache whose values are built exactly once per key, however many threads ask at the same time.

``Components`` loads networks lazily; at full size every duplicate ONNX Runtime session is another
copy of the weights (2.4 GB for the UNet), so two threads asking for one network must share one load.
Different keys build in parallel (one lock per key); a build that raises caches nothing, so the next
caller retries.
"""

from __future__ import annotations

import threading
from typing import Callable, Hashable, TypeVar

T = TypeVar("T")


class OnceCache:
    """``get(key, build)`` returns the value built by the first caller for ``key``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # guards the two dicts, never held while building
        self._values: dict[Hashable, object] = {}
        self._key_locks: dict[Hashable, threading.Lock] = {}

    def get(self, key: Hashable, build: Callable[[], T]) -> T:
        with self._lock:
            if key in self._values:
                return self._values[key]
            key_lock = self._key_locks.setdefault(key, threading.Lock())
        with key_lock:  # one builder per key; the others wait here and then read its value
            with self._lock:
                if key in self._values:
                    return self._values[key]
            value = build()
            with self._lock:
                self._values[key] = value
            return value

    def values(self) -> list:
        with self._lock:
            return list(self._values.values())

    def clear(self) -> None:
        with self._lock:
            self._values.clear()
            self._key_locks.clear()
