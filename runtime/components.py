"""What one artifacts directory provides, loaded once and shared by every pipeline built on it.

``Components`` owns the backend (and so every loaded network), the tokenizers, the constants and
the scheduler tables; the combined pipelines hand the same instance to their prior and decoder
halves, so nothing is loaded twice.
"""

from __future__ import annotations

import logging
import os
from functools import cached_property

import numpy as np

from kandinsky_trt.runtime import manifest as mf
from kandinsky_trt.runtime.backends.base import Backend, BackendError, NetworkSession
from kandinsky_trt.runtime.loop import DenoiseLoop, LoopInputs, StepCallback
from kandinsky_trt.runtime.errors import KandinskyTrtError
from kandinsky_trt.runtime.schedulers import SchedulerTable, fast_solver_config, scheduler_table
from kandinsky_trt.runtime.spec import LoopSpec, Profile
from kandinsky_trt.runtime.tokenization import TextTokenizer

log = logging.getLogger(__name__)

BACKENDS = ("ort", "torch", "trt")
# CLI / API scheduler names -> which manifest config they use.
DECODER_SCHEDULERS = ("ddim", "ddpm", "dpmpp2m")


class PipelineInputError(KandinskyTrtError, ValueError):
    """A pipeline argument that does not fit the artifacts or diffusers' conventions."""


def make_backend(name: str, manifest: mf.Manifest, device: str = "cpu") -> Backend:
    if name == "ort":
        from kandinsky_trt.runtime.backends.ort import OrtBackend, OrtOptions

        return OrtBackend(manifest, OrtOptions(device=device))
    if name == "torch":
        from kandinsky_trt.runtime.backends.torch_backend import TorchBackend

        return TorchBackend(manifest, device=device)
    if name == "trt":
        from kandinsky_trt.runtime.backends.trt import TrtBackend

        return TrtBackend(manifest)
    raise PipelineInputError(f"backend: expected one of {BACKENDS}, found {name!r}")


class Components:
    """The loaded contents of one artifacts directory.

    Args:
        artifacts: directory holding ``manifest.json`` (from ``kandinsky-trt export``).
        backend: ``"ort"`` (ONNX Runtime), ``"torch"`` (the original modules) or ``"trt"``.
        device: ``"cpu"`` or ``"cuda"``.
    """

    def __init__(self, artifacts: str | os.PathLike, backend: str = "ort", device: str = "cpu",
                 cuda_graph: bool = True) -> None:
        if backend not in BACKENDS:
            raise PipelineInputError(f"backend: expected one of {BACKENDS}, found {backend!r}")
        self.manifest = mf.load_manifest(artifacts)
        self.backend = make_backend(backend, self.manifest, device)
        self.device, self.cuda_graph = device, cuda_graph
        self._tables: dict[tuple, SchedulerTable] = {}
        self._loops: dict[LoopSpec, DenoiseLoop] = {}

    def denoise(self, spec: LoopSpec, table: SchedulerTable, inputs: LoopInputs,
                callback: StepCallback | None = None) -> np.ndarray:
        """Run one chunk of the loop ``spec`` and return its final latents.

        The backend supplies the loop (``backend.loop``): the host loop for ``torch`` and ``ort`` on
        the CPU, the bound loop for ``ort`` on CUDA (``cuda_graph=False``: the same bindings eagerly),
        the TensorRT loop for ``trt``. One loop per spec, kept until :meth:`close`.
        """
        loop = self._loops.get(spec)
        if loop is None:
            loop = self._loops[spec] = self.backend.loop(spec, cuda_graph=self.cuda_graph)
        return loop(table, inputs, callback)

    @property
    def profile(self) -> Profile:
        return self.manifest.profile

    def session(self, network: str) -> NetworkSession:
        return self.backend.load(network)

    def has(self, network: str) -> bool:
        return network in self.manifest.networks

    @cached_property
    def prior_tokenizer(self) -> TextTokenizer:
        return self._tokenizer("prior")

    @cached_property
    def decoder_tokenizer(self) -> TextTokenizer:
        return self._tokenizer("decoder")

    def _tokenizer(self, which: str) -> TextTokenizer:
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
        entry = self.manifest.constants.get(name)
        if entry is None:
            raise BackendError(f"constant: expected {name!r} in the manifest, found {sorted(self.manifest.constants)}")
        try:  # the manifest's load checked that the recorded size is the shape's
            path = self.manifest.verified_path(entry.file, f"constant {name}")
        except mf.IntegrityError as err:
            raise BackendError(str(err)) from None
        return np.fromfile(path, dtype="<" + np.dtype(entry.dtype).str[1:]).reshape(entry.shape)

    def scheduler(self, which: str, num_inference_steps: int, name: str | None = None) -> SchedulerTable:
        """The coefficient table of the prior's or decoder's scheduler at ``num_inference_steps``.

        The manifest's precomputed tables are used when they exist; other step counts are computed
        from the shipped config (numpy only).
        """
        key, config = self._scheduler_config(which, name)
        cache_key = (key, num_inference_steps)
        if cache_key not in self._tables:
            stored = self.manifest.schedulers.get(key, {}).get("tables", {}).get(str(num_inference_steps))
            if stored is not None:
                self._tables[cache_key] = SchedulerTable.from_manifest(stored)
            else:
                self._tables[cache_key] = scheduler_table(config, num_inference_steps)
        return self._tables[cache_key]

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
        self.backend.close()

    def __enter__(self) -> "Components":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
