"""The denoising loop of ``denoise.py`` on TensorRT: buffers bound once, one stream, one CUDA graph per step.

Same contract as :func:`~kandinsky_trt.runtime.denoise.denoise` and
:class:`~kandinsky_trt.runtime.device_loop.DeviceDenoiseLoop` (call it with the loop's names, a
:class:`SchedulerTable` and a :class:`LoopInputs`; it returns the final latents on the host), the
same identity-row trick for the first network input. What differs is where things live:

* every I/O tensor of the network and of its step graph has one device buffer, bound by name once
  (:meth:`TrtNetwork.bind`) when the loop is built. Two pairs are one buffer: the step graph's
  ``model_input`` output *is* the network's sample input, and the network's output *is* the step
  graph's ``model_output`` (different engines, so reading and writing them is not aliasing);
* per chunk the conditioning, the step extras, the guidance scale and the initial latents are
  uploaded once, and so is the whole table: coefficient rows (n, K), timesteps (n, 1) and, when a
  step is stochastic, the noise rows (n, *latent) — zeros for deterministic steps, ``noise[k]`` for
  the k-th stochastic step, exactly as ``denoise()`` consumes them. A fully deterministic table
  uploads no noise rows: the noise buffer is zeroed once and nothing writes it;
* per step (:class:`~kandinsky_trt.runtime.cuda_graphs.CapturedLoop`): ``RowCopy`` device-to-device
  copies of the step's rows into the bound inputs, then a ``StepChain`` — network enqueue, step graph
  enqueue, copies ``latents_next -> latents`` and ``x0 -> x0_prev``. The first step of a binding is
  eager (TensorRT's warm-up before a capture), the second captures it, every later step replays the
  graph; the graph survives across chunks. ``cuda_graph=False`` runs the same chain eagerly. The
  backend's ``generation`` (bumped when its shared activation arena moves) and both binding sets are
  watched, so a grown arena forces a re-capture;
* everything is enqueued on the backend's stream; nothing waits inside the loop. One stream sync per
  chunk, after the final latents' device-to-host copy is enqueued.

A ``callback`` follows diffusers (called after every step with that step's latents), so each step
then pays one device-to-host copy and one stream sync: the loop is no longer sync-free. The array
it gets is a copy; changing it does not change the loop's state.

The loop owns the bindings of its two networks: build one per network pair (``Components`` caches
one per :class:`LoopNames`). It frees its buffers and graph on :meth:`close`; the backend (and the
engines) stay open. Tests: ``tests/test_trt_loop.py`` (fake TensorRT and CUDA layers on CPU).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from kandinsky_trt.runtime import cuda
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.trt import TrtBackend, TrtNetwork
from kandinsky_trt.runtime.cuda_graphs import BindingSet, CapturedLoop, LoopConfig, RowCopy, StepChain
from kandinsky_trt.runtime.denoise import IDENTITY_ROW, LoopInputs, LoopNames, LoopNetworks, StepCallback
from kandinsky_trt.runtime.schedulers import SchedulerTable
from kandinsky_trt.runtime.spec import ResolvedTensor

log = logging.getLogger(__name__)

# Step-graph tensors the loop itself feeds; any other step input (the inpaint ``conditioning``) is an extra.
_STEP_OWN = ("latents", "model_output", "coefficients", "noise", "guidance_scale", "x0_prev")
_CARRIES = (("latents_next", "latents"), ("x0", "x0_prev"))  # step output -> step input, after every step


def _nbytes(tensor: ResolvedTensor) -> int:
    return max(int(np.prod(tensor.shape)) * np.dtype(tensor.dtype).itemsize, 1)


def _check_linked(network: TrtNetwork, step: TrtNetwork, names: LoopNames) -> None:
    """The step graph's model_output / model_input must fit the network's output / sample input."""
    for step_name, net_name in (("model_output", names.output), ("model_input", names.sample_input)):
        ours, theirs = step.network.tensor(step_name), network.network.tensor(net_name)
        if (ours.shape, ours.dtype) != (theirs.shape, theirs.dtype):
            raise BackendError(
                f"{names.step}.{step_name}: expected {theirs.dtype}{list(theirs.shape)} like "
                f"{names.network}.{net_name}, found {ours.dtype}{list(ours.shape)}")


def _checked(tensor: ResolvedTensor, array: Any, what: str) -> np.ndarray:
    """``array`` as a contiguous host array of exactly ``tensor``'s dtype and shape (as ``check_feeds``)."""
    array = np.asarray(array)
    if array.shape != tensor.shape or array.dtype != np.dtype(tensor.dtype):
        raise BackendError(f"{what}: expected {tensor.dtype}{list(tensor.shape)}, "
                           f"found {array.dtype}{list(array.shape)}")
    return np.ascontiguousarray(array)


