"""What one artifacts directory holds, loaded once: :class:`LoadedArtifacts`.

The manifest, the backend (and so every loaded network session), the tokenizers, the constants and
the scheduler tables, each loaded on first use through a :class:`OnceCache`, so one instance serves
many threads with exactly one session per network. The request builders (``requests``) read it to
check arguments; :class:`~kandinsky_trt.runtime.pipelines.components.Components` runs requests on it.
Nothing here runs a network.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError, NetworkSession
from kandinsky_trt.runtime.backends.registry import check_backend, make_backend
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable, fast_solver_config, scheduler_table
from kandinsky_trt.runtime.contract.spec import LATENT_CHANNELS, Profile
from kandinsky_trt.runtime.pipelines.once import OnceCache
from kandinsky_trt.runtime.processing.tokenization import TextTokenizer

# CLI / API scheduler names -> which manifest config they use.
DECODER_SCHEDULERS = ("ddim", "ddpm", "dpmpp2m")
__all__ = ["DECODER_SCHEDULERS", "LoadedArtifacts"]


class LoadedArtifacts:
    """The loaded contents of one artifacts directory.

    Args:
        artifacts: directory holding ``manifest.json`` (from ``kandinsky-trt export``).
        backend: ``"ort"`` (ONNX Runtime), ``"torch"`` (the original modules) or ``"trt"``.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, artifacts: str | os.PathLike, backend: str = "ort", device: str = "cpu") -> None:
        check_backend(backend)
        self.manifest = mf.load_manifest(artifacts)
        self.backend = make_backend(backend, self.manifest, device)
        self.device = device
        self._cache = OnceCache()  # sessions, tokenizers, constants, scheduler tables
        # TensorRT engines share one activation arena (sized on load): they must load and run one
        # after another, so one lock serialises all TensorRT work on these artifacts.
        self._trt_lock = threading.RLock() if backend == "trt" else None

    def serial(self):
        """The context every load and run of a network enters (TensorRT: one lock; else nothing)."""
        return self._trt_lock if self._trt_lock is not None else nullcontext()

    @property
    def profile(self) -> Profile:
        """The default profile (its size serves requests without one; ``cfg`` is every profile's)."""
        return self.manifest.profile

    @property
    def latent_scale(self) -> int:
        """The checkpoint's MoVQ scale factor ``f`` (8 for Kandinsky 2.1): latents are ``H/f x W/f``."""
        return self.manifest.model_dims.latent_scale

    @property
    def embedding_width(self) -> int:
        """The width ``E`` of the CLIP image embeddings the prior makes and the decoder takes."""
        return self.manifest.model_dims.clip_dim

    def latent_shape(self, rows: int, height: int, width: int) -> tuple[int, int, int, int]:
        """Decoder latents of ``rows`` images of a size :func:`~.inputs.check_size` returned."""
        return rows, LATENT_CHANNELS, height // self.latent_scale, width // self.latent_scale

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """The (height, width) sizes the artifacts hold, the default first."""
        return self.manifest.sizes()

    def has(self, network: str) -> bool:
        return network in self.manifest.networks

    def session(self, network: str, profile: int = 0) -> NetworkSession:
        """The loaded network at manifest profile ``profile``; created once whatever the concurrency
        (the backend shares one set of weights between profiles)."""
        def build() -> NetworkSession:
            with self.serial():
                return self.backend.load(network, profile)

        return self._cache.get(("session", network, profile), build)

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
        self._cache.clear()
        self.backend.close()
