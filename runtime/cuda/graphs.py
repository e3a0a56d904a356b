"""CUDA-graph replay of one denoising step, with an eager path and re-capture when bindings change.

A step of the loops (DESIGN §4) is ``network`` (batch 2 = uncond + cond) → ``*_step`` graph → two
device-to-device copies that carry the state (``latents_next → latents``, ``x0 → x0_prev``). All of
it reads and writes buffers bound once, so it can be captured into one CUDA graph and replayed:

* per step the host enqueues one small D2D copy per per-step table (a coefficient row, a noise
  row, the timestep) from tables uploaded once, then ``cudaGraphLaunch`` — no host sync inside the
  loop; the caller syncs once per image;
* the first run after (re)binding is eager: it is the warm-up TensorRT needs before capture
  (``execute_async_v3`` once after addresses are set) and it is also that step's real work, so no
  step runs twice; the next step captures (capture does not execute) and launches the graph;
* every object with a ``generation`` the loop watches (the TensorRT backend, whose shared
  activation arena moves when a larger engine loads) is compared before each launch: when one
  changed, the graph is destroyed and captured again;
* ``enabled=False`` (``--no-cuda-graph``) runs the same enqueue callable eagerly every step.

The CUDA operations come from :mod:`kandinsky_trt.runtime.cuda.runtime_api` unless a stand-in is given, which
is how the invalidation logic is tested without a GPU. Imports: the runtime's cuda wrapper only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

from kandinsky_trt.runtime.cuda import runtime_api as cuda_ops

log = logging.getLogger(__name__)

Enqueue = Callable[[Any], None]  # takes a stream, enqueues work on it, never synchronizes


@dataclass(frozen=True)
class RowCopy:
    """Per step ``i``: copy row ``i`` of the device ``table`` (all steps, uploaded once) into ``target``.

    ``target`` is a bound input (e.g. ``coefficients``, ``noise``, ``timestep``); a row is
    ``target.nbytes`` long.
    """

    table: Any  # a DeviceBuffer: .ptr, .nbytes
    target: Any

    def __post_init__(self) -> None:
        row, total = self.target.nbytes, self.table.nbytes
        if total < row or total % row:
            raise ValueError(
                f"table: expected a whole number of {row}-byte rows (the target's size), found {total} bytes"
            )

    @property
    def rows(self) -> int:
        return self.table.nbytes // self.target.nbytes

    def enqueue(self, index: int, stream: Any, cuda: Any) -> None:
        if not 0 <= index < self.rows:
            raise IndexError(f"step: expected 0 <= step < {self.rows} (rows in the table), found {index}")
        nbytes = self.target.nbytes
        cuda.memcpy_d2d(self.target.ptr, self.table.ptr + index * nbytes, nbytes, stream)


@dataclass(frozen=True)
class StepChain:
    """The enqueue callable of one step: the stages in order, then the D2D copies carrying state.

    ``stages`` are e.g. ``(unet.enqueue, unet_step.enqueue)``; ``carries`` are ``(src, dst)`` buffer
    pairs of equal size, e.g. ``(latents_next, latents)`` and ``(x0, x0_prev)``.
    """

    stages: tuple[Enqueue, ...]
    carries: tuple[tuple[Any, Any], ...] = ()
    cuda: Any = None

    def __post_init__(self) -> None:
        for src, dst in self.carries:
            if src.nbytes != dst.nbytes:
                raise ValueError(f"carries: expected equal sizes, found {src.nbytes} -> {dst.nbytes} bytes")

    def __call__(self, stream: Any) -> None:
        cuda = self.cuda or cuda_ops
        for stage in self.stages:
            stage(stream)
        for src, dst in self.carries:
            cuda.memcpy_d2d(dst.ptr, src.ptr, dst.nbytes, stream)


@dataclass(frozen=True)
class LoopConfig:
    """What :class:`CapturedLoop` replays.

    Args:
        enqueue: enqueues one step's work on a stream (e.g. a :class:`StepChain`); never syncs.
        rows: per-step table rows copied into bound inputs before each step.
        watch: objects with an integer ``generation`` (the backend's arena); a change
            in any of them invalidates the captured graph.
        enabled: False runs ``enqueue`` eagerly every step (the ``--no-cuda-graph`` path).
    """

    enqueue: Enqueue
    rows: tuple[RowCopy, ...] = ()
    watch: tuple[Any, ...] = ()
    enabled: bool = True


class CapturedLoop:
    """Runs the steps of one loop on ``stream``: eager warm-up, capture once, then graph launches.

    Use as a context manager (or call :meth:`close`) to destroy the graph.
    """

    def __init__(self, config: LoopConfig, stream: Any, cuda: Any = None) -> None:
        self.config = config
        self.stream = stream
        self._cuda = cuda or cuda_ops
        self._exec: Any = None
        self._exec_key: tuple | None = None
        self._warm_key: tuple | None = None
        self._closed = False
        self.captures = self.launches = self.eager_runs = 0

    def _key(self) -> tuple:
        return tuple(w.generation for w in self.config.watch)

    def step(self, index: int) -> None:
        """Enqueue step ``index``: its table rows, then the graph (or the eager callable). No sync."""
        if self._closed:
            raise RuntimeError("CapturedLoop: expected an open loop, found it closed")
        for row in self.config.rows:
            row.enqueue(index, self.stream, self._cuda)
        if not self.config.enabled:
            self._eager()
            return
        key = self._key()
        if self._exec is not None and key != self._exec_key:
            log.debug("bindings changed (generations %s -> %s): re-capturing the step graph", self._exec_key, key)
            self._destroy_exec()
        if self._exec is None:
            if self._warm_key != key:
                # TensorRT needs one execute_async_v3 after its addresses are set before a capture;
                # this eager run is that warm-up and this step's real work at once.
                self._eager()
                self._warm_key = key
                return
            self._exec = self._capture()
            self._exec_key = key
        self._cuda.launch(self._exec, self.stream)
        self.launches += 1

    def run(self, num_steps: int, start: int = 0) -> None:
        """Enqueue steps ``start .. start + num_steps - 1``; the caller synchronizes once afterwards."""
        for index in range(start, start + num_steps):
            self.step(index)

    def _eager(self) -> None:
        self.config.enqueue(self.stream)
        self.eager_runs += 1

    def _capture(self) -> Any:
        cuda = self._cuda
        cuda.begin_capture(self.stream)
        try:
            self.config.enqueue(self.stream)
        except BaseException:
            self._abort_capture()
            raise
        graph = cuda.end_capture(self.stream)
        try:
            graph_exec = cuda.instantiate(graph)
        finally:
            # The executable graph does not need its source graph (PyTorch's CUDAGraph frees it the same way).
            cuda.destroy_graph(graph)
        self.captures += 1
        log.debug("captured the step graph (capture #%d)", self.captures)
        return graph_exec

    def _abort_capture(self) -> None:
        """End a capture that failed half-way, so the stream is usable again; the first error wins."""
        try:
            graph = self._cuda.end_capture(self.stream)
        except Exception as err:  # the capture is already invalid; the caller's error is the one to raise
            log.debug("ending an aborted capture failed too: %s", err)
            return
        if graph is not None:
            self._cuda.destroy_graph(graph)

    def _destroy_exec(self) -> None:
        if self._exec is not None:
            self._cuda.destroy_graph_exec(self._exec)
        self._exec = self._exec_key = None

    def invalidate(self) -> None:
        """Drop the graph; the next step runs eagerly again, then re-captures."""
        self._destroy_exec()
        self._warm_key = None

    def close(self) -> None:
        if not self._closed:
            self.invalidate()
            self._closed = True

    def __enter__(self) -> "CapturedLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
