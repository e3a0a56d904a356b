"""ONNX Runtime with device-resident buffers bound once, and ONNX Runtime's own CUDA graphs.

The host backend (``ort.py``) copies numpy feeds in and outputs out on every call. Here every
input and output of a network is an ``OrtValue`` allocated once, from the resolved spec of the
manifest entry, on the session's device, and bound by name to an ``IOBinding`` once. A call then
only runs the binding; the caller updates inputs in place (:func:`upload`) between calls. This is
the device level of the backend interface (``allocate`` / ``bind`` -> :class:`BoundRun`, whose
``enqueue`` runs the binding; ``write_rows``, ``read``, ``runner``): the loops layer builds the
device storage of the loop of slots on it (``runtime/loops/device.py``).

One ``InferenceSession`` per network serves everything in the process: host-level ``run`` (the
stage networks, and any network called outside a loop) and every binding of every loop at every
profile. Only the loop networks (``contract.loop_specs.LOOPS``: networks and step graphs) are
created with ``enable_cuda_graph``; their host-level runs carry ``gpu_graph_id=-1`` so they are
never captured. Stage networks get no CUDA-graph option (a graph with a node on the CPU cannot be
created with it, and they never run bound).

With the CUDA execution provider and ``CudaGraphOptions(enabled=True)`` the session is created
with the provider option ``enable_cuda_graph="1"`` and every binding gets its own ``gpu_graph_id``
run option, so ONNX Runtime captures each binding once and replays it afterwards. The rules of
ONNX Runtime's CUDA graphs this module relies on (CUDA EP documentation, "Using CUDA Graphs"):

* capture is per ``gpu_graph_id`` within one session: the first run(s) of an id are ordinary
  runs (they make the arena allocations; ONNX Runtime 1.18+ counts them per id), the next run
  captures and replays, later runs only replay; ``0`` is the default id, so ids here start at 1;
  ``-1`` runs a binding eagerly (:meth:`BoundRun.enqueue` with ``graph=False``);
* a replay re-issues the recorded kernels on the recorded addresses: the shapes and addresses of
  the bound inputs and outputs must never change for an id, so a binding is never rebound — a
  different set of buffers is a new binding with a new id;
* new input values must be copied into the bound buffers (``OrtValue.update_inplace``), never
  bound anew;
* a ``Run`` may execute the graph more than once (recent versions do the warm-up runs and the
  capture inside the first ``Run`` of an id), so a binding must be idempotent: it never reads a
  buffer it writes (the denoising loop ping-pongs its state for that reason);
* every node must run on the CUDA EP and the graph may hold no control flow; otherwise session
  creation fails with ONNX Runtime's own message (reported here as :class:`BackendError`);
* captured graphs live as long as the session, so bound buffers must outlive every replay: each
  :class:`BoundRun` keeps its buffers alive, and sessions with graphs should not be shared by
  objects that free their buffers while the session lives on.

``update_inplace`` copies host to device with a plain ``cudaMemcpy`` on the legacy default stream,
which does not order against ONNX Runtime's own stream; :meth:`BoundRun.synchronize_inputs`
(``IOBinding.synchronize_inputs``: a device synchronisation by the session's CUDA EP) must follow
uploads before the next run (the runner does it once per step when something was written). ONNX
Runtime's ``Run`` itself returns after its stream finished (its default; a graph replay
synchronises as well), so on ONNX Runtime a step costs those two waits whatever the loop does;
the zero-sync step is TensorRT's (one stream, ``execute_async_v3``).

ONNX Runtime's Python API copies whole ``OrtValue``s only (``update_inplace``), so
:meth:`OrtCudaBackend.write_rows` of part of a buffer reads the buffer back, changes the rows and
writes it whole (same address): one download per partial write, which the loop makes at admission
only; per-step rows (timestep, coefficients, guidance, noise) are whole buffers.

Device-resident stage chains (``runtime/backends/resident.py``) hand stage outputs on as
:class:`~kandinsky_trt.runtime.backends.base.DeviceRows`; here a write from them is a host hop
(:meth:`OrtCudaBackend.write_rows`): the Python API's copies between ``OrtValue`` objects are
``update_inplace`` (from numpy) and ``onnxruntime.copy_tensors`` (whole tensors, through the data
transfers plugin execution providers register; on the installed 1.32 CPU EP it finds none). A chain
would then download more often than the host path (text2img 4 downloads against 3, measured on
the CPU EP by ``tests/test_resident.py``), so ``copies_on_device`` is False and the pipelines keep
the host path here: one ``Run`` per stage, whose outputs come back to the host.

The same classes work on the CPU execution provider (``device="cpu"``: buffers in host memory, no
graphs), which is how the binding logic is tested without a GPU. onnxruntime is imported lazily.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.base import (BackendError, BoundNetwork, DeviceBackend, DeviceRows, StepRunner,
                                                 check_buffer_names, check_device_rows)
from kandinsky_trt.runtime.backends.ort import OrtBackend, OrtOptions
from kandinsky_trt.runtime.contract.dtypes import DTYPE_OF_ORT
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork, ResolvedTensor
from kandinsky_trt.runtime.contract.loop_specs import LOOPS

log = logging.getLogger(__name__)

GRAPH_ID_KEY = "gpu_graph_id"  # kOrtRunOptionsConfigCudaGraphAnnotation
FIRST_GRAPH_ID = 1  # 0 is ONNX Runtime's default id
NO_GRAPH_ID = -1  # this run neither captures nor replays: the same binding, eagerly
CUDA_PROVIDER = "CUDAExecutionProvider"
# The networks that run bound in a loop: only their sessions are created with CUDA graphs.
LOOP_NETWORKS = frozenset(name for spec in LOOPS.values() for name in (spec.network, spec.step))


@dataclass(frozen=True)
class CudaGraphOptions:
    """Whether sessions on the CUDA EP capture and replay CUDA graphs (ignored on the CPU EP).

    ``enabled=False`` is the ``--no-cuda-graph`` comparison: the same bindings, run eagerly.
    """

    enabled: bool = True
    device_id: int = 0


def cuda_available() -> bool:
    """Whether the installed ONNX Runtime has the CUDA execution provider (onnxruntime-gpu)."""
    import onnxruntime as ort

    return CUDA_PROVIDER in ort.get_available_providers()


def provider_config(device: str, graphs: CudaGraphOptions) -> list:
    """The ``providers`` argument of ``InferenceSession`` for ``device`` ("cpu" | "cuda").

    Raises:
        BackendError: "cuda" without the CUDA EP installed, or an unknown device.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise BackendError(f"device: expected 'cpu' or 'cuda', found {device!r}")
    if not cuda_available():
        import onnxruntime as ort

        raise BackendError(
            f"device: expected ONNX Runtime with the {CUDA_PROVIDER} (pip install onnxruntime-gpu), "
            f"found providers {ort.get_available_providers()}")
    options = {"device_id": str(graphs.device_id), "enable_cuda_graph": "1" if graphs.enabled else "0"}
    return [(CUDA_PROVIDER, options), "CPUExecutionProvider"]


