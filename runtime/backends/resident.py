"""Stage networks run on device buffers, their outputs left on the device (issue 19, item 5).

:class:`ResidentStages` binds each stage network (text encoders, MoVQ) once per profile to buffers
of its own on a :class:`~kandinsky_trt.runtime.backends.base.DeviceBackend` and runs it there:
a feed is a host array (uploaded) or :class:`~kandinsky_trt.runtime.backends.base.DeviceRows`
(copied on the device by ``write_rows``), and the outputs come back as ``DeviceRows`` of the
binding's output buffers: nothing is downloaded (and on TensorRT nothing waits; ONNX Runtime's
``Run`` returns after its stream finished). :meth:`ResidentStages.inputs`
names a stage's bound inputs, so the stage before can write straight into them (no extra copy, and
on ONNX Runtime no extra host hop); :meth:`ResidentStages.scratch` lends a buffer that lives
as long as the stages (a loop's retired latents); :meth:`ResidentStages.download` is the one
download and its sync.

An output stays valid until the next run of the same network at the same profile, and a scratch
buffer until its next use: a chain (text encoder -> loop -> MoVQ -> download) must run under one
lock, which the caller holds (``Components.resident_chain``). Where a backend's copies go through
the host (ONNX Runtime's Python API, see ``ort_cuda.py``), the chain is still correct; it only
keeps the hops that backend documents. Standard library + numpy + the backend interface.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError, BoundNetwork, DeviceBackend, DeviceRows, StepRunner
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork, ResolvedTensor

Feed = np.ndarray | DeviceRows


@dataclass(frozen=True)
class _Stage:
    network: ResolvedNetwork
    buffers: dict[str, Any]
    binding: BoundNetwork
    runner: StepRunner


class ResidentStages:
    """Stage networks bound once per (network, profile) on ``backend`` (not closed here)."""

    def __init__(self, backend: DeviceBackend) -> None:
        self.backend = backend
        self._stages: dict[tuple[str, int], _Stage] = {}
        self._scratch: dict[tuple, DeviceRows] = {}
        self._lock = threading.Lock()  # creation only; runs are serialised by the caller's chain lock

    def run(self, network: str, feeds: Mapping[str, Feed], profile: int = 0) -> dict[str, DeviceRows]:
        """Write ``feeds`` (every input, exact shapes) into the stage's bound inputs, enqueue it once,
        and return its outputs as device rows (valid until its next run)."""
        stage = self._stage(network, profile)
        given, expected = sorted(feeds), sorted(stage.network.input_names)
        if given != expected:
            raise BackendError(f"{network}: inputs expected {expected}, found {given}")
        for tensor in stage.network.inputs:
            value, buffer = feeds[tensor.name], stage.buffers[tensor.name]
            _check_whole(value, tensor, network)
            if isinstance(value, DeviceRows) and value.buffer is buffer and value.rows == tuple(range(len(value))):
                continue  # already in place (written through :meth:`inputs`)
            self.backend.write_rows(buffer, tensor, 0, value)
        stage.runner.run()
        return {t.name: DeviceRows(stage.buffers[t.name], t) for t in stage.network.outputs}

    def inputs(self, network: str, profile: int = 0) -> dict[str, DeviceRows]:
        """The stage's bound input buffers as device rows: an earlier stage may write its output
        straight into them (a loop's retired latents into MoVQ's input), and :meth:`run` fed with
        them copies nothing."""
        stage = self._stage(network, profile)
        return {t.name: DeviceRows(stage.buffers[t.name], t) for t in stage.network.inputs}

    def scratch(self, tensor: ResolvedTensor, key: Any) -> DeviceRows:
        """A buffer for ``tensor``, one per ``key``, allocated on first use (its contents are the last user's)."""
        with self._lock:
            if key not in self._scratch:
                self._scratch[key] = DeviceRows(self.backend.allocate(tensor), tensor)
            return self._scratch[key]

    def download(self, rows: DeviceRows) -> np.ndarray:
        """A host copy of ``rows`` after everything enqueued before: one download, one sync."""
        whole = self.backend.read(rows.buffer, rows.tensor)
        return whole if rows.rows == tuple(range(len(whole))) else whole[list(rows.rows)]

    def _stage(self, network: str, profile: int) -> _Stage:
        with self._lock:
            stage = self._stages.get((network, profile))
            if stage is None:
                stage = self._stages[(network, profile)] = self._bind(network, profile)
            return stage

    def _bind(self, network: str, profile: int) -> _Stage:
        resolved = self.backend.load(network, profile).network
        buffers = {t.name: self.backend.allocate(t) for t in resolved.inputs + resolved.outputs}
        try:
            binding = self.backend.bind(network, buffers, profile)
        except BaseException:
            self.backend.free(buffers.values())
            raise
        return _Stage(resolved, buffers, binding, self.backend.runner((binding,), cuda_graph=False))

    def close(self) -> None:
        """Free every buffer once queued work is done (``DeviceBackend.free``), then the bindings; idempotent."""
        with self._lock:
            stages, self._stages = list(self._stages.values()), {}
            scratch, self._scratch = list(self._scratch.values()), {}
        buffers = [b for s in stages for b in s.buffers.values()] + [rows.buffer for rows in scratch]
        if buffers:
            self.backend.free(buffers)
        for stage in stages:
            stage.runner.close()
            stage.binding.close()


def _check_whole(value: Feed, tensor: ResolvedTensor, network: str) -> None:
    """A feed must be the whole tensor: a host array or device rows of its exact shape and dtype."""
    array = value if isinstance(value, DeviceRows) else np.asarray(value)
    if (array.dtype, tuple(array.shape)) != (np.dtype(tensor.dtype), tuple(tensor.shape)):
        raise BackendError(f"{network}.{tensor.name}: expected {tensor.dtype}{list(tensor.shape)}, "
                           f"found {array.dtype}{list(array.shape)}")
