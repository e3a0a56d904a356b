"""The device storage of the loop of slots: buffers bound once, one strategy for every device backend.

:class:`DeviceStorage` is written against the :class:`~kandinsky_trt.runtime.backends.base.DeviceBackend`
interface only (``allocate``, ``bind``, ``write_rows``, ``runner``, ``read``, ``free``), so the same
code runs ONNX Runtime with IO binding (its CUDA graphs per ``gpu_graph_id``; on the CPU EP the
same bindings on host memory, which is how it is tested here) and TensorRT (execution contexts on
one stream, captured CUDA graphs). The loop itself (admission, per-row steps, retirement) is
:class:`~kandinsky_trt.runtime.loops.slots.SlotLoop`'s.

* Every buffer is allocated, zeroed and bound once when the storage is built. The pairs of
  ``spec.links`` are one buffer: the step graph writes ``model_input`` straight into the network's
  sample input and reads the network's output as ``model_output`` (different sessions or engines,
  so this is not a read and a write of one buffer by one run).
* The carried state (``latents_next -> latents``, ``x0 -> x0_prev``) *ping-pongs* between two
  buffers each: step binding A reads side 0 and writes side 1, binding B the reverse, and the
  storage alternates A and B. Why ping-pong and not device-to-device copies: ONNX Runtime's Python
  API has no device copy ordered on its own stream (only ``update_inplace`` from the host), and one
  session may not read and write one buffer in a run (a graph replay may run a binding twice), so
  copies would cost a download or a sync per step there; TensorRT is served as well by two
  execution contexts of the step engine as by copies, and saves the copies. So both backends get
  two step bindings and two :class:`~kandinsky_trt.runtime.backends.base.StepRunner`\\ s (network +
  step A, network + step B), each captured once (TensorRT: one graph each; ONNX Runtime: a graph
  id per binding) and replayed.
* :meth:`write` copies rows into row offsets of a bound buffer (``write_rows``; a carried input is
  written on the side the next step reads), so bound addresses never change and a captured graph
  stays valid across admissions. :meth:`step` enqueues the runner of the current side and nothing
  else: no sync inside a step (on TensorRT; ONNX Runtime's ``Run`` waits for its own stream).
  :meth:`read_latents` is the one download and its sync; :meth:`copy_latents` instead copies a
  retired row into another device buffer (a device-resident chain: no download, no sync).

Written to the documented ONNX Runtime IO-binding / CUDA-graph and TensorRT ``execute_async_v3``
APIs; on this machine it runs on ONNX Runtime's CPU EP and on the TensorRT/CUDA stand-ins of
``tests/fakes``: unverified on a GPU.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError, DeviceBackend, DeviceRows
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.contract.spec import ResolvedTensor
from kandinsky_trt.runtime.loops.slots import SlotStorage

log = logging.getLogger(__name__)


def row_runs(rows: np.ndarray) -> list[np.ndarray]:
    """Positions in ``rows`` (ascending indices) split into runs of consecutive rows."""
    rows = np.asarray(rows)
    return np.split(np.arange(len(rows)), np.flatnonzero(np.diff(rows) != 1) + 1) if len(rows) else []


class DeviceStorage(SlotStorage):
    """One slot loop's buffers and bindings on ``backend`` at manifest ``profile`` (see the module docstring).

    Args:
        backend: the open device backend; it stays open when the storage closes.
        spec: which network and step graph.
        profile: the manifest profile whose shapes the buffers have.
        cuda_graph: capture and replay (False: the same bindings eagerly, to compare).

    Raises:
        BackendError: the networks do not load, or their linked tensors do not fit each other.
    """

    def __init__(self, backend: DeviceBackend, spec: LoopSpec, profile: int = 0, cuda_graph: bool = True) -> None:
        network, step = backend.load(spec.network, profile).network, backend.load(spec.step, profile).network
        super().__init__(spec, network, step)  # checks the linked tensors fit
        self.backend, self.cuda_graph = backend, cuda_graph
        self._owned: list[tuple[Any, ResolvedTensor]] = []
        self.bindings: tuple = ()
        self.runners: tuple = ()
        self._side, self._closed = 0, False
        try:
            self._allocate()
            self._bind(profile)
        except BaseException:
            self.close()
            raise

    def _new(self, tensor: ResolvedTensor) -> Any:
        """A buffer for ``tensor``, zeroed (SlotStorage: every buffer starts zeroed; allocations do not)."""
        buffer = self.backend.allocate(tensor)
        self._owned.append((buffer, tensor))
        self.backend.write_rows(buffer, tensor, 0, np.zeros(tensor.shape, np.dtype(tensor.dtype)))
        return buffer

    def _allocate(self) -> None:
        net, step, spec = self.network_io, self.step_io, self.spec
        self.network_buffers = {t.name: self._new(t) for t in net.inputs + net.outputs}
        self.state = {read: (self._new(step.tensor(read)), self._new(step.tensor(read))) for _, read in spec.carried}
        skip = {name for pair in spec.carried for name in pair} | {name for name, _ in spec.links}
        self.step_buffers = {n: self._new(step.tensor(n)) for n in step.input_names if n not in skip}

    def _step_buffers(self, side: int) -> dict[str, Any]:
        """Step binding ``side`` reads state side ``side`` and writes side ``1 - side``; the links are the
        network's buffers."""
        buffers = dict(self.step_buffers)
        for written, read in self.spec.carried:
            buffers[read], buffers[written] = self.state[read][side], self.state[read][1 - side]
        for step_name, net_name in self.spec.links:
            buffers[step_name] = self.network_buffers[net_name]
        return buffers

    def _bind(self, profile: int) -> None:
        backend, spec = self.backend, self.spec
        network = backend.bind(spec.network, self.network_buffers, profile)
        self.bindings = (network, backend.bind(spec.step, self._step_buffers(0), profile),
                         backend.bind(spec.step, self._step_buffers(1), profile))
        self.runners = tuple(backend.runner((network, step), self.cuda_graph) for step in self.bindings[1:])

    def buffer(self, name: str) -> Any:
        """The bound buffer of input ``name`` the next step reads (a carried input: the current side)."""
        if name in self.state:
            return self.state[name][self._side]
        if name in self.network_buffers:
            return self.network_buffers[name]
        return self.step_buffers[name]

    def write(self, tensor: ResolvedTensor, rows: np.ndarray, values: np.ndarray | DeviceRows) -> None:
        self._check_open()
        buffer, rows = self.buffer(tensor.name), np.asarray(rows)
        values = values if isinstance(values, DeviceRows) else np.asarray(values)
        for run in row_runs(rows):
            self.backend.write_rows(buffer, tensor, int(rows[run[0]]), values[run])

    def step(self) -> None:
        """Enqueue network + step graph of the current side (captured or replayed); the carried state
        is then on the other side. Nothing waits here."""
        self._check_open()
        self.runners[self._side].run()
        self._side = 1 - self._side

    def rows(self, tensor: ResolvedTensor, rows: np.ndarray) -> DeviceRows:
        """The rows on the device (no download): another storage's write copies them device to device."""
        self._check_open()
        return DeviceRows(self.buffer(tensor.name), tensor, [int(r) for r in rows])

    def read_latents(self) -> np.ndarray:
        self._check_open()
        latents = self.spec.io.latents
        return self.backend.read(self.state[latents][self._side], self.step_io.tensor(latents))

    def copy_latents(self, slot: int, into: DeviceRows) -> None:
        """Device-to-device copy of the slot's current latents (the side the next step reads)."""
        self._check_open()
        latents = self.spec.io.latents
        source = DeviceRows(self.state[latents][self._side], self.step_io.tensor(latents), [slot])
        self.backend.write_rows(into.buffer, into.tensor, into.rows[0], source)

    def _check_open(self) -> None:
        if self._closed:
            raise BackendError(f"DeviceStorage({self.spec.network}): expected an open storage, found it closed")

    def close(self) -> None:
        """Free the buffers once queued work is done, then drop the graphs and bindings; idempotent."""
        if self._closed:
            return
        self._closed = True
        owned, self._owned = self._owned, []
        self.network_buffers, self.state, self.step_buffers = {}, {}, {}
        self.backend.free([buffer for buffer, _ in owned])  # waits for queued work first
        for item in (*self.runners, *self.bindings):
            item.close()
        self.runners, self.bindings = (), ()