def allocate(tensor: ResolvedTensor, device: str, device_id: int = 0):
    """An uninitialised ``OrtValue`` of ``tensor``'s shape and dtype on ``device``."""
    import onnxruntime as ort

    return ort.OrtValue.ortvalue_from_shape_and_type(list(tensor.shape), np.dtype(tensor.dtype), device, device_id)


def upload(value, array: np.ndarray, name: str) -> None:
    """Copy ``array`` into the bound buffer ``value`` in place (its address never changes).

    The shape and dtype must match exactly: ``update_inplace`` checks only the element count and
    would copy the bytes of another dtype.

    Raises:
        BackendError: shape or dtype differ from the buffer's.
    """
    array = np.asarray(array)
    expected = (tuple(value.shape()), np.dtype(DTYPE_OF_ORT[value.data_type()]))
    if (array.shape, array.dtype) != expected:
        raise BackendError(
            f"{name}: expected {expected[1]}{list(expected[0])}, found {array.dtype}{list(array.shape)}")
    value.update_inplace(np.ascontiguousarray(array))


def host_rows(values: DeviceRows) -> np.ndarray:
    """A host copy of ``values``' rows (``OrtValue.numpy``: on CUDA a download, on the CPU EP a view)."""
    return np.array(values.buffer.numpy()[list(values.rows)], copy=True)


