"""The denoising loop of ``denoise.py`` on device buffers: ONNX Runtime bindings, CUDA graphs on the CUDA EP.

Same loop, same inputs (:class:`~kandinsky_trt.runtime.denoise.LoopInputs`), same coefficient table,
same identity-row trick for the first network input; the difference is where the tensors live.
Every buffer is allocated once (:mod:`~kandinsky_trt.runtime.backends.ort_cuda`) and bound once:

* the network reads ``sample`` / ``hidden_states`` (S), ``timestep`` (T) and its conditioning and
  writes its output (O);
* the step graph reads O, the coefficient row (C), the noise row (N) and the guidance scale, and
  writes ``model_input`` straight into S (another session's input, so aliasing is allowed);
* one session cannot read and write the same buffer, so the step graph has two bindings that
  ping-pong the state: A reads (L0, X0) and writes (L1, X1), B reads (L1, X1) and writes (L0, X0),
  where L is ``latents`` / ``latents_next`` and X is ``x0_prev`` / ``x0``. Each binding has its own
  graph id, so each is captured once and replayed.

Per step the host copies the timestep (1,) and the coefficient row (K,) into their buffers, plus
the noise row when the step is stochastic (zeros once when a deterministic step follows a noisy
one), then runs the network and the step graph. Nothing is copied back until the end (or for a
``callback``, which gets the latents of each step and so costs one device-to-host copy per step).
ONNX Runtime's ``Run`` returns after its CUDA stream finished (a graph replay too); the loop adds
one device synchronisation per step so that the uploads are complete before the network runs
(:meth:`BoundRun.synchronize_inputs`). A loop with no synchronisation at all needs one stream
for both networks: that is the TensorRT path (``runtime/cuda_graphs.py``).

On the CPU execution provider the same code runs with host buffers and no graphs; tests compare
it with :func:`~kandinsky_trt.runtime.denoise.denoise` on the tiny artifacts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.ort_cuda import CudaGraphOptions, DeviceSession, OrtCudaBackend, upload
from kandinsky_trt.runtime.denoise import IDENTITY_ROW, LoopInputs, LoopNames, LoopNetworks, StepCallback
from kandinsky_trt.runtime.schedulers import SchedulerTable

log = logging.getLogger(__name__)

# Step-graph tensors the loop manages; any other step input (inpaint ``conditioning``) is an extra.
_STATE = {"latents": "latents_next", "x0_prev": "x0"}  # input read -> output written (ping-pong)
_STEP_OWN = ("coefficients", "noise", "guidance_scale")
_STEP_LINKED = ("model_output", "model_input")  # the network's output and sample input


@dataclass(frozen=True)
class DeviceLoopNetworks:
    network: DeviceSession
    step: DeviceSession
    sample_input: str
    output: str

    @property
    def names(self) -> LoopNames:
        return LoopNames(self.network.network.name, self.step.network.name, self.sample_input, self.output)


def _check_linked(nets: DeviceLoopNetworks) -> None:
    """The step graph's model_output / model_input must fit the network's output / sample input."""
    pairs = (("model_output", nets.output), ("model_input", nets.sample_input))
    for step_name, net_name in pairs:
        ours, theirs = nets.step.network.tensor(step_name), nets.network.network.tensor(net_name)
        if (ours.shape, ours.dtype) != (theirs.shape, theirs.dtype):
            raise BackendError(
                f"{nets.step.network.name}.{step_name}: expected {theirs.dtype}{list(theirs.shape)} like "
                f"{nets.network.network.name}.{net_name}, found {ours.dtype}{list(ours.shape)}")


class DeviceDenoiseLoop:
    """``denoise()`` with every tensor bound once on the device; call it like ``denoise``.

    Args:
        nets: the network and step sessions (from one :class:`OrtCudaBackend`) and the tensor names
            that link them.
        owner: closed with the loop (the backend :func:`make_loop` creates), or None.
    """

    def __init__(self, nets: DeviceLoopNetworks, owner: OrtCudaBackend | None = None) -> None:
        _check_linked(nets)
        self.nets = nets
        self._owner = owner
        network, step = nets.network, nets.step
        self.network_buffers = {n: network.allocate(n) for n in network.network.input_names + network.network.output_names}
        self.state = {name: (step.allocate(name), step.allocate(name)) for name in _STATE}
        self.step_buffers = {n: step.allocate(n) for n in step.network.input_names
                             if n not in _STATE and n not in _STEP_LINKED}
        self._network_run = network.bind(self.network_buffers)
        self._step_runs = (step.bind(self._step_binding(0)), step.bind(self._step_binding(1)))
        self._zeros = np.zeros(step.network.tensor("latents").shape, np.float32)
        self.replay_graphs = True  # False: the same bindings eagerly (gpu_graph_id -1), to compare

    @property
    def graph_ids(self) -> dict[str, int | None]:
        """The ``gpu_graph_id`` of each binding (None without CUDA graphs)."""
        return {"network": self._network_run.graph_id, "step_a": self._step_runs[0].graph_id,
                "step_b": self._step_runs[1].graph_id}

    def _step_binding(self, side: int) -> dict:
        """Binding ``side`` reads state buffers ``side`` and writes state buffers ``1 - side``."""
        buffers = dict(self.step_buffers)
        for read, written in _STATE.items():
            buffers[read], buffers[written] = self.state[read][side], self.state[read][1 - side]
        buffers["model_output"] = self.network_buffers[self.nets.output]
        buffers["model_input"] = self.network_buffers[self.nets.sample_input]
        return buffers

    def __call__(self, nets: LoopNetworks | LoopNames | None, table: SchedulerTable, inputs: LoopInputs,
                 callback: StepCallback | None = None) -> np.ndarray:
        """Run every row of ``table`` on one chunk and return the final latents (host numpy)."""
        self._check_names(nets)
        self._check_noise(table, inputs)
        self._start(inputs)
        side = self._run_steps(table, inputs, callback)
        return self._host(side)

    def _check_names(self, nets: LoopNetworks | LoopNames | None) -> None:
        if nets is None:
            return
        found = nets if isinstance(nets, LoopNames) else LoopNames.of(nets)
        if found != self.nets.names:
            raise BackendError(f"nets: this loop was built for {self.nets.names}, found {found}")

    def _check_noise(self, table: SchedulerTable, inputs: LoopInputs) -> None:
        needed = int(table.stochastic.sum())
        have = 0 if inputs.noise is None else len(inputs.noise)
        if have < needed:
            raise BackendError(f"inputs.noise: expected {needed} rows (one per stochastic step), found {have}")

    def _start(self, inputs: LoopInputs) -> None:
        """Upload the chunk and build the first network input with the identity row (binding A)."""
        net, step = self.nets.network.network, self.nets.step.network
        self._upload_group(inputs.conditioning, net.input_names, (self.nets.sample_input, "timestep"),
                           self.network_buffers, "inputs.conditioning")
        extras = {k: v for k, v in self.step_buffers.items() if k not in _STEP_OWN}
        self._upload_group(inputs.step_extras, list(extras), (), extras, "inputs.step_extras")
        upload(self.state["latents"][0], np.asarray(inputs.latents).astype(np.float32), "inputs.latents")
        upload(self.state["x0_prev"][0], self._zeros, "x0_prev")
        upload(self.step_buffers["noise"], self._zeros, "noise")
        output = self.network_buffers[self.nets.output]
        upload(output, np.zeros(net.tensor(self.nets.output).shape, np.float32), self.nets.output)
        upload(self.step_buffers["guidance_scale"], np.array([inputs.guidance_scale], np.float32), "guidance_scale")
        upload(self.step_buffers["coefficients"], IDENTITY_ROW, "coefficients")
        self._step_runs[0].synchronize_inputs()
        self._step_runs[0].run(self.replay_graphs)
        # denoise() starts from x0_prev = 0 whatever the identity row wrote into x0.
        upload(self.state["x0_prev"][1], self._zeros, "x0_prev")
        log.debug("%s: first input built by %s with the identity row", net.name, step.name)

    @staticmethod
    def _upload_group(arrays: dict, names: list[str], skip: tuple, buffers: dict, what: str) -> None:
        expected = sorted(n for n in names if n not in skip)
        if sorted(arrays) != expected:
            raise BackendError(f"{what}: expected {expected}, found {sorted(arrays)}")
        for name in expected:
            upload(buffers[name], arrays[name], f"{what}[{name!r}]")

    def _run_steps(self, table: SchedulerTable, inputs: LoopInputs, callback: StepCallback | None) -> int:
        """Run the table; returns the state side holding the final latents."""
        noise, noise_index, noisy = self.step_buffers["noise"], 0, False
        side = 1  # after the identity row the state is in buffers 1
        for i, t in enumerate(table.timesteps):
            upload(self.network_buffers["timestep"], np.array([t], np.float32), "timestep")
            upload(self.step_buffers["coefficients"], table.coefficients[i], "coefficients")
            if table.stochastic[i]:
                upload(noise, np.asarray(inputs.noise[noise_index]).astype(np.float32), f"inputs.noise[{noise_index}]")
                noise_index, noisy = noise_index + 1, True
            elif noisy:  # denoise() passes zeros on deterministic steps
                upload(noise, self._zeros, "noise")
                noisy = False
            self._network_run.synchronize_inputs()
            self._network_run.run(self.replay_graphs)
            self._step_runs[side].run(self.replay_graphs)
            side = 1 - side
            if callback is not None:
                callback(i, int(t), self._host(side))
        return side

    def _host(self, side: int) -> np.ndarray:
        """A host copy of latents buffer ``side`` (``OrtValue.numpy`` is a view on the CPU EP)."""
        self._step_runs[1 - side].synchronize_outputs()
        return np.array(self.state["latents"][side].numpy(), copy=True)

    def close(self) -> None:
        self._network_run = self._step_runs = None
        self.network_buffers, self.state, self.step_buffers = {}, {}, {}
        if self._owner is not None:
            self._owner.close()
            self._owner = None

    def __enter__(self) -> "DeviceDenoiseLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def make_loop(components, nets: LoopNetworks | LoopNames, device: str = "cuda",
              cuda_graph: bool = True) -> DeviceDenoiseLoop:
    """A device loop for ``nets`` over ``components``' artifacts, callable like ``denoise``.

    It loads its own sessions (CUDA graphs are a session option, and captured graphs must not be
    shared with other buffers), so pass :class:`LoopNames` to avoid loading the host sessions too.
    Close it (or use ``with``) to free them.

    Raises:
        BackendError: ``device="cuda"`` without onnxruntime-gpu, or artifacts that do not load.
    """
    names = nets if isinstance(nets, LoopNames) else LoopNames.of(nets)
    backend = OrtCudaBackend(components.manifest, device, CudaGraphOptions(enabled=cuda_graph))
    try:
        loop_nets = DeviceLoopNetworks(backend.device_session(names.network), backend.device_session(names.step),
                                       names.sample_input, names.output)
        return DeviceDenoiseLoop(loop_nets, owner=backend)
    except BaseException:
        backend.close()
        raise
