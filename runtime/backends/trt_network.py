"""The TensorRT backend's two levels on one engine: :class:`TrtNetwork` (host ``run``) and :class:`TrtBinding`.

Written to the TensorRT 10.x/11.x Python API: ``IExecutionContext.set_tensor_address``,
``set_device_memory(memory, size)`` and ``execute_async_v3(stream_handle)``. Each owns an
execution context: a binding's addresses are set once and never changed by anything else. Not
run against a real TensorRT where this was written (no GPU there); tests use a stand-in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.base import (BackendError, BoundNetwork, NetworkSession, StepRunner,
                                                 check_buffer_names, check_feeds)
from kandinsky_trt.runtime.cuda.graphs import CapturedLoop, LoopConfig, StepChain
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork

if TYPE_CHECKING:
    from kandinsky_trt.runtime.backends.trt import TrtBackend


def _set_addresses(context: Any, network: ResolvedNetwork, buffers: Mapping[str, Any], backend: "TrtBackend") -> None:
    """``set_tensor_address`` of every I/O tensor of ``network`` to its buffer in ``buffers``."""
    check_buffer_names(network, buffers)
    for tensor in network.inputs + network.outputs:
        buffer = buffers[tensor.name]
        if buffer.nbytes < tensor.nbytes:
            raise BackendError(f"{network.name}.{tensor.name}: buffer expected >= {tensor.nbytes} bytes "
                               f"({tensor.dtype}{list(tensor.shape)}), found {buffer.nbytes}")
        if not context.set_tensor_address(tensor.name, buffer.ptr):
            raise BackendError(f"{network.name}.{tensor.name}: set_tensor_address expected True, "
                               f"found False ({backend.trt_errors()})")


def _execute(context: Any, network: ResolvedNetwork, stream: cuda.Stream, backend: "TrtBackend") -> None:
    if not context.execute_async_v3(stream.ptr):
        raise BackendError(f"{network.name}: execute_async_v3 expected True, found False ({backend.trt_errors()})")


class TrtNetwork(NetworkSession):
    """One engine and the execution context of its host-level :meth:`run` (on buffers of its own)."""

    def __init__(self, network: ResolvedNetwork, engine: Any, context: Any, backend: "TrtBackend") -> None:
        super().__init__(network)
        self.engine, self._context, self._backend = engine, context, backend
        self.device_memory_bytes = int(engine.device_memory_size_v2)
        self._own: dict[str, Any] = {}
        self.closed = False

    def set_device_memory(self, arena: cuda.DeviceBuffer | None) -> None:
        """Point the context at the shared arena (size 0 engines accept a null pointer)."""
        point_at(self._context, arena)

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Copy in, execute, copy out, one stream sync; its own buffers, so no binding is touched."""
        check_feeds(self.network, feeds)
        if self.closed:
            raise BackendError(f"{self.network.name}: expected an open network, found it closed")
        if not self._own:
            tensors = self.network.inputs + self.network.outputs
            self._own = {t.name: cuda.DeviceBuffer(max(t.nbytes, 1)) for t in tensors}
            _set_addresses(self._context, self.network, self._own, self._backend)
        stream = self._backend.stream
        hosts = [np.ascontiguousarray(feeds[t.name]) for t in self.network.inputs]  # alive until the sync
        for tensor, host in zip(self.network.inputs, hosts):
            self._own[tensor.name].copy_from_host(host, stream)
        _execute(self._context, self.network, stream, self._backend)
        outputs = {t.name: self._own[t.name].copy_to_host(np.empty(t.shape, t.dtype), stream)
                   for t in self.network.outputs}
        stream.synchronize()
        return outputs

    def close(self) -> None:
        if self.closed:
            return
        for buffer in self._own.values():
            buffer.close()
        self._own = {}
        self._context = None  # the context goes before its engine
        self.engine = None
        self.closed = True


class TrtBinding(BoundNetwork):
    """An engine bound to caller-owned device buffers through an execution context of its own.

    One context per binding, so a host-level ``run`` or another binding never changes its addresses
    (TensorRT allows several contexts per engine; with ``USER_MANAGED`` memory they share the
    backend's arena, which is safe because they never run concurrently: one stream).
    """

    def __init__(self, network: TrtNetwork, context: Any, buffers: Mapping[str, Any], backend: "TrtBackend") -> None:
        super().__init__(network.network, buffers)
        self._context, self._backend = context, backend
        _set_addresses(context, self.network, self.buffers, backend)

    @property
    def open(self) -> bool:
        return self._context is not None

    def set_device_memory(self, arena: cuda.DeviceBuffer | None) -> None:
        point_at(self._context, arena)

    def enqueue(self, stream: cuda.Stream | None = None) -> None:
        """Enqueue one execution on ``stream`` (default: the backend's); never synchronizes."""
        if self._context is None:
            raise BackendError(f"{self.network.name}: expected an open binding, found it closed")
        _execute(self._context, self.network, stream or self._backend.stream, self._backend)

    def close(self) -> None:
        """Drop the context; the buffers are the caller's to free."""
        self._context = None


def point_at(context: Any, arena: cuda.DeviceBuffer | None) -> None:
    ptr, size = (arena.ptr, arena.nbytes) if arena is not None else (0, 0)
    context.set_device_memory(ptr, size)


class TrtStepRunner(StepRunner):
    """Bindings enqueued in order on the backend's stream, as one captured CUDA graph.

    :class:`~kandinsky_trt.runtime.cuda.graphs.CapturedLoop`: the first run is eager (TensorRT's
    warm-up after its addresses are set, and that step's real work), the second captures and
    launches, later runs launch; a moved activation arena (the backend's ``generation``) forces a
    re-capture. ``cuda_graph=False`` enqueues eagerly every time. Nothing here synchronises.
    """

    def __init__(self, backend: "TrtBackend", bindings: Sequence[TrtBinding], cuda_graph: bool) -> None:
        chain = StepChain(tuple(b.enqueue for b in bindings), cuda=backend.cuda_ops)
        self.steps = CapturedLoop(LoopConfig(chain, watch=(backend,), enabled=cuda_graph), backend.stream,
                                  cuda=backend.cuda_ops)

    def run(self) -> None:
        self.steps.step(0)

    def close(self) -> None:
        self.steps.close()