class BoundRun(BoundNetwork):
    """One binding of a session: fixed buffers, one ``gpu_graph_id`` when graphs are enabled."""

    def __init__(self, network: ResolvedNetwork, session, binding, graph_id: int | None, buffers: Mapping) -> None:
        import onnxruntime as ort

        super().__init__(network, buffers)
        self._session = session
        self._binding = binding
        self.graph_id = graph_id
        self._options = {True: ort.RunOptions(), False: ort.RunOptions()}  # graph replay or not
        if graph_id is not None:
            self._options[True].add_run_config_entry(GRAPH_ID_KEY, str(graph_id))
            self._options[False].add_run_config_entry(GRAPH_ID_KEY, str(NO_GRAPH_ID))

    def enqueue(self, stream: Any = None, graph: bool = True) -> None:
        """Run once: captured or replayed under this binding's graph id, or eagerly with ``graph=False``
        (the exact comparison for a replay: same session, kernels and buffers).

        ONNX Runtime runs on its own stream and returns after that stream finished, so ``stream``
        is not used (it is the interface's: TensorRT takes one).
        """
        if self._session is None:
            raise BackendError(f"{self.network.name}: expected an open binding, found it closed")
        self._session.run_with_iobinding(self._binding, self._options[graph])

    def synchronize_inputs(self) -> None:
        """Wait until in-place uploads into the bound inputs are complete on the device."""
        self._binding.synchronize_inputs()

    def synchronize_outputs(self) -> None:
        self._binding.synchronize_outputs()

    def close(self) -> None:
        self._session = self._binding = None


class DeviceSession:
    """A loaded network whose runs go through bindings (see :meth:`bind`), at any of its profiles."""

    def __init__(self, network: str, session, device: str, graphs: CudaGraphOptions) -> None:
        self.name = network
        self.device = device
        self.graphs = graphs
        self._session = session
        self._next_graph_id = FIRST_GRAPH_ID

    @property
    def uses_cuda_graphs(self) -> bool:
        return self.device == "cuda" and self.graphs.enabled

    def bind(self, network: ResolvedNetwork, buffers: Mapping[str, object]) -> BoundRun:
        """Bind one buffer to every input and output of ``network`` (this network at one profile),
        once; returns the run.

        Each call is a new binding with its own graph id (unique in this session, whatever the
        profile): buffers are never rebound.

        Raises:
            BackendError: a tensor without a buffer, an unknown name, or a buffer of another shape/dtype.
        """
        self._check_buffers(network, buffers)
        binding = self._session.io_binding()
        for name in network.input_names:
            binding.bind_ortvalue_input(name, buffers[name])
        for name in network.output_names:
            binding.bind_ortvalue_output(name, buffers[name])
        graph_id = None
        if self.uses_cuda_graphs:
            graph_id, self._next_graph_id = self._next_graph_id, self._next_graph_id + 1
        log.debug("%s: bound on %s (graph id %s)", network.name, self.device, graph_id)
        return BoundRun(network, self._session, binding, graph_id, buffers)

    def _check_buffers(self, network: ResolvedNetwork, buffers: Mapping[str, object]) -> None:
        check_buffer_names(network, buffers)
        for name in network.input_names + network.output_names:
            tensor, value = network.tensor(name), buffers[name]
            found = (tuple(value.shape()), DTYPE_OF_ORT.get(value.data_type(), value.data_type()))
            if found != (tensor.shape, tensor.dtype):
                raise BackendError(
                    f"{network.name}.{name}: expected a {tensor.dtype}{list(tensor.shape)} buffer, "
                    f"found {found[1]}{list(found[0])}")
            if value.device_name().lower() != self.device:
                raise BackendError(
                    f"{network.name}.{name}: expected a buffer on {self.device}, found {value.device_name()}")

    def close(self) -> None:
        self._session = None


class OrtStepRunner(StepRunner):
    """Runs bindings in order, each under its own graph id (ONNX Runtime captures per id) or eagerly."""

    def __init__(self, backend: "OrtCudaBackend", bindings: Sequence[BoundRun], cuda_graph: bool) -> None:
        self.backend, self.bindings, self.cuda_graph = backend, tuple(bindings), cuda_graph

    def run(self) -> None:
        if self.backend.uploads_pending:  # update_inplace is not ordered with ONNX Runtime's stream
            self.bindings[0].synchronize_inputs()
            self.backend.uploads_pending = False
        for binding in self.bindings:
            binding.enqueue(graph=self.cuda_graph)

    @property
    def graph_ids(self) -> tuple[int | None, ...]:
        return tuple(b.graph_id for b in self.bindings)


