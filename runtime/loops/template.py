"""The denoising loop, once: checks, identity-row start, stepping, callback and download (DESIGN §4).

One chunk runs ``spec.network`` then ``spec.step`` once per row of a :class:`SchedulerTable`. The
step graph does classifier-free guidance and the scheduler update and writes the next network
input (the [uncond, cond] duplicate, plus the inpaint conditioning), so no loop holds model maths;
the first network input comes from the same graph run with :data:`IDENTITY_ROW` on every row.

:class:`DenoiseLoop` owns what every way of running the loop shares:

* the checks, before anything runs: the linked tensors fit each other (at construction); the
  conditioning and step extras are exactly the inputs the loop does not feed, with the spec's
  dtype and shape; the latents' shape; one noise row per stochastic step;
* the chunk's host arrays (:class:`Chunk`): the identity-row start feeds of the step graph and
  the per-step rows on the per-row contract, in lockstep (timestep ``(n, B2)``, coefficients ``(n, B, K)``:
  the table's row for every batch row; the guidance ``(B, 1)``; and noise ``(n, *latent)`` —
  ``inputs.noise[k]`` on the k-th stochastic step, zeros elsewhere — when any step is stochastic);
* the stepping: ``_start``, then ``_step(i)`` per row with ``callback(i, t, latents)`` after each
  (diffusers' contract), then ``_latents()``; ``_abort`` on an error, ``_end`` always; ``close``;
* the stop hook: ``should_stop()`` after each step (before the next is enqueued) raises
  :class:`LoopStopped` when true. Unlike a callback it fetches nothing: a device loop pays no
  download or sync for it (only ``_abort``'s wait when it does stop), and the loop stays reusable.

Three strategies fill in where the tensors live: :class:`~kandinsky_trt.runtime.loops.host.HostLoop`
(host numpy through ``NetworkSession.run``), :class:`~kandinsky_trt.runtime.loops.ort_bound.OrtBoundLoop`
(ONNX Runtime IO bindings, its CUDA graphs) and :class:`~kandinsky_trt.runtime.loops.trt_graph.TrtGraphLoop`
(TensorRT bindings, one stream, one CUDA graph per step). A backend returns its own
(``backend.loop(spec, profile, cuda_graph=...)``). Imports: numpy and the runtime's spec and errors only.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
from kandinsky_trt.runtime.contract.spec import COEFFICIENT_COLUMNS, ResolvedNetwork, ResolvedTensor
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec

from kandinsky_trt.runtime.loops.slots import (IDENTITY_ROW, LoopRow, LoopStopped, StepCallback, StopCheck,  # noqa: F401
                                               check_linked, guided)


@dataclass(frozen=True)
class LoopInputs:
    """One batch-sized chunk: initial latents, the network's fixed inputs, the step graph's extras."""

    latents: np.ndarray
    conditioning: dict[str, np.ndarray]  # network inputs other than sample / timestep
    step_extras: dict[str, np.ndarray]  # e.g. ``conditioning`` of the inpaint step graph
    noise: np.ndarray | None  # (stochastic steps, *latents.shape)
    guidance_scale: float


def conditional_only(inputs: LoopInputs) -> LoopInputs:
    """The loop inputs without guidance on a cfg profile (``guidance_scale <= 1``).

    The networks' batch stays [uncond; cond] (static shapes), so both halves get the conditional
    inputs and the scale becomes 1: ``eps = u + 1 * (c - u)`` with ``u == c`` is the conditional
    prediction, which is what diffusers computes (it runs the conditional batch alone), whatever
    scale <= 1 was asked for. The step graph's inpaint ``conditioning`` is [cond; cond] already.
    """
    rows = len(inputs.latents)
    conditioning = {}
    for name, array in inputs.conditioning.items():
        if len(array) != 2 * rows:
            raise ValueError(f"conditioning {name}: expected {2 * rows} rows ([uncond; cond]), found {len(array)}")
        conditioning[name] = np.concatenate([array[rows:], array[rows:]])
    return replace(inputs, conditioning=conditioning, guidance_scale=1.0)


def chunk_rows(inputs: LoopInputs, table: SchedulerTable) -> list[LoopRow]:
    """A chunk's rows as the loop of slots takes them: row ``j`` gets network rows ``j, B + j, ...``
    of each conditioning array, its latents, its noise rows and the chunk's table and guidance."""
    batch = len(inputs.latents)

    def per_row(arrays: Mapping[str, np.ndarray], j: int) -> dict[str, np.ndarray]:
        return {name: np.asarray(array)[j::batch] for name, array in arrays.items()}

    noise = None if inputs.noise is None else np.asarray(inputs.noise)
    return [LoopRow(np.asarray(inputs.latents)[j], per_row(inputs.conditioning, j), table, inputs.guidance_scale,
                    None if noise is None else noise[:, j], per_row(inputs.step_extras, j)) for j in range(batch)]


