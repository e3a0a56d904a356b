"""What runs a request on loaded artifacts: :class:`Components`.

``Components`` holds one :class:`~kandinsky_trt.runtime.pipelines.loaded.LoadedArtifacts` (``loaded``:
the manifest, the backend and its sessions, tokenizers, constants, scheduler tables, loaded once) and
does the work of a request on it: :meth:`run` a stage network, :meth:`denoise` one chunk of a loop,
split rows into the profiles' batches (:meth:`chunks`) and pick the profile of given shapes. The
combined pipelines hand the same instance to their prior and decoder halves, so nothing is loaded
twice; one instance serves many threads, and the device loops (which own bound buffers) run one
call at a time.

Device residency: on a device backend that copies on the device (TensorRT),
:meth:`Components.resident_chain` gives the pipelines a
:class:`~kandinsky_trt.runtime.pipelines.resident.ResidentChain`, whose stage outputs stay on the
device from the text encoders to the MoVQ output (one download per chunk; ``resident.py``).

Profiles: the artifacts may hold several (batch, size) profiles. A pipeline asks :meth:`Components.chunks`
how to split its rows into the batches the profiles of its size hold; :meth:`run` and :meth:`denoise`
pick the profile from the shapes they are given, so pipelines never name a profile.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np

from kandinsky_trt.runtime.backends.base import Backend, BackendError, DeviceBackend, NetworkSession
from kandinsky_trt.runtime.backends.resident import ResidentStages
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.errors import PipelineInputError, require_finite  # noqa: F401 (re-exported)
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
from kandinsky_trt.runtime.contract.spec import Profile
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.slots import SlotLoop
from kandinsky_trt.runtime.loops.template import LoopInputs, LoopStopped, StepCallback, StopCheck, chunk_rows
from kandinsky_trt.runtime.pipelines.loaded import LoadedArtifacts
from kandinsky_trt.runtime.pipelines.once import OnceCache
from kandinsky_trt.runtime.pipelines.resident import ResidentChain

log = logging.getLogger(__name__)
T = TypeVar("T")
__all__ = ["Components", "PipelineInputError", "split_rows"]


def split_rows(rows: int, batches: list[int]) -> list[tuple[slice, int]]:
    """``rows`` split into calls of the given batch sizes: the fewest padded rows, then the fewest calls.

    Returns (rows of the call, its batch) pairs, largest batches first; only the last call is padded.
    """
    top = max(batches)
    unreachable = rows + top + 1  # more calls than any plan needs
    calls = [0] + [unreachable] * (rows + top)  # calls[t]: fewest calls whose batches sum to exactly t
    for total in range(1, len(calls)):
        calls[total] = min((calls[total - b] + 1 for b in batches if b <= total), default=unreachable)
    # The smallest reachable total >= rows: its padding is below the last call's batch (else a
    # smaller total would do), so only the last call is padded.
    total = next(t for t in range(rows, len(calls)) if calls[t] < unreachable)
    plan = []
    while total:
        batch = max(b for b in batches if b <= total and calls[total - b] == calls[total] - 1)
        plan.append(batch)
        total -= batch
    out, start = [], 0
    for batch in plan:
        out.append((slice(start, min(start + batch, rows)), batch))
        start += batch
    return out


class Components:
    """Runs requests on the loaded contents of one artifacts directory.

    Args:
        artifacts: directory holding ``manifest.json`` (from ``kandinsky-trt export``).
        backend: ``"ort"`` (ONNX Runtime), ``"torch"`` (the original modules) or ``"trt"``.
        device: ``"cpu"`` or ``"cuda"``.
        cuda_graph: on CUDA, replay the denoising loops as CUDA graphs (False: the same bindings eagerly).
    """

    def __init__(self, artifacts: str | os.PathLike, backend: str = "ort", device: str = "cpu",
                 cuda_graph: bool = True) -> None:
        self.loaded = LoadedArtifacts(artifacts, backend, device)
        self.device, self.cuda_graph = device, cuda_graph
        self._loops = OnceCache()  # (LoopSpec, profile) -> the backend's loop (it holds one call's state)
        self._loop_locks = OnceCache()  # (LoopSpec, profile) -> the lock its calls run under
        self._resident = OnceCache()  # "stages" -> the device backend's ResidentStages (resident_chain)
        self._chain_lock = threading.RLock()  # one resident chain at a time: stage outputs are reused
        # Checked before each denoising loop and after each step (e.g. serving: the calling thread's
        # clients have all gone); true stops the loop with LoopStopped. None: never checked.
        self.should_stop: StopCheck | None = None

    @property
    def manifest(self) -> mf.Manifest:
        return self.loaded.manifest

    @property
    def backend(self) -> Backend:
        return self.loaded.backend

    @property
    def profile(self) -> Profile:
        """The default profile (its size serves requests without one; ``cfg`` is every profile's)."""
        return self.loaded.profile

    def denoise(self, spec: LoopSpec, table: SchedulerTable, inputs: LoopInputs,
                callback: StepCallback | None = None) -> np.ndarray:
        """Run one chunk of the loop ``spec`` and return its final latents.

        The loop is a loop of slots (``make_loop``): on host arrays for ``torch`` and ``ort`` on the
        CPU, on bound device buffers for ``ort`` on CUDA and ``trt`` (``cuda_graph=False``: the same
        bindings eagerly); one per (spec, profile), the profile whose latents have the shape of
        ``inputs.latents``, kept until :meth:`close`. Every row of the chunk is admitted at once and
        run to its table's end. A loop holds its slots' state, so its calls run one at a time.
        ``guidance_scale <= 1`` runs the conditional prediction alone, as diffusers does (for every
        strategy, prior and decoders alike). The final latents are checked once for NaN/Inf.
        :attr:`should_stop`, when set, is checked before the loop and after each step (the loop's
        hook: nothing is fetched for it); true raises :class:`LoopStopped`.
        """
        latents = self.with_loop(spec, inputs.latents,
                                 lambda loop: loop.run(chunk_rows(inputs, table), callback, self.should_stop))
        return require_finite(latents, f"{spec.network} loop (final latents)")

    def with_loop(self, spec: LoopSpec, latents: np.ndarray, run: Callable[[SlotLoop], T]) -> T:
        """``run(loop)`` on the loop of ``spec`` at the profile of ``latents``' shape, under its lock
        (see :meth:`denoise`); :attr:`should_stop` is checked first."""
        if self.should_stop is not None and self.should_stop():
            raise LoopStopped(f"{spec.network} loop: stopped before its first step")
        profile = self.profile_of(spec.step, {spec.io.latents: latents})

        def build():
            with self._serial():
                return make_loop(self.backend, spec, profile, cuda_graph=self.cuda_graph)

        key = (spec, profile)
        loop = self._loops.get(key, build)
        with self._serial(), self._loop_locks.get(key, threading.Lock):
            return run(loop)

    @contextmanager
    def resident_chain(self) -> Iterator[ResidentChain | None]:
        """A :class:`~.resident.ResidentChain` on a device backend that copies on the device
        (``DeviceBackend.copies_on_device``: TensorRT), held under the chain lock (a stage's output
        buffer is reused by its next run); None elsewhere (host backends, ONNX Runtime's device
        backend), where the pipelines run stages with :meth:`run`."""
        if not isinstance(self.backend, DeviceBackend) or not self.backend.copies_on_device:
            yield None
            return
        stages = self._resident.get("stages", lambda: ResidentStages(self.backend))
        with self._chain_lock:
            yield ResidentChain(self, stages)

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a stage network once (encoders, MoVQ) at the profile of the feeds' shapes; every output
        is checked for NaN/Inf, naming it."""
        session = self.session(network, self.profile_of(network, feeds))
        with self._serial():
            outputs = session.run(feeds)
        for name, array in outputs.items():
            require_finite(array, f"{network}.{name}")
        return outputs

    def session(self, network: str, profile: int = 0) -> NetworkSession:
        """The loaded network at manifest profile ``profile`` (loaded once: ``LoadedArtifacts.session``)."""
        return self.loaded.session(network, profile)

    def chunks(self, rows: int, size: tuple[int, int] | None = None) -> list[tuple[slice, int]]:
        """``rows`` split into network calls of the batches the profiles of ``size`` hold (None: of any
        size, for the size-independent prior): the fewest padded rows, then the fewest calls."""
        return split_rows(rows, self.manifest.batches(size))

    def profile_of(self, network: str, feeds: Mapping[str, Any]) -> int:
        """The first profile at which ``network``'s inputs named in ``feeds`` have the feeds' shapes."""
        shapes = {name: tuple(np.shape(array)) for name, array in feeds.items()}
        entry = self.manifest.network(network)
        for index, resolved in enumerate(entry.profiles):
            if all(resolved.tensor(name).shape == shape for name, shape in shapes.items()):
                return index
        raise BackendError(f"{network}: expected inputs of the shapes of one of the profiles "
                           f"{[p.name for p in self.manifest.profiles]}, found {shapes}")

    def _serial(self):
        return self.loaded.serial()

    def close(self) -> None:
        for loop in self._loops.values():  # before the backend: they free buffers on its stream
            loop.close()
        self._loops.clear()
        for stages in self._resident.values():
            stages.close()
        self._resident.clear()
        self.loaded.close()

    def __enter__(self) -> "Components":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
