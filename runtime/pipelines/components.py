"""What one artifacts directory provides, loaded once and shared by every pipeline built on it.

``Components`` owns the backend (and so every loaded network), the tokenizers, the constants and
the scheduler tables; the combined pipelines hand the same instance to their prior and decoder
halves, so nothing is loaded twice. Everything is loaded on first use through a :class:`OnceCache`,
so one instance serves many threads with exactly one session per network; the device loops (which
own bound buffers) run one call at a time.

Profiles: the artifacts may hold several (batch, size) profiles. A pipeline asks :meth:`Components.chunks`
how to split its rows into the batches the profiles of its size hold; :meth:`run` and :meth:`denoise`
pick the profile from the shapes they are given, so pipelines never name a profile.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import nullcontext

import numpy as np

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.base import BackendError, NetworkSession
from kandinsky_trt.runtime.backends.registry import check_backend, make_backend
from kandinsky_trt.runtime.contract.errors import PipelineInputError, require_finite
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.template import LoopInputs, LoopStopped, StepCallback, StopCheck, chunk_rows
from kandinsky_trt.runtime.pipelines.once import OnceCache
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable, fast_solver_config, scheduler_table
from kandinsky_trt.runtime.contract.spec import LATENT_CHANNELS, Profile
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.processing.tokenization import TextTokenizer

log = logging.getLogger(__name__)

# CLI / API scheduler names -> which manifest config they use.
DECODER_SCHEDULERS = ("ddim", "ddpm", "dpmpp2m")
__all__ = ["Components", "split_rows"]


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
    """The loaded contents of one artifacts directory.

    Args:
        artifacts: directory holding ``manifest.json`` (from ``kandinsky-trt export``).
        backend: ``"ort"`` (ONNX Runtime), ``"torch"`` (the original modules) or ``"trt"``.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, artifacts: str | os.PathLike, backend: str = "ort", device: str = "cpu",
                 cuda_graph: bool = True) -> None:
        check_backend(backend)
        self.manifest = mf.load_manifest(artifacts)
        self.backend = make_backend(backend, self.manifest, device)
        self.device, self.cuda_graph = device, cuda_graph
        self._cache = OnceCache()  # sessions, tokenizers, constants, scheduler tables
        self._loops = OnceCache()  # (LoopSpec, profile) -> the backend's loop (it holds one call's state)
        self._loop_locks = OnceCache()  # (LoopSpec, profile) -> the lock its calls run under
        # TensorRT engines share one activation arena (sized on load): they must load and run one
        # after another, so one lock serialises all TensorRT work of this instance.
        self._trt_lock = threading.RLock() if backend == "trt" else None
        # Checked before each denoising loop and after each step (e.g. serving: the calling thread's
        # clients have all gone); true stops the loop with LoopStopped. None: never checked.
        self.should_stop: StopCheck | None = None

    def denoise(self, spec: LoopSpec, table: SchedulerTable, inputs: LoopInputs,
                callback: StepCallback | None = None) -> np.ndarray:
        """Run one chunk of the loop ``spec`` and return its final latents.

        The backend supplies the loop (``backend.loop``): the host loop for ``torch`` and ``ort`` on
        the CPU, the bound loop for ``ort`` on CUDA (``cuda_graph=False``: the same bindings eagerly),
        the TensorRT loop for ``trt``; one per (spec, profile), the profile whose latents have the
        shape of ``inputs.latents``, kept until :meth:`close`. A loop holds one call's state (host
        arrays or bound device buffers), so its calls run one at a time.
        ``guidance_scale <= 1`` runs the conditional prediction alone, as diffusers does (for every
        strategy, prior and decoders alike). The final latents are checked once for NaN/Inf.
        :attr:`should_stop`, when set, is checked before the loop and after each step (the loop's
        hook: nothing is fetched for it); true raises :class:`LoopStopped`.
        """
        if self.should_stop is not None and self.should_stop():
            raise LoopStopped(f"{spec.network} loop: stopped before its first step")
        profile = self._profile_of(spec.step, {spec.io.latents: inputs.latents})

        def build():
            with self._serial():
                return make_loop(self.backend, spec, profile, cuda_graph=self.cuda_graph)

        key = (spec, profile)
        loop = self._loops.get(key, build)
        with self._serial(), self._loop_locks.get(key, threading.Lock):
            latents = loop.run(chunk_rows(inputs, table), callback, self.should_stop)
        return require_finite(latents, f"{spec.network} loop (final latents)")

    def run(self, network: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run a stage network once (encoders, MoVQ) at the profile of the feeds' shapes; every output
        is checked for NaN/Inf, naming it."""
        session = self.session(network, self._profile_of(network, feeds))
        with self._serial():
            outputs = session.run(feeds)
        for name, array in outputs.items():
            require_finite(array, f"{network}.{name}")
        return outputs

    @property
    def profile(self) -> Profile:
        """The default profile (its size serves requests without one; ``cfg`` is every profile's)."""
        return self.manifest.profile

    @property
    def latent_scale(self) -> int:
        """The checkpoint's MoVQ scale factor ``f`` (8 for Kandinsky 2.1): latents are ``H/f x W/f``."""
        return self.manifest.model_dims.latent_scale

    def latent_shape(self, rows: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Decoder latents of ``rows`` images of a size :func:`~.inputs.check_size` returned."""
        return rows, LATENT_CHANNELS, height // self.latent_scale, width // self.latent_scale

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The (height, width) sizes the artifacts hold, the default first."""
        return self.manifest.sizes()

    def chunks(self, rows: int, size: tuple[int, int] | None = None) -> list[tuple[slice, int]]:
        """``rows`` split into network calls of the batches the profiles of ``size`` hold (None: of any
        size, for the size-independent prior): the fewest padded rows, then the fewest calls."""
        return split_rows(rows, self.manifest.batches(size))

    def _profile_of(self, network: str, feeds: dict[str, np.ndarray]) -> int:
        """The first profile at which ``network``'s inputs named in ``feeds`` have the feeds' shapes."""
        shapes = {name: tuple(np.shape(array)) for name, array in feeds.items()}
        entry = self.manifest.network(network)
        for index, resolved in enumerate(entry.profiles):
            if all(resolved.tensor(name).shape == shape for name, shape in shapes.items()):
                return index
        raise BackendError(f"{network}: expected inputs of the shapes of one of the profiles "
                           f"{[p.name for p in self.manifest.profiles]}, found {shapes}")

    def session(self, network: str, profile: int = 0) -> NetworkSession:
        """The loaded network at manifest profile ``profile``; created once per ``Components``
        whatever the concurrency (the backend shares one set of weights between profiles)."""
        def build() -> NetworkSession:
            with self._serial():
                return self.backend.load(network, profile)

        return self._cache.get(("session", network, profile), build)

    def _serial(self):
        return self._trt_lock if self._trt_lock is not None else nullcontext()

    def has(self, network: str) -> bool:
        return network in self.manifest.networks

    @property
    def prior_tokenizer(self) -> TextTokenizer:
        return self._tokenizer("prior")

    @property
    def decoder_tokenizer(self) -> TextTokenizer:
        return self._tokenizer("decoder")

    def _tokenizer(self, which: str) -> TextTokenizer:
        return self._cache.get(("tokenizer", which), lambda: self._load_tokenizer(which))

    def _load_tokenizer(self, which: str) -> TextTokenizer:
        entry = self.manifest.tokenizers.get(which)
        if entry is None:
            raise BackendError(f"tokenizers.{which}: expected a tokenizer in {self.manifest.directory / mf.MANIFEST_NAME}, "
                               f"found none (artifacts without text encoding?)")
        try:  # a reshuffled vocabulary would change every image silently
            self.manifest.verified_path(entry["file"], f"tokenizer {which}")
        except mf.IntegrityError as err:
            raise BackendError(str(err)) from None
        return TextTokenizer.from_manifest_entry(entry, self.manifest.directory)

    def constant(self, name: str) -> np.ndarray:
        """A manifest constant, read (and hash-checked) once; the array is read-only."""
        return self._cache.get(("constant", name), lambda: self._load_constant(name))

    def _load_constant(self, name: str) -> np.ndarray:
        entry = self.manifest.constants.get(name)
        if entry is None:
            raise BackendError(f"constant: expected {name!r} in the manifest, found {sorted(self.manifest.constants)}")
        try:  # the manifest's load checked that the recorded size is the shape's
            path = self.manifest.verified_path(entry.file, f"constant {name}")
        except mf.IntegrityError as err:
            raise BackendError(str(err)) from None
        array = np.fromfile(path, dtype="<" + np.dtype(entry.dtype).str[1:]).reshape(entry.shape)
        array.flags.writeable = False  # shared by every caller and thread
        return array

    def scheduler(self, which: str, num_inference_steps: int, name: str | None = None) -> SchedulerTable:
        """The coefficient table of the prior's or decoder's scheduler at ``num_inference_steps``.

        The manifest's precomputed tables are used when they exist; other step counts are computed
        from the shipped config (numpy only).
        """
        key, config = self._scheduler_config(which, name)

        def build() -> SchedulerTable:
            stored = self.manifest.schedulers.get(key, {}).get("tables", {}).get(str(num_inference_steps))
            return SchedulerTable.from_manifest(stored) if stored is not None else scheduler_table(config, num_inference_steps)

        return self._cache.get(("table", key, num_inference_steps), build)

    def _scheduler_config(self, which: str, name: str | None) -> tuple[str, dict]:
        schedulers = self.manifest.schedulers
        if which == "prior":
            return "prior", schedulers["prior"]["config"]
        name = name or "ddim"
        if name not in DECODER_SCHEDULERS:
            raise PipelineInputError(f"scheduler: expected one of {DECODER_SCHEDULERS}, found {name!r}")
        if name == "ddpm":
            if "decoder_ddpm" not in schedulers:
                raise PipelineInputError("scheduler: 'ddpm' needs a decoder checkpoint with ddpm_scheduler/, found none")
            return "decoder_ddpm", schedulers["decoder_ddpm"]["config"]
        config = schedulers["decoder"]["config"]
        return ("decoder_dpmpp2m", fast_solver_config(config)) if name == "dpmpp2m" else ("decoder", config)

    def close(self) -> None:
        for loop in self._loops.values():  # before the backend: they free buffers on its stream
            loop.close()
        self._loops.clear()
        self._cache.clear()
        self.backend.close()

    def __enter__(self) -> "Components":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
