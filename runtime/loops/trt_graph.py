"""The TensorRT strategy of the denoising loop: buffers bound once, one stream, one CUDA graph per step.

The loop (checks, identity-row start, stepping, callback, download) is
:class:`~kandinsky_trt.runtime.loops.template.DenoiseLoop`'s; here is where things live:

* every I/O tensor of the network and of its step graph has one device buffer, bound once through
  the backend's device level (:meth:`TrtBackend.bind`, an execution context per binding) when the
  loop is built. The pairs of ``spec.links`` are one buffer: the step graph's ``model_input``
  output *is* the network's sample input, and the network's output *is* the step graph's
  ``model_output`` (different engines, so reading and writing them is not aliasing);
* per chunk the conditioning, the step extras, the guidance scales (B, 1) and the initial latents are
  uploaded once, and so is the whole table (the chunk's rows): coefficient rows (n, B, K), timesteps
  (n, B2) and, when a step is stochastic, the noise rows (n, *latent). A fully deterministic table
  uploads no noise rows: the noise buffer is zeroed once and nothing writes it;
* per step (:class:`~kandinsky_trt.runtime.cuda.graphs.CapturedLoop`): ``RowCopy`` device-to-device
  copies of the step's rows into the bound inputs, then a ``StepChain`` — network enqueue, step graph
  enqueue, the copies of ``spec.carried`` (``latents_next -> latents``, ``x0 -> x0_prev``). The first
  step is eager (TensorRT's warm-up before a capture), the second captures it, every later step
  replays the graph; the graph survives across chunks. ``cuda_graph=False`` runs the same chain
  eagerly. The backend's ``generation`` (bumped when its shared activation arena moves) is watched,
  so a grown arena forces a re-capture;
* everything is enqueued on the backend's stream; nothing waits inside the loop. One stream sync per
  chunk, after the final latents' device-to-host copy is enqueued.

A ``callback`` (diffusers' contract) makes each step pay one device-to-host copy and one stream
sync. The array it gets is a copy; changing it does not change the loop's state.

The loop owns its buffers, bindings and graph and frees them on :meth:`close`; the backend (and the
engines) stay open. Written to the documented TensorRT 10/11 and CUDA runtime APIs and tested only
against stand-ins (``tests/test_trt_loop.py``): not run on a GPU where this was written.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.trt import TrtBackend
from kandinsky_trt.runtime.cuda.graphs import CapturedLoop, LoopConfig, RowCopy, StepChain
from kandinsky_trt.runtime.loops.template import Chunk, DenoiseLoop
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _ChunkTables:
    """One chunk's rows on the device; ``hosts`` keep the async uploads' sources alive until the sync."""

    rows: tuple[RowCopy, ...]
    buffers: tuple[Any, ...]
    hosts: tuple[np.ndarray, ...]

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()


class TrtGraphLoop(DenoiseLoop):
    """:class:`DenoiseLoop` on TensorRT engines with device-resident state.

    Args:
        backend: the open :class:`TrtBackend` whose engines run the loop; it stays open when the loop closes.
        spec: which network and step graph.
        cuda_graph: capture one step as a CUDA graph and replay it (False: the same chain eagerly).
        cuda_ops: the CUDA operations (``memcpy_d2d`` and graph capture/launch); default
            :mod:`kandinsky_trt.runtime.cuda.runtime_api`. Tests pass a simulated layer.
        profile: the manifest profile (its shapes, its optimization profile); one loop, so one CUDA
            graph, per (spec, profile).

    Raises:
        BackendError: the engines do not load, or their linked tensors do not fit each other.
    """

    def __init__(self, backend: TrtBackend, spec: LoopSpec, cuda_graph: bool = True, cuda_ops: Any = None,
                 profile: int = 0) -> None:
        super().__init__(spec, backend.load(spec.network, profile).network, backend.load(spec.step, profile).network)
        self.backend, self._cuda = backend, cuda_ops or cuda
        self._owned: list[Any] = []
        self._bindings: list[Any] = []
        try:
            self.network_buffers, self.step_buffers = self._allocate()
            self._bindings = [backend.bind(spec.network, self.network_buffers, profile),
                              backend.bind(spec.step, self.step_buffers, profile)]
        except BaseException:
            self._free()
            raise
        carries = tuple((self.step_buffers[src], self.step_buffers[dst]) for src, dst in spec.carried)
        chain = StepChain(tuple(b.enqueue for b in self._bindings), carries, cuda=self._cuda)
        self._config = LoopConfig(chain, watch=(backend,), enabled=cuda_graph)
        self.steps = CapturedLoop(self._config, backend.stream, cuda=self._cuda)
        self._tables: _ChunkTables | None = None
        self._hosts: list[np.ndarray] = []

    @property
    def stream(self) -> Any:
        return self.backend.stream

    def _allocate(self) -> tuple[dict, dict]:
        """One buffer per tensor; the linked pairs share theirs."""
        def buffer(tensor):
            self._owned.append(self.backend.allocate(tensor))
            return self._owned[-1]

        net, step = self.network_io, self.step_io
        network_buffers = {t.name: buffer(t) for t in net.inputs + net.outputs}
        linked = {step_name: network_buffers[net_name] for step_name, net_name in self.spec.links}
        step_buffers = {t.name: linked[t.name] if t.name in linked else buffer(t) for t in step.inputs + step.outputs}
        return network_buffers, step_buffers

    def _start(self, chunk: Chunk) -> None:
        """Upload the chunk's fixed inputs, state and rows; enqueue the identity-row step graph."""
        uploads = [(self.network_buffers[k], v) for k, v in chunk.conditioning.items()]
        uploads += [(self.step_buffers[k], v) for k, v in chunk.start.items()]
        for buffer, host in uploads:
            buffer.copy_from_host(host, self.stream)
        self._hosts = [host for _, host in uploads]  # the async uploads read them until the sync
        # The step graph with the identity row writes model_input ([x; x] (+ conditioning)) into the
        # network's sample buffer; its latents_next / x0 are overwritten by step 0 before any carry.
        self._bindings[1].enqueue(self.stream)
        if len(chunk):
            self._tables = self._upload_rows(chunk)
            self.steps.config = replace(self._config, rows=self._tables.rows)

    def _upload_rows(self, chunk: Chunk) -> _ChunkTables:
        """The per-step rows on the device, and the RowCopy of each into its bound input."""
        rows = [(self.network_buffers[k], v) for k, v in chunk.network_rows.items()]
        rows += [(self.step_buffers[k], v) for k, v in chunk.step_rows.items()]
        buffers, copies = [], []
        try:
            for target, host in rows:
                buffers.append(cuda.DeviceBuffer(max(int(host.nbytes), 1)))
                buffers[-1].copy_from_host(host, self.stream)
                copies.append(RowCopy(buffers[-1], target))
        except BaseException:
            self._drain()
            for buffer in buffers:
                buffer.close()
            raise
        return _ChunkTables(tuple(copies), tuple(buffers), tuple(host for _, host in rows))

    def _step(self, chunk: Chunk, index: int) -> None:
        self.steps.step(index)  # enqueued only: the download is the one sync

    def _latents(self) -> np.ndarray:
        """Enqueue the latents' device-to-host copy, then the stream sync that completes it."""
        latents = self.step_io.tensor(self.spec.io.latents)
        out = np.empty(latents.shape, np.float32)
        self.step_buffers[latents.name].copy_to_host(out, self.stream)
        self.stream.synchronize()
        return out

    def _abort(self) -> None:
        self._drain()  # enqueued work may still read the table buffers freed by _end

    def _end(self) -> None:
        self.steps.config = self._config
        if self._tables is not None:
            self._tables.close()
            self._tables = None
        self._hosts = []

    def _drain(self) -> None:
        """Wait for enqueued work before freeing buffers it may use; a failing sync is logged, not raised."""
        stream = self.stream
        if getattr(stream, "handle", None) is None:
            return
        try:
            stream.synchronize()
        except Exception as err:  # noqa: BLE001 - the caller's error (or close) must go on
            log.warning("TrtGraphLoop(%s): stream sync before freeing failed: %s", self.spec.network, err)

    def _free(self) -> None:
        for binding in self._bindings:
            binding.close()
        for buffer in self._owned:
            buffer.close()
        self._owned, self._bindings = [], []

    def _release(self) -> None:
        """Destroy the graph, drop the bindings and free the loop's buffers; the engines stay loaded."""
        self._drain()
        self.steps.close()
        self._free()
