"""ONNX Runtime backend: the CPU execution provider everywhere, the CUDA one where available.

Each network's ONNX file and its external data are checked against the manifest (size + sha256, once
per process; then I/O names/dtypes/shapes) before a session is created, so a stale or foreign graph
fails with a readable message instead of a traceback from inside ONNX Runtime.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.base import Backend, BackendError, NetworkSession, check_feeds
from kandinsky_trt.runtime.contract.dtypes import DTYPE_OF_ORT
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork

log = logging.getLogger(__name__)

DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class OrtOptions:
    device: str = "cpu"  # "cpu" | "cuda"
    intra_op_threads: int = 0  # 0: ONNX Runtime's default (one per core)
    check_hashes: bool = True


def _session_io(session) -> list[str]:
    lines = []
    for kind, items in (("input", session.get_inputs()), ("output", session.get_outputs())):
        for item in items:
            lines.append(f"{kind} {item.name}: {DTYPE_OF_ORT.get(item.type, item.type)}{list(item.shape)}")
    return lines


def _expected_io(entry: mf.NetworkEntry) -> list[str]:
    """The graph's I/O as the manifest records it (profile dims by name, as ONNX Runtime reports them)."""
    return [f"{kind} {t.name}: {t.dtype}{list(t.shape)}"
            for kind, tensors in (("input", entry.inputs), ("output", entry.outputs)) for t in tensors]


class OrtSession(NetworkSession):
    """One network at one profile; the sessions of every profile share one ``InferenceSession``.

    ``run_options`` (an ``onnxruntime.RunOptions`` or None) go with every host-level run: a session
    created with CUDA graphs runs its host-level calls with ``gpu_graph_id=-1`` (never captured).
    """

    def __init__(self, network: ResolvedNetwork, session, run_options=None) -> None:
        super().__init__(network)
        self._session = session
        self._run_options = run_options

    @property
    def inference_session(self):
        """The ``onnxruntime.InferenceSession`` (for IO binding: ``ort_cuda.py``); None once closed."""
        return self._session

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        check_feeds(self.network, feeds)
        outputs = self._session.run(self.network.output_names, dict(feeds), self._run_options)
        return dict(zip(self.network.output_names, outputs))

    def close(self) -> None:
        self._session = None


class OrtBackend(Backend):
    """Sessions over the ONNX graphs of one artifacts directory: one ``InferenceSession`` per
    network serves every profile (the graphs' profile dims are symbolic)."""

    name = "ort"

    def __init__(self, manifest: mf.Manifest, options: OrtOptions = OrtOptions()) -> None:
        if options.device not in DEVICES:
            raise BackendError(f"device: expected one of {DEVICES}, found {options.device!r}")
        self.manifest = manifest
        self.options = options
        self._inference: dict[str, object] = {}  # network -> its InferenceSession
        self._sessions: dict[tuple[str, int], OrtSession] = {}

    def _providers(self, network: str) -> list:
        """The execution providers of ``network``'s session (the same for every network here)."""
        import onnxruntime as ort

        if self.options.device == "cpu":
            return ["CPUExecutionProvider"]
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise BackendError(
                "device: expected ONNX Runtime with the CUDA execution provider (pip install onnxruntime-gpu), "
                f"found providers {ort.get_available_providers()}"
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]

    def load(self, network: str, profile: int = 0) -> OrtSession:
        key = (network, profile)
        if key not in self._sessions:
            resolved = self.manifest.network(network).resolved(profile)
            self._sessions[key] = OrtSession(resolved, self._inference_session(network), self._run_options(network))
        return self._sessions[key]

    def _inference_session(self, network: str):
        if network in self._inference:
            return self._inference[network]
        import onnxruntime as ort

        entry = self.manifest.network(network)
        path = self.manifest.path(entry.onnx)
        if not path.is_file():
            raise BackendError(f"{network}: expected the ONNX file {path}, found no such file (re-run export)")
        if self.options.check_hashes:  # size + sha256 of the graph and its external data, once per process
            try:
                self.manifest.verified_network(network)
            except mf.IntegrityError as err:
                raise BackendError(str(err)) from None
        options = ort.SessionOptions()
        options.log_severity_level = 3  # fp16 graphs log CPU constant-folding warnings that are not errors
        if self.options.intra_op_threads:
            options.intra_op_num_threads = self.options.intra_op_threads
        try:
            session = ort.InferenceSession(str(path), options, providers=self._providers(network))
        except Exception as err:  # ONNX Runtime raises its own untyped errors for corrupt files
            raise BackendError(f"{network}: ONNX Runtime cannot load {path}: {err}") from None
        expected, found = _expected_io(entry), _session_io(session)
        if expected != found:
            raise BackendError(f"{network}: graph I/O differs from the manifest:\n  expected {expected}\n  found    {found}")
        self._inference[network] = session
        log.debug("loaded %s with %s", network, session.get_providers())
        return session

    def _run_options(self, network: str):
        """The run options of ``network``'s host-level runs (None: ONNX Runtime's defaults)."""
        return None

    def close(self) -> None:
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()
        self._inference.clear()


def create(manifest: mf.Manifest, device: str = "cpu") -> OrtBackend:
    """The registry's factory (``backends/registry.py``): host arrays on the CPU; on CUDA the device
    backend (:class:`~kandinsky_trt.runtime.backends.ort_cuda.OrtCudaBackend`), whose one session per
    network serves host-level runs and the bound loops alike."""
    if device == "cuda":
        from kandinsky_trt.runtime.backends.ort_cuda import OrtCudaBackend  # it imports this module

        return OrtCudaBackend(manifest, "cuda")
    return OrtBackend(manifest, OrtOptions(device=device))