class OrtCudaBackend(OrtBackend, DeviceBackend):
    """Sessions over the ONNX graphs of one artifacts directory, with bound device buffers.

    Loading (file, sha256 and I/O checks against the manifest) is :class:`OrtBackend`'s; only the
    execution providers differ. One session per network serves host-level runs and every binding.
    ``device="cpu"`` gives the same bindings on the CPU EP (tests).
    """

    name = "ort-cuda"
    copies_on_device = False  # write_rows from DeviceRows goes through the host (see write_rows)

    def __init__(self, manifest: mf.Manifest, device: str = "cuda", graphs: CudaGraphOptions = CudaGraphOptions()):
        super().__init__(manifest, OrtOptions(device=device))
        self.graphs = graphs
        self._device_sessions: dict[str, DeviceSession] = {}
        self.uploads_pending = False  # an update_inplace since the last run (see OrtStepRunner)
        self._providers("unet")  # fail now, with the message naming onnxruntime-gpu, not at the first load

    def _graphs_of(self, network: str) -> CudaGraphOptions:
        """CUDA graphs for the loop networks only (see the module docstring)."""
        return self.graphs if network in LOOP_NETWORKS else replace(self.graphs, enabled=False)

    def _providers(self, network: str) -> list:
        return provider_config(self.options.device, self._graphs_of(network))

    def _run_options(self, network: str):
        """Host-level runs of a session with CUDA graphs: ``gpu_graph_id=-1``, never captured."""
        if self.options.device != "cuda" or not self._graphs_of(network).enabled:
            return None
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry(GRAPH_ID_KEY, str(NO_GRAPH_ID))
        return options

    def device_session(self, network: str) -> DeviceSession:
        """``network``'s one session wrapped for bound runs; one wrapper per network, so graph ids stay unique."""
        if network not in self._device_sessions:
            session = self.load(network)
            providers = session.inference_session.get_providers()
            if self.options.device == "cuda" and CUDA_PROVIDER not in providers:
                # onnxruntime falls back to the CPU when the CUDA EP cannot load its libraries.
                raise BackendError(
                    f"{network}: expected a session on the {CUDA_PROVIDER}, found {providers} (the CUDA EP "
                    "did not load: check that its CUDA and cuDNN libraries match the onnxruntime-gpu build)")
            self._device_sessions[network] = DeviceSession(
                network, session.inference_session, self.options.device, self._graphs_of(network))
        return self._device_sessions[network]

    def allocate(self, tensor: ResolvedTensor):
        """An uninitialised ``OrtValue`` for ``tensor`` on this backend's device."""
        return allocate(tensor, self.options.device, self.graphs.device_id)

    def bind(self, network: str, buffers: Mapping[str, Any], profile: int = 0) -> BoundRun:
        """Bind ``buffers`` to ``network`` at ``profile`` once: a new binding with its own graph id
        (see :meth:`DeviceSession.bind`)."""
        return self.device_session(network).bind(self.load(network, profile).network, buffers)

    def write_rows(self, buffer, tensor: ResolvedTensor, first_row: int, values: np.ndarray | DeviceRows) -> None:
        """``update_inplace`` of the whole buffer; part of it: read back, change the rows, write whole.

        :class:`DeviceRows` go through the host (``OrtValue.numpy``, then ``update_inplace``): ONNX
        Runtime's Python API has no device-to-device copy between ``OrtValue``s, so on CUDA each
        such write is one download (a synchronous copy) as well as the upload.
        """
        if isinstance(values, DeviceRows):
            check_device_rows(values, tensor, first_row)
            values = host_rows(values)
        values = np.asarray(values)
        if first_row == 0 and values.shape == tensor.shape:
            upload(buffer, values, tensor.name)
        else:
            whole = np.array(buffer.numpy(), copy=True)
            if not 0 <= first_row <= first_row + len(values) <= len(whole):
                raise BackendError(f"{tensor.name}: rows expected within [0, {len(whole)}), found "
                                   f"[{first_row}, {first_row + len(values)})")
            whole[first_row:first_row + len(values)] = values
            upload(buffer, whole, tensor.name)
        self.uploads_pending = True

    def read(self, buffer, tensor: ResolvedTensor) -> np.ndarray:
        """A host copy (``OrtValue.numpy`` copies from the device; on the CPU EP it is a view, hence
        the copy). ``Run`` returned after its stream finished, so the values are final."""
        return np.array(buffer.numpy(), copy=True)

    def runner(self, bindings: Sequence[BoundNetwork], cuda_graph: bool = True) -> OrtStepRunner:
        return OrtStepRunner(self, bindings, cuda_graph)

    def free(self, buffers: Iterable[Any]) -> None:
        """``OrtValue``s are freed when the last reference goes (the bindings hold theirs until closed)."""

    def close(self) -> None:
        for session in self._device_sessions.values():
            session.close()
        self._device_sessions.clear()
        super().close()

