"""A thin wrapper over cuda-python's runtime API: streams, device buffers, copies, graphs.

Only what the TensorRT backend and the CUDA-graph loop need, each call checked. cuda-python is
imported lazily (``from cuda.bindings import runtime``, or ``from cuda import cudart`` for
cuda-python < 12.6), so importing this module never touches a GPU; a host without cuda-python
gets :class:`CudaUnavailableError` on first use.

cuda-python returns ``(cudaError_t, *values)`` tuples instead of raising
(https://nvidia.github.io/cuda-python/cuda-bindings/latest/module/runtime.html); :func:`check` turns
them into :class:`CudaError`. Buffers are freed by ``close()`` or a ``with`` block, never by
``__del__``. Imports: numpy and the runtime's error root only.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

log = logging.getLogger(__name__)


class CudaUnavailableError(KandinskyTrtError, ImportError):
    """cuda-python is missing (or no CUDA device/driver is usable)."""


class CudaError(KandinskyTrtError, RuntimeError):
    """A CUDA runtime call returned an error code."""


def cudart() -> Any:
    """The ``cudart`` module of cuda-python (imported on first use; Python caches the import)."""
    try:
        from cuda.bindings import runtime  # cuda-python >= 12.6

        return runtime
    except ImportError:
        pass
    try:
        from cuda import cudart as legacy  # cuda-python < 12.6

        return legacy
    except ImportError as err:
        raise CudaUnavailableError(
            f"cuda-python: expected an importable `cuda.bindings.runtime` module, found none ({err}). "
            "The TensorRT backend and CUDA graphs need it: `pip install 'kandinsky-trt[gpu]'` "
            "(or `pip install cuda-python`) on a machine with an NVIDIA GPU and driver."
        ) from err


def _code(err: Any) -> int:
    # cudaError_t is an int enum in cuda-bindings 13 and a plain Enum in older releases.
    return int(getattr(err, "value", err))


def check(result: tuple, call: str = "CUDA call") -> Any:
    """Raise :class:`CudaError` unless ``result[0]`` is ``cudaSuccess``; return the other values.

    Returns None, the single value, or a tuple of values.
    """
    err, values = result[0], result[1:]
    if _code(err) != 0:
        rt = cudart()
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        name = name.decode() if isinstance(name, bytes) else str(name)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise CudaError(f"{call}: expected cudaSuccess, found {name} ({_code(err)}): {text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


@dataclass(frozen=True)
class DeviceInfo:
    """The GPU an engine is built for or runs on."""

    index: int
    name: str
    compute_capability: str  # "9.0"


def device_info(device: int | None = None) -> DeviceInfo:
    """Name and compute capability of ``device`` (default: the current device)."""
    rt = cudart()
    index = check(rt.cudaGetDevice(), "cudaGetDevice") if device is None else device
    prop = check(rt.cudaGetDeviceProperties(index), "cudaGetDeviceProperties")
    name = prop.name.split(b"\0", 1)[0].decode() if isinstance(prop.name, bytes) else str(prop.name)
    return DeviceInfo(index=int(index), name=name, compute_capability=f"{prop.major}.{prop.minor}")


def cuda_available() -> bool:
    """True when cuda-python imports and at least one CUDA device answers (for test skips)."""
    try:
        rt = cudart()
    except CudaUnavailableError:
        return False
    err, count = rt.cudaGetDeviceCount()
    return _code(err) == 0 and count > 0


class Stream:
    """A non-blocking CUDA stream (graph capture is not allowed on the legacy default stream)."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreateWithFlags")

    @property
    def ptr(self) -> int:
        """The raw ``cudaStream_t`` value, as TensorRT's ``execute_async_v3(stream_handle)`` takes it."""
        return int(self.handle)

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        if self.handle is not None:
            check(cudart().cudaStreamDestroy(self.handle), "cudaStreamDestroy")
            self.handle = None

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kind(name: str) -> Any:
    return getattr(cudart().cudaMemcpyKind, name)


def memcpy_d2d(dst: int, src: int, nbytes: int, stream: Stream) -> None:
    """Enqueue a device-to-device copy of ``nbytes`` on ``stream`` (capturable)."""
    check(cudart().cudaMemcpyAsync(dst, src, nbytes, _kind("cudaMemcpyDeviceToDevice"), stream.handle),
          "cudaMemcpyAsync(D2D)")