@dataclass(frozen=True)
class Chunk:
    """One call's checked host arrays, as every strategy consumes them."""

    conditioning: dict[str, np.ndarray]  # network inputs the loop does not feed
    start: dict[str, np.ndarray]  # every step-graph input of the identity-row run (extras included)
    network_rows: dict[str, np.ndarray]  # per-step rows of network inputs: timestep (n, B2)
    step_rows: dict[str, np.ndarray]  # per-step rows of step inputs: coefficients (n, B, K) [, noise]
    timesteps: np.ndarray  # (n,) the table's timesteps, for the callback
    stochastic: np.ndarray  # (n,) bool

    def __len__(self) -> int:
        return len(self.timesteps)

    def network_row(self, index: int) -> dict[str, np.ndarray]:
        return {name: rows[index] for name, rows in self.network_rows.items()}

    def step_row(self, index: int) -> dict[str, np.ndarray]:
        return {name: rows[index] for name, rows in self.step_rows.items()}


def checked(tensor: ResolvedTensor, array: Any, what: str) -> np.ndarray:
    """``array`` as a contiguous host array of exactly ``tensor``'s dtype and shape."""
    array = np.asarray(array)
    if array.shape != tensor.shape or array.dtype != np.dtype(tensor.dtype):
        raise BackendError(f"{what}: expected {tensor.dtype}{list(tensor.shape)}, "
                           f"found {array.dtype}{list(array.shape)}")
    return np.ascontiguousarray(array)


def check_group(network: ResolvedNetwork, arrays: Mapping[str, Any], fed: tuple[str, ...],
                what: str) -> dict[str, np.ndarray]:
    """Every input of ``network`` not in ``fed``, exactly ``arrays``' keys, each checked."""
    expected = sorted(n for n in network.input_names if n not in fed)
    if sorted(arrays) != expected:
        raise BackendError(f"{what}: expected {expected}, found {sorted(arrays)}")
    return {n: checked(network.tensor(n), arrays[n], f"{what}[{n!r}]") for n in expected}