@dataclass(frozen=True)
class _ChunkTables:
    """One chunk's table on the device; ``hosts`` keep the async uploads' sources alive until the sync."""

    rows: tuple[RowCopy, ...]
    buffers: tuple[Any, ...]
    hosts: tuple[np.ndarray, ...]

    def close(self) -> None:
        for buffer in self.buffers:
            buffer.close()


class TrtDenoiseLoop:
    """``denoise()`` on TensorRT engines with device-resident state; call it like ``denoise``.

    Args:
        backend: the open :class:`TrtBackend` whose engines (``names.network``, ``names.step``) run the
            loop; it stays open when the loop closes.
        names: which network and step graph, and the tensors that link them.
        cuda_graph: capture one step as a CUDA graph and replay it (False: the same chain eagerly).
        cuda_ops: the CUDA operations (``memcpy_d2d`` and graph capture/launch); default
            :mod:`kandinsky_trt.runtime.cuda`. Tests pass a simulated layer.

    Raises:
        BackendError: the engines do not load, or their linked tensors do not fit each other.
    """

    def __init__(self, backend: TrtBackend, names: LoopNames, cuda_graph: bool = True,
                 cuda_ops: Any = None) -> None:
        self.backend, self.names = backend, names
        self._cuda = cuda_ops or cuda
        self.network, self.step = backend.load(names.network), backend.load(names.step)
        _check_linked(self.network, self.step, names)
        self._owned: list[Any] = []
        try:
            self.network_buffers, self.step_buffers = self._allocate()
            self.network.bind(self.network_buffers)
            self.step.bind(self.step_buffers)
        except BaseException:
            self._free()
            raise
        carries = tuple((self.step_buffers[src], self.step_buffers[dst]) for src, dst in _CARRIES)
        chain = StepChain((self.network.enqueue, self.step.enqueue), carries, cuda=self._cuda)
        watch = (backend, self.network_buffers, self.step_buffers)
        self._config = LoopConfig(chain, watch=watch, enabled=cuda_graph)
        self.steps = CapturedLoop(self._config, backend.stream, cuda=self._cuda)
        self._closed = False

    @property
    def stream(self) -> Any:
        return self.backend.stream

    def _buffer(self, tensor: ResolvedTensor) -> Any:
        buffer = cuda.DeviceBuffer(_nbytes(tensor))
        self._owned.append(buffer)
        return buffer

    def _allocate(self) -> tuple[BindingSet, BindingSet]:
        """One buffer per tensor; the two linked pairs share theirs."""
        net = self.network.network
        network_buffers = BindingSet({t.name: self._buffer(t) for t in net.inputs + net.outputs})
        linked = {"model_output": network_buffers[self.names.output],
                  "model_input": network_buffers[self.names.sample_input]}
        step = self.step.network
        step_buffers = BindingSet({t.name: linked[t.name] if t.name in linked else self._buffer(t)
                                   for t in step.inputs + step.outputs})
        return network_buffers, step_buffers

    def __call__(self, nets: LoopNetworks | LoopNames | None, table: SchedulerTable, inputs: LoopInputs,
                 callback: StepCallback | None = None) -> np.ndarray:
        """Run every row of ``table`` on one chunk and return the final latents (host numpy)."""
        self._check_call(nets, table, inputs)
        hosts = self._start(inputs)  # referenced below: the async uploads read them until the sync
        if len(table) == 0:  # denoise() returns the input latents when there is no step
            return self._download()
        tables = self._upload_table(table, inputs)
        try:
            self.steps.config = replace(self._config, rows=tables.rows)
            self._run(table, callback)
            return self._download()
        except BaseException:
            self._drain()  # enqueued work may still read the table buffers freed below
            raise
        finally:
            self.steps.config = self._config
            tables.close()
            hosts.clear()

    def _check_call(self, nets: LoopNetworks | LoopNames | None, table: SchedulerTable, inputs: LoopInputs) -> None:
        if self._closed:
            raise BackendError(f"TrtDenoiseLoop({self.names.network}): expected an open loop, found it closed")
        if nets is not None:
            found = nets if isinstance(nets, LoopNames) else LoopNames.of(nets)
            if found != self.names:
                raise BackendError(f"nets: this loop was built for {self.names}, found {found}")
        needed = int(table.stochastic.sum())
        have = 0 if inputs.noise is None else len(inputs.noise)
        if have < needed:
            raise BackendError(f"inputs.noise: expected {needed} rows (one per stochastic step), found {have}")

    def _start(self, inputs: LoopInputs) -> list[np.ndarray]:
        """Upload the chunk's fixed inputs and state, then build the first network input (identity row).

        Returns the host arrays behind the asynchronous uploads (alive until the chunk's sync).
        """
        step = self.step.network
        fixed = {self.names.sample_input, "timestep"}
        uploads = self._group(self.network, inputs.conditioning, fixed, "inputs.conditioning")
        uploads += self._group(self.step, inputs.step_extras, set(_STEP_OWN), "inputs.step_extras")
        zeros = np.zeros(step.tensor("latents").shape, np.float32)
        latents = np.asarray(inputs.latents).astype(np.float32)
        state = {"latents": latents, "x0_prev": zeros, "noise": zeros, "coefficients": IDENTITY_ROW,
                 "guidance_scale": np.array([inputs.guidance_scale], np.float32),
                 "model_output": np.zeros(step.tensor("model_output").shape, np.float32)}
        name = {"latents": "inputs.latents"}
        uploads += [(self.step_buffers[k], _checked(step.tensor(k), v, name.get(k, k))) for k, v in state.items()]
        for buffer, host in uploads:
            buffer.copy_from_host(host, self.stream)
        # The step graph with the identity row writes model_input ([x; x] (+ conditioning)) into the
        # network's sample buffer; its latents_next / x0 are overwritten by step 0 before any carry.
        self.step.enqueue(self.stream)
        return [host for _, host in uploads]

    def _group(self, session: TrtNetwork, arrays: dict, skip: set, what: str) -> list[tuple[Any, np.ndarray]]:
        """(buffer, host array) for every input of ``session`` not in ``skip``: exactly ``arrays``' keys."""
        net = session.network
        expected = sorted(n for n in net.input_names if n not in skip)
        if sorted(arrays) != expected:
            raise BackendError(f"{what}: expected {expected}, found {sorted(arrays)}")
        buffers = self.network_buffers if session is self.network else self.step_buffers
        return [(buffers[n], _checked(net.tensor(n), arrays[n], f"{what}[{n!r}]")) for n in expected]

    def _upload_table(self, table: SchedulerTable, inputs: LoopInputs) -> _ChunkTables:
        """The per-step rows on the device, and the RowCopy of each into its bound input."""
        n = len(table)
        hosts = {"coefficients": np.ascontiguousarray(table.coefficients, np.float32),
                 "timestep": table.timesteps.astype(np.float32).reshape(n, 1)}
        if table.stochastic.any():
            hosts["noise"] = self._noise_rows(table, inputs)
        targets = {"coefficients": self.step_buffers["coefficients"], "timestep": self.network_buffers["timestep"],
                   "noise": self.step_buffers["noise"]}
        buffers, rows = [], []
        try:
            for name, host in hosts.items():
                buffers.append(cuda.DeviceBuffer(max(int(host.nbytes), 1)))
                buffers[-1].copy_from_host(host, self.stream)
                rows.append(RowCopy(buffers[-1], targets[name]))
        except BaseException:
            self._drain()
            for buffer in buffers:
                buffer.close()
            raise
        return _ChunkTables(tuple(rows), tuple(buffers), tuple(hosts.values()))

    def _noise_rows(self, table: SchedulerTable, inputs: LoopInputs) -> np.ndarray:
        """(n, *latent): ``inputs.noise[k]`` on the k-th stochastic step, zeros elsewhere."""
        shape = self.step.network.tensor("noise").shape
        index = np.flatnonzero(table.stochastic)
        noise = np.asarray(inputs.noise[:len(index)]).astype(np.float32)
        if noise.shape[1:] != shape:
            raise BackendError(f"inputs.noise: expected rows of shape {list(shape)}, found {list(noise.shape[1:])}")
        rows = np.zeros((len(table), *shape), np.float32)
        rows[index] = noise
        return rows

    def _run(self, table: SchedulerTable, callback: StepCallback | None) -> None:
        if callback is None:
            self.steps.run(len(table))  # enqueued only: the caller's download is the one sync
            return
        for i, t in enumerate(table.timesteps):
            self.steps.step(i)
            callback(i, int(t), self._download())  # diffusers calls back every step: one sync each

    def _download(self) -> np.ndarray:
        """Enqueue the latents' device-to-host copy, then the stream sync that completes it."""
        out = np.empty(self.step.network.tensor("latents").shape, np.float32)
        self.step_buffers["latents"].copy_to_host(out, self.stream)
        self.stream.synchronize()
        return out

    def _drain(self) -> None:
        """Wait for enqueued work before freeing buffers it may use; a failing sync is logged, not raised."""
        stream = self.stream
        if getattr(stream, "handle", None) is None:
            return
        try:
            stream.synchronize()
        except Exception as err:  # noqa: BLE001 - the caller's error (or close) must go on
            log.warning("TrtDenoiseLoop(%s): stream sync before freeing failed: %s", self.names.network, err)

    def _free(self) -> None:
        for buffer in self._owned:
            buffer.close()
        self._owned = []

    def close(self) -> None:
        """Destroy the graph, unbind the engines and free the loop's buffers; the engines stay loaded."""
        if getattr(self, "_closed", True):
            return
        self._drain()
        self.steps.close()
        for engine in (self.network, self.step):
            if not engine.closed:
                engine.unbind()
        self._free()
        self._closed = True

    def __enter__(self) -> "TrtDenoiseLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
