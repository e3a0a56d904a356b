"""The host storage of the loop of slots: numpy arrays through ``NetworkSession.run``.

What every backend without device buffers runs (``ort`` on the CPU, ``torch``), and the reference
the device storage is tested against. The loop itself (admission, per-row steps, retirement) is
:class:`~kandinsky_trt.runtime.loops.slots.SlotLoop`'s; here only the arrays live.
"""

from __future__ import annotations

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError, DeviceRows, NetworkSession
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.contract.spec import ResolvedTensor
from kandinsky_trt.runtime.loops.slots import SlotStorage


class HostStorage(SlotStorage):
    """One host array per network and step-graph input, on two sessions of one backend (not closed here)."""

    def __init__(self, spec: LoopSpec, network: NetworkSession, step: NetworkSession) -> None:
        super().__init__(spec, network.network, step.network)
        self.network, self.step_session = network, step
        linked = {name for name, _ in spec.links}
        self._inputs = {t.name: np.zeros(t.shape, np.dtype(t.dtype)) for t in network.network.inputs}
        self._step_inputs = {t.name: np.zeros(t.shape, np.dtype(t.dtype))
                             for t in step.network.inputs if t.name not in linked}

    def _buffers(self, name: str) -> dict[str, np.ndarray]:
        return self._inputs if name in self._inputs else self._step_inputs

    def write(self, tensor: ResolvedTensor, rows: np.ndarray, values: np.ndarray) -> None:
        if isinstance(values, DeviceRows):
            raise BackendError(f"{tensor.name}: expected host arrays (a host loop), found {values!r}")
        buffers = self._buffers(tensor.name)
        array = buffers[tensor.name]
        if len(rows) == len(array) and values.shape == array.shape and values.dtype == array.dtype:
            buffers[tensor.name] = np.array(values, copy=True)  # every row: a plain copy, never an alias
            return
        if not array.flags.writeable:  # a session's output carried here: copy once before writing rows
            array = buffers[tensor.name] = array.copy()
        array[rows] = values

    def step(self) -> None:
        spec, io = self.spec, self.spec.io
        output = self.network.run(self._inputs)[spec.output]
        result = self.step_session.run({**self._step_inputs, io.model_output: output})
        for written, read in spec.carried:
            self._step_inputs[read] = result[written]
        self._inputs[spec.sample_input] = result[io.model_input]

    def rows(self, tensor: ResolvedTensor, rows: np.ndarray) -> np.ndarray:
        return np.array(self._buffers(tensor.name)[tensor.name][rows], copy=True)

    def read_latents(self) -> np.ndarray:
        return np.array(self._step_inputs[self.spec.io.latents], copy=True)

    def close(self) -> None:
        self._inputs, self._step_inputs = {}, {}
