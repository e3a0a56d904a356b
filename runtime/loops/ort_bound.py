"""The ONNX Runtime strategy of the denoising loop: IO bindings made once, ONNX Runtime's CUDA graphs.

The loop (checks, identity-row start, stepping, callback) is
:class:`~kandinsky_trt.runtime.loops.template.DenoiseLoop`'s; here is where the tensors live. Every buffer
is allocated once and bound once through the backend's device level
(:meth:`OrtCudaBackend.allocate` / :meth:`OrtCudaBackend.bind`):

* the network reads its sample input (S), ``timestep`` (T) and its conditioning and writes its
  output (O);
* the step graph reads O, the coefficient rows (C), the noise row (N) and the guidance scales, and
  writes ``model_input`` straight into S (another session's input, so aliasing is allowed);
* one session cannot read and write the same buffer, so the step graph has two bindings that
  ping-pong the carried state (``spec.carried``): A reads (L0, X0) and writes (L1, X1), B reads
  (L1, X1) and writes (L0, X0), where L is ``latents`` / ``latents_next`` and X is ``x0_prev`` /
  ``x0``. Each binding has its own graph id, so each is captured once and replayed.

Per step the host copies the timestep row (B2,) and the coefficient rows (B, K) into their buffers, plus
the noise row when the step is stochastic (zeros once when a deterministic step follows a noisy
one), then runs the network and the step graph. Nothing is copied back until the end (or for a
``callback``, which gets the latents of each step and so costs one device-to-host copy per step).
ONNX Runtime's ``Run`` returns after its CUDA stream finished (a graph replay too); the loop adds
one device synchronisation per step so that the uploads are complete before the network runs
(:meth:`BoundRun.synchronize_inputs`). A loop with no synchronisation at all needs one stream
for both networks: that is the TensorRT strategy (``runtime/loops/trt_graph.py``).

On the CPU execution provider the same code runs with host buffers and no graphs; tests compare
it with the host loop on the tiny artifacts. The CUDA path is written to ONNX Runtime's documented
IO-binding and CUDA-graph API and is exercised only by the ``gpu`` tests.
"""

from __future__ import annotations

import logging

import numpy as np

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.ort_cuda import CudaGraphOptions, OrtCudaBackend, upload
from kandinsky_trt.runtime.loops.template import Chunk, DenoiseLoop
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec

log = logging.getLogger(__name__)


class OrtBoundLoop(DenoiseLoop):
    """:class:`DenoiseLoop` with every tensor bound once on ``backend``'s device.

    Args:
        backend: the :class:`OrtCudaBackend` whose sessions run the loop.
        spec: which network and step graph.
        profile: the manifest profile whose shapes the buffers have.
        replay_graphs: False runs the same bindings eagerly (``gpu_graph_id`` -1), to compare.
        owner: closed with the loop (the backend :func:`bound_loop` creates), or None.
    """

    def __init__(self, backend: OrtCudaBackend, spec: LoopSpec, profile: int = 0, replay_graphs: bool = True,
                 owner: OrtCudaBackend | None = None) -> None:
        network, step = backend.load(spec.network, profile).network, backend.load(spec.step, profile).network
        super().__init__(spec, network, step)
        self._owner, self.replay_graphs = owner, replay_graphs
        self.network_buffers = {t.name: backend.allocate(t) for t in network.inputs + network.outputs}
        self.state = {read: (backend.allocate(step.tensor(read)), backend.allocate(step.tensor(read)))
                      for _, read in spec.carried}
        carried = {name for pair in spec.carried for name in pair}
        linked = {name for name, _ in spec.links}
        self.step_buffers = {n: backend.allocate(step.tensor(n)) for n in step.input_names
                             if n not in carried and n not in linked}
        self._network_run = backend.bind(spec.network, self.network_buffers, profile)
        self._step_runs = (backend.bind(spec.step, self._step_binding(0), profile),
                           backend.bind(spec.step, self._step_binding(1), profile))
        self._side, self._noisy = 1, False

    @property
    def graph_ids(self) -> dict[str, int | None]:
        """The ``gpu_graph_id`` of each binding (None without CUDA graphs)."""
        return {"network": self._network_run.graph_id, "step_a": self._step_runs[0].graph_id,
                "step_b": self._step_runs[1].graph_id}

    def _step_binding(self, side: int) -> dict:
        """Binding ``side`` reads state buffers ``side`` and writes state buffers ``1 - side``."""
        buffers = dict(self.step_buffers)
        for written, read in self.spec.carried:
            buffers[read], buffers[written] = self.state[read][side], self.state[read][1 - side]
        for step_name, net_name in self.spec.links:
            buffers[step_name] = self.network_buffers[net_name]
        return buffers

    def _start(self, chunk: Chunk) -> None:
        """Upload the chunk and build the first network input with the identity row (binding A)."""
        for name, array in chunk.conditioning.items():
            upload(self.network_buffers[name], array, f"inputs.conditioning[{name!r}]")
        binding_a = self._step_runs[0].buffers  # reads the state buffers 0 and the network's output
        for name, array in chunk.start.items():
            upload(binding_a[name], array, name)
        self._step_runs[0].synchronize_inputs()
        self._step_runs[0].enqueue(graph=self.replay_graphs)
        # The loop starts from x0_prev = 0 whatever the identity row wrote into x0.
        x0_prev = self.spec.io.x0_prev
        upload(self.state[x0_prev][1], chunk.start[x0_prev], x0_prev)
        self._side, self._noisy = 1, False  # after the identity row the state is in buffers 1
        log.debug("%s: first input built by %s with the identity row", self.spec.network, self.spec.step)

    def _step(self, chunk: Chunk, index: int) -> None:
        io = self.spec.io
        for name, row in chunk.network_row(index).items():
            upload(self.network_buffers[name], row, name)
        upload(self.step_buffers[io.coefficients], chunk.step_rows[io.coefficients][index], io.coefficients)
        if chunk.stochastic[index]:
            upload(self.step_buffers[io.noise], chunk.step_rows[io.noise][index], f"{io.noise}[{index}]")
            self._noisy = True
        elif self._noisy:  # deterministic steps read zeros
            upload(self.step_buffers[io.noise], chunk.start[io.noise], io.noise)
            self._noisy = False
        self._network_run.synchronize_inputs()
        self._network_run.enqueue(graph=self.replay_graphs)
        self._step_runs[self._side].enqueue(graph=self.replay_graphs)
        self._side = 1 - self._side

    def _latents(self) -> np.ndarray:
        """A host copy of the current latents buffer (``OrtValue.numpy`` is a view on the CPU EP)."""
        self._step_runs[1 - self._side].synchronize_outputs()
        return np.array(self.state[self.spec.io.latents][self._side].numpy(), copy=True)

    def _release(self) -> None:
        for run in (self._network_run, *self._step_runs):
            run.close()
        self.network_buffers, self.state, self.step_buffers = {}, {}, {}
        if self._owner is not None:
            self._owner.close()
            self._owner = None


def bound_loop(manifest: mf.Manifest, spec: LoopSpec, profile: int = 0, device: str = "cuda",
               cuda_graph: bool = True) -> OrtBoundLoop:
    """A bound loop over sessions of its own (an :class:`OrtCudaBackend` closed with the loop).

    Raises:
        BackendError: ``device="cuda"`` without onnxruntime-gpu, or artifacts that do not load.
    """
    backend = OrtCudaBackend(manifest, device, CudaGraphOptions(enabled=cuda_graph))
    try:
        return OrtBoundLoop(backend, spec, profile, owner=backend)
    except BaseException:
        backend.close()
        raise
