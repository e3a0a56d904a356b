"""The TensorRT backend: deserialize plans, check them against the manifest, bind once, enqueue.

Written to the TensorRT 10.x/11.x Python API (name-based I/O): ``Runtime.deserialize_cuda_engine``,
``ICudaEngine.num_io_tensors / get_tensor_name / get_tensor_mode / get_tensor_dtype /
get_tensor_shape / device_memory_size_v2``, ``create_execution_context(USER_MANAGED)``,
``IExecutionContext.set_device_memory(memory, size)`` (setDeviceMemoryV2, 10.1+; the one-argument
``device_memory`` property is deprecated since 10.1 and ``ICudaEngine.device_memory_size`` is gone
in 11.x), ``set_tensor_address`` and ``execute_async_v3`` (docs.nvidia.com/deeplearning/tensorrt,
Python API: Core/ExecutionContext, Core/Engine; "Migrating from TensorRT 10.x to 11.x").

Two levels of use:

* :class:`NetworkSession` contract (``run(feeds)`` with host numpy arrays: copy in, enqueue, copy
  out, one stream sync) — what pipelines and tests call;
* device level (the device storage of the loops): :meth:`TrtBackend.bind` device buffers once (a
  :class:`TrtBinding`, a context of its own) and enqueue on the stream without syncing;
  ``write_rows`` is a ``cudaMemcpyAsync`` at a row offset (from the host, or device-to-device
  from :class:`~kandinsky_trt.runtime.backends.base.DeviceRows`), ``runner`` a
  :class:`~kandinsky_trt.runtime.backends.trt_network.TrtStepRunner` (one captured CUDA graph),
  ``read`` the download and the one stream sync.

The networks of one backend run one after another on its stream, so they share one activation
arena: contexts use ``USER_MANAGED`` memory and get one buffer sized to the largest
``device_memory_size_v2`` (the largest over an engine's optimization profiles). Do not run two of
them concurrently on different streams.

Profiles: one plan per network holds one optimization profile per distinct static shape of the
manifest's profiles (min = opt = max; :func:`optimization_profiles`; ``engine.profiles`` maps each
manifest profile to its index). The engine is deserialized once per network; every execution
context selects its optimization profile (``set_optimization_profile_async``) before its input
shapes are set. Unverified on a GPU.

``tensorrt`` is imported lazily; this module imports on any host. What a plan says about itself and
its check against the manifest (plain data, testable without TensorRT) are in ``trt_engine``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.base import (BackendError, BoundNetwork, DeviceBackend, DeviceRows,
                                                 check_device_rows)
from kandinsky_trt.runtime.backends.trt_engine import (EngineMismatchError, check_engine_against_manifest, engine_info,
                                                       import_tensorrt, make_trt_logger, platform_differences,
                                                       select_profile, set_static_input_shapes)
from kandinsky_trt.runtime.backends.trt_network import TrtBinding, TrtNetwork, TrtStepRunner, point_at
from kandinsky_trt.runtime.contract.manifest import Manifest, NetworkEntry, load_manifest
from kandinsky_trt.runtime.contract.spec import ResolvedTensor

log = logging.getLogger(__name__)


class TrtBackend(DeviceBackend):
    """Loads the plans named in an artifacts manifest onto the current GPU.

    Args:
        artifacts: the artifacts directory (or an already loaded :class:`Manifest`).
        stream: the stream every network runs on; by default the backend creates and owns one.
        cuda_ops: the CUDA operations the step runners capture and launch with (default
            :mod:`kandinsky_trt.runtime.cuda.runtime_api`; tests pass a simulated layer).
    """

    name = "trt"
    copies_on_device = True  # write_rows from DeviceRows: cudaMemcpyAsync device to device

    def __init__(self, artifacts: str | os.PathLike | Manifest, stream: cuda.Stream | None = None,
                 cuda_ops: Any = None) -> None:
        self.manifest = artifacts if isinstance(artifacts, Manifest) else load_manifest(artifacts)
        self.trt = import_tensorrt()
        self.device = cuda.device_info()
        self._logger = make_trt_logger(self.trt)
        self._runtime = self.trt.Runtime(self._logger)
        self._owns_stream = stream is None
        self.stream = stream if stream is not None else cuda.Stream()
        self._engines: dict[str, Any] = {}  # network -> its one deserialized engine
        self._networks: dict[tuple[str, int], TrtNetwork] = {}  # (network, manifest profile)
        self._bindings: list[TrtBinding] = []
        self._arena: cuda.DeviceBuffer | None = None
        self.generation = 0  # bumped when the arena moves: captured graphs must be re-captured
        self.cuda_ops = cuda_ops or cuda
        self._pending: list[np.ndarray] = []  # sources of queued host-to-device copies, kept until a sync
        self._closed = False

    def trt_errors(self) -> str:
        errors, self._logger.errors[:] = list(self._logger.errors), []
        return "; ".join(errors[-5:]) or "TensorRT logged no error"

    def load(self, network: str, profile: int = 0) -> TrtNetwork:
        """``network`` at manifest profile ``profile``: the network's one engine, a context of its own."""
        if self._closed:
            raise BackendError("TrtBackend: expected an open backend, found it closed")
        cached = self._networks.get((network, profile))
        if cached is not None and not cached.closed:
            return cached
        entry = self.manifest.network(network)
        engine = self._engine(entry)
        context = self._new_context(engine, entry, profile)
        check_engine_against_manifest(engine_info(engine, self.trt, context), entry, self.device, profile)
        session = TrtNetwork(entry.resolved(profile), engine, context, self)
        self._networks[(network, profile)] = session
        self._fit_arena(session)
        log.info("loaded TensorRT engine %s (%s, profile %d, activations %.1f MiB)", network, entry.engine["file"],
                 profile, session.device_memory_bytes / 2**20)
        return session

    def _engine(self, entry: NetworkEntry) -> Any:
        if entry.name not in self._engines:
            self._engines[entry.name] = self._deserialize(entry)
        return self._engines[entry.name]

    def _new_context(self, engine: Any, entry: NetworkEntry, profile: int) -> Any:
        """An execution context of ``engine`` on user-managed memory, on the optimization profile of
        manifest profile ``profile``, with its input shapes."""
        context = engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise BackendError(f"{entry.name}: create_execution_context expected a context, found None "
                               f"({self.trt_errors()})")
        select_profile(context, entry.engine["profiles"][profile], self.stream.ptr, entry.name)
        set_static_input_shapes(engine, context, entry.resolved(profile))
        return context

    def _deserialize(self, entry: NetworkEntry) -> Any:
        built = entry.engine
        lines = platform_differences(entry, str(self.trt.__version__), self.device)
        if lines:  # a plan from another TensorRT/GPU does not deserialize: say why before trying
            raise EngineMismatchError(entry.name, lines)
        path = self.manifest.path(built["file"])
        if not path.is_file():
            raise BackendError(f"{entry.name}: plan expected at {path} (run `kandinsky-trt build`), found no file")
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != built["sha256"]:
            raise EngineMismatchError(entry.name, [f"{entry.name}: plan sha256 expected {built['sha256']}, "
                                                   f"found {digest} ({path.name} changed after the build)"])
        engine = self._runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise BackendError(f"{entry.name}: deserialize_cuda_engine expected an engine from {path}, "
                               f"found None ({self.trt_errors()})")
        return engine

    def _fit_arena(self, session: TrtNetwork) -> None:
        """Grow the shared arena when ``session`` needs more; then point every context at it."""
        current = self._arena.nbytes if self._arena is not None else 0
        if session.device_memory_bytes <= current:
            session.set_device_memory(self._arena)
            return
        self.stream.synchronize()  # the old arena may still be in use by enqueued work
        old, self._arena = self._arena, cuda.DeviceBuffer(session.device_memory_bytes)
        if old is not None:
            old.close()
        self.generation += 1
        for net in self._networks.values():
            if not net.closed:
                net.set_device_memory(self._arena)
        self._bindings = [b for b in self._bindings if b.open]
        for binding in self._bindings:
            binding.set_device_memory(self._arena)

    def allocate(self, tensor: ResolvedTensor) -> cuda.DeviceBuffer:
        """``cudaMalloc`` for ``tensor`` (at least one byte); the caller closes it."""
        return cuda.DeviceBuffer(max(tensor.nbytes, 1))

    def bind(self, network: str, buffers: Mapping[str, Any], profile: int = 0) -> TrtBinding:
        """A new execution context of ``network`` at ``profile`` with its addresses set to ``buffers`` once."""
        session = self.load(network, profile)
        context = self._new_context(session.engine, self.manifest.network(network), profile)
        point_at(context, self._arena)
        binding = TrtBinding(session, context, buffers, self)
        self._bindings.append(binding)
        return binding

    def write_rows(self, buffer: Any, tensor: ResolvedTensor, first_row: int, values: np.ndarray | DeviceRows) -> None:
        """Asynchronous copy at row ``first_row`` on the stream; host ``values`` kept until the next
        sync. :class:`DeviceRows`: one ``cudaMemcpyAsync`` device-to-device per run of consecutive
        source rows, on the same stream (no sync; captured like any other copy)."""
        row = tensor.nbytes // max(tensor.shape[0], 1) if tensor.shape else tensor.nbytes
        if isinstance(values, DeviceRows):
            check_device_rows(values, tensor, first_row)
            for source, count in values.runs():
                self.cuda_ops.memcpy_d2d(buffer.ptr + first_row * row, values.buffer.ptr + source * row,
                                         count * row, self.stream)
                first_row += count
            return
        values = np.ascontiguousarray(values, np.dtype(tensor.dtype))
        buffer.copy_from_host(values, self.stream, offset=first_row * row)
        self._pending.append(values)

    def read(self, buffer: Any, tensor: ResolvedTensor) -> np.ndarray:
        """The device-to-host copy enqueued after everything before it, then the one stream sync."""
        out = buffer.copy_to_host(np.empty(tensor.shape, np.dtype(tensor.dtype)), self.stream)
        self.stream.synchronize()
        self._pending.clear()
        return out

    def runner(self, bindings: Sequence[BoundNetwork], cuda_graph: bool = True) -> TrtStepRunner:
        return TrtStepRunner(self, bindings, cuda_graph)

    def free(self, buffers: Iterable[Any]) -> None:
        """Stream sync (queued work may use them; a failure is logged: close must go on), then ``cudaFree``."""
        if getattr(self.stream, "handle", None) is not None:
            try:
                self.stream.synchronize()
            except Exception as err:  # noqa: BLE001
                log.warning("TrtBackend: stream sync before freeing failed: %s", err)
        self._pending.clear()
        for buffer in buffers:
            buffer.close()

    def close(self) -> None:
        if self._closed:
            return
        if self.stream.handle is not None:
            self.stream.synchronize()
        for binding in self._bindings:
            binding.close()
        self._bindings.clear()
        for session in self._networks.values():
            session.close()
        self._networks.clear()
        self._engines.clear()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        self._runtime = None
        if self._owns_stream:
            self.stream.close()
        self._closed = True


def create(manifest: Manifest, device: str = "cuda") -> TrtBackend:
    """The registry's factory (``backends/registry.py``): TensorRT runs on the CUDA device only."""
    return TrtBackend(manifest)
