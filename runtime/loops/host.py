"""The host strategy of the denoising loop: numpy arrays through ``NetworkSession.run``.

What every backend without device buffers runs (``ort`` on the CPU, ``torch``), and the reference
the device strategies are tested against. The loop itself (checks, identity-row start, stepping,
callback) is :class:`~kandinsky_trt.runtime.loops.template.DenoiseLoop`'s; here only the feeds are built.
"""

from __future__ import annotations

import numpy as np

from kandinsky_trt.runtime.backends.base import NetworkSession
from kandinsky_trt.runtime.loops.template import Chunk, DenoiseLoop
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec


class HostLoop(DenoiseLoop):
    """:class:`DenoiseLoop` on two host-level sessions of one backend (it does not close them)."""

    def __init__(self, spec: LoopSpec, network: NetworkSession, step: NetworkSession) -> None:
        super().__init__(spec, network.network, step.network)
        self.network, self.step = network, step
        self._fixed: dict[str, np.ndarray] = {}
        self._conditioning: dict[str, np.ndarray] = {}
        self._state: dict[str, np.ndarray] = {}

    def _start(self, chunk: Chunk) -> None:
        io = self.spec.io
        self._fixed, self._conditioning = dict(chunk.start), chunk.conditioning
        # The loop starts from x0_prev = 0 and the input latents, whatever the identity row wrote.
        self._state = {io.latents: chunk.start[io.latents], io.x0_prev: chunk.start[io.x0_prev],
                       io.model_input: self.step.run(self._fixed)[io.model_input]}

    def _step(self, chunk: Chunk, index: int) -> None:
        spec, io, state = self.spec, self.spec.io, self._state
        feeds = {spec.sample_input: state[io.model_input], **chunk.network_row(index), **self._conditioning}
        output = self.network.run(feeds)[spec.output]
        step_feeds = {**self._fixed, **chunk.step_row(index), io.model_output: output,
                      io.latents: state[io.latents], io.x0_prev: state[io.x0_prev]}
        result = self.step.run(step_feeds)
        for written, read in spec.carried:
            state[read] = result[written]
        state[io.model_input] = result[io.model_input]

    def _latents(self) -> np.ndarray:
        return self._state[self.spec.io.latents]

    def _end(self) -> None:
        self._fixed, self._conditioning = {}, {}

    def _release(self) -> None:
        self._state = {}