class DenoiseLoop(abc.ABC):
    """The loop template: call it with a table and one chunk's inputs; it returns the final latents.

    Args:
        spec: which network and step graph, and how they are linked.
        network, step: their resolved I/O (from the manifest).

    Raises:
        BackendError: the linked tensors do not fit each other.
    """

    def __init__(self, spec: LoopSpec, network: ResolvedNetwork, step: ResolvedNetwork) -> None:
        check_linked(spec, network, step)
        self.spec, self.network_io, self.step_io = spec, network, step
        self._closed = False

    def __call__(self, table: SchedulerTable, inputs: LoopInputs, callback: StepCallback | None = None,
                 should_stop: StopCheck | None = None) -> np.ndarray:
        """Run every row of ``table`` on one chunk and return the final latents (host numpy).

        Raises:
            LoopStopped: ``should_stop()`` was true after a step (checked after every step but the last).
        """
        if self._closed:
            raise BackendError(f"{type(self).__name__}({self.spec.network}): expected an open loop, found it closed")
        chunk = self.chunk(table, inputs)
        try:
            self._start(chunk)
            for i, t in enumerate(chunk.timesteps):
                self._step(chunk, i)
                if callback is not None:
                    callback(i, int(t), self._latents())
                if should_stop is not None and i + 1 < len(chunk) and should_stop():
                    raise LoopStopped(f"{self.spec.network} loop: stopped after step {i + 1} of {len(chunk)}")
            return self._latents()
        except BaseException:
            self._abort()
            raise
        finally:
            self._end()

    def chunk(self, table: SchedulerTable, inputs: LoopInputs) -> Chunk:
        """Check one call's inputs and build its host arrays; nothing runs."""
        spec, io, step = self.spec, self.spec.io, self.step_io
        conditioning = check_group(self.network_io, inputs.conditioning, spec.network_fed, "inputs.conditioning")
        extras = check_group(step, inputs.step_extras, spec.step_fed, "inputs.step_extras")
        zeros = np.zeros(step.tensor(io.latents).shape, np.float32)
        latents = checked(step.tensor(io.latents), np.asarray(inputs.latents).astype(np.float32), "inputs.latents")
        # Lockstep on the per-row contract: every batch row gets the chunk's table row and guidance.
        batch = step.tensor(io.coefficients).shape[0]
        identity = np.tile(IDENTITY_ROW, (batch, 1))
        start = {**extras, io.latents: latents, io.x0_prev: zeros, io.noise: zeros, io.coefficients: identity,
                 io.guidance_scale: np.full(step.tensor(io.guidance_scale).shape, inputs.guidance_scale, np.float32),
                 io.model_output: np.zeros(step.tensor(io.model_output).shape, np.float32)}
        n = len(table)
        coefficients = np.repeat(np.asarray(table.coefficients, np.float32)[:, None, :], batch, axis=1)
        step_rows = {io.coefficients: np.ascontiguousarray(coefficients)}
        if table.stochastic.any():
            step_rows[io.noise] = self._noise_rows(table, inputs)
        width = self.network_io.tensor(spec.timestep).shape[0]
        timesteps = np.repeat(table.timesteps.astype(np.float32).reshape(n, 1), width, axis=1)
        network_rows = {spec.timestep: np.ascontiguousarray(timesteps)}
        return Chunk(conditioning, start, network_rows, step_rows, table.timesteps, table.stochastic)

    def _noise_rows(self, table: SchedulerTable, inputs: LoopInputs) -> np.ndarray:
        """(n, *latent): ``inputs.noise[k]`` on the k-th stochastic step, zeros elsewhere."""
        index = np.flatnonzero(table.stochastic)
        have = 0 if inputs.noise is None else len(inputs.noise)
        if have < len(index):
            raise BackendError(f"inputs.noise: expected {len(index)} rows (one per stochastic step), found {have}")
        shape = self.step_io.tensor(self.spec.io.noise).shape
        noise = np.asarray(inputs.noise[:len(index)]).astype(np.float32)
        if noise.shape[1:] != shape:
            raise BackendError(f"inputs.noise: expected rows of shape {list(shape)}, found {list(noise.shape[1:])}")
        rows = np.zeros((len(table), *shape), np.float32)
        rows[index] = noise
        return rows

    @abc.abstractmethod
    def _start(self, chunk: Chunk) -> None:
        """Take the chunk's fixed inputs and state, and build the first network input (identity row)."""

    @abc.abstractmethod
    def _step(self, chunk: Chunk, index: int) -> None:
        """Run (or enqueue) step ``index``: its rows, the network, the step graph, the carries."""

    @abc.abstractmethod
    def _latents(self) -> np.ndarray:
        """The current latents on the host (the download; where work is queued, its sync)."""

    def _abort(self) -> None:
        """After an error inside a call: wait for queued work that may use what ``_end`` frees."""

    def _end(self) -> None:
        """After every call: free what the chunk needed."""

    def _release(self) -> None:
        """Free what the loop holds (once, from :meth:`close`)."""

    def close(self) -> None:
        """Free the loop's buffers and graphs (idempotent); the backend stays open."""
        if not self._closed:
            self._release()
            self._closed = True

    def __enter__(self) -> "DenoiseLoop":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