class DeviceBuffer:
    """``nbytes`` of device memory from ``cudaMalloc`` (256-byte aligned, as TensorRT requires)."""

    def __init__(self, nbytes: int) -> None:
        if not isinstance(nbytes, int) or nbytes < 1:
            raise ValueError(f"nbytes: expected an integer >= 1, found {nbytes!r}")
        self.nbytes = nbytes
        self.ptr: int = int(check(cudart().cudaMalloc(nbytes), f"cudaMalloc({nbytes})"))

    @classmethod
    def from_numpy(cls, array: np.ndarray, stream: Stream | None = None) -> "DeviceBuffer":
        """A new buffer holding a copy of ``array`` (synchronous when ``stream`` is None)."""
        buffer = cls(max(int(array.nbytes), 1))
        buffer.copy_from_host(array, stream)
        return buffer

    def _check_size(self, nbytes: int, what: str) -> None:
        if nbytes > self.nbytes:
            raise ValueError(f"{what}: expected at most {self.nbytes} bytes (the buffer size), found {nbytes}")

    def copy_from_host(self, array: np.ndarray, stream: Stream | None = None, offset: int = 0) -> None:
        """Copy a host array in, ``offset`` bytes into the buffer (rows of a bound buffer: its address
        never changes). With a stream the copy is asynchronous: keep ``array`` alive until sync."""
        array = np.ascontiguousarray(array)
        if offset < 0:
            raise ValueError(f"offset: expected >= 0, found {offset}")
        self._check_size(offset + array.nbytes, "copy_from_host")
        rt = cudart()
        kind = _kind("cudaMemcpyHostToDevice")
        if stream is None:
            check(rt.cudaMemcpy(self.ptr + offset, array.ctypes.data, array.nbytes, kind), "cudaMemcpy(H2D)")
        else:
            check(rt.cudaMemcpyAsync(self.ptr + offset, array.ctypes.data, array.nbytes, kind, stream.handle),
                  "cudaMemcpyAsync(H2D)")

    def copy_to_host(self, out: np.ndarray, stream: Stream | None = None) -> np.ndarray:
        """Copy into the contiguous host array ``out``; with a stream, valid only after a sync."""
        if not out.flags.c_contiguous:
            raise ValueError("out: expected a C-contiguous array, found a strided one")
        self._check_size(out.nbytes, "copy_to_host")
        rt = cudart()
        kind = _kind("cudaMemcpyDeviceToHost")
        if stream is None:
            check(rt.cudaMemcpy(out.ctypes.data, self.ptr, out.nbytes, kind), "cudaMemcpy(D2H)")
        else:
            check(rt.cudaMemcpyAsync(out.ctypes.data, self.ptr, out.nbytes, kind, stream.handle),
                  "cudaMemcpyAsync(D2H)")
        return out

    def close(self) -> None:
        if self.ptr:
            check(cudart().cudaFree(self.ptr), "cudaFree")
            self.ptr = 0

    def __enter__(self) -> "DeviceBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"DeviceBuffer(nbytes={self.nbytes}, ptr=0x{self.ptr:x})"


# -- graph capture: the operations cuda_graphs.CapturedLoop uses (a fake replaces them in tests) --


def begin_capture(stream: Stream) -> None:
    """Start capturing ``stream``. Thread-local mode: only this thread's unsafe calls break the capture."""
    rt = cudart()
    mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
    check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")


def end_capture(stream: Stream) -> Any:
    """Stop capturing and return the ``cudaGraph_t`` (raises when the capture was invalidated)."""
    return check(cudart().cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")


def instantiate(graph: Any) -> Any:
    """``cudaGraphInstantiate(graph, flags=0)`` (the CUDA 12 signature) -> ``cudaGraphExec_t``."""
    return check(cudart().cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")


def launch(graph_exec: Any, stream: Stream) -> None:
    check(cudart().cudaGraphLaunch(graph_exec, stream.handle), "cudaGraphLaunch")


def destroy_graph(graph: Any) -> None:
    check(cudart().cudaGraphDestroy(graph), "cudaGraphDestroy")


def destroy_graph_exec(graph_exec: Any) -> None:
    check(cudart().cudaGraphExecDestroy(graph_exec), "cudaGraphExecDestroy")
