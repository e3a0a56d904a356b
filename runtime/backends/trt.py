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

``tensorrt`` is imported lazily; this module imports on any host. The plain-data check
(:func:`check_engine_against_manifest` on :class:`EngineInfo`) is testable without TensorRT.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.base import (BackendError, BoundNetwork, DeviceBackend, DeviceRows,
                                                 check_device_rows)
from kandinsky_trt.runtime.backends.trt_network import TrtBinding, TrtNetwork, TrtStepRunner, point_at
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.contract.manifest import Manifest, NetworkEntry, load_manifest
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork, ResolvedTensor

log = logging.getLogger(__name__)


class TensorRTUnavailableError(KandinskyTrtError, ImportError):
    """The ``tensorrt`` module (or its libraries) cannot be imported."""


class EngineMismatchError(BackendError):
    """A plan does not match its manifest entry; ``differences`` holds one line per mismatch."""

    def __init__(self, network: str, differences: list[str]) -> None:
        self.network = network
        self.differences = tuple(differences)
        super().__init__(
            f"{network}: the TensorRT engine does not match the manifest ({len(differences)} "
            "difference(s)):\n  " + "\n  ".join(differences)
            + "\nRebuild it with `kandinsky-trt build` (re-export first if the ONNX graph changed)."
        )


def import_tensorrt() -> Any:
    """``import tensorrt``, or :class:`TensorRTUnavailableError` with what to install."""
    try:
        import tensorrt
    except (ImportError, OSError) as err:  # OSError: bindings present, libnvinfer missing
        raise TensorRTUnavailableError(
            f"tensorrt: expected an importable TensorRT Python package with its libraries, found "
            f"none ({err}). TensorRT needs an NVIDIA GPU with its CUDA driver; install it with "
            "`pip install 'kandinsky-trt[gpu]'` or `pip install tensorrt` (the libraries come from "
            "NVIDIA's package index, see NVIDIA's TensorRT installation guide). Without a GPU use "
            "the ONNX Runtime backend (`--backend ort`)."
        ) from err
    return tensorrt


# TensorRT severities -> logging levels; INFO is chatty during builds (Polygraphy maps it to verbose).
_LEVELS = MappingProxyType({
    "INTERNAL_ERROR": logging.CRITICAL, "ERROR": logging.ERROR, "WARNING": logging.WARNING,
    "INFO": logging.DEBUG, "VERBOSE": 5,
})


def make_trt_logger(trt: Any, sink: logging.Logger = log) -> Any:
    """A ``trt.ILogger`` that forwards to ``sink`` and keeps error messages in ``.errors``.

    The subclass pattern (explicit ``trt.ILogger.__init__``) is the one the ILogger docs prescribe.
    The logger must outlive every builder/runtime/engine created with it.
    """

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity: Any, msg: str) -> None:
            try:
                level = _LEVELS.get(getattr(severity, "name", ""), logging.INFO)
                if level >= logging.ERROR:
                    self.errors.append(msg)
                if sink.isEnabledFor(level):
                    sink.log(level, "TensorRT: %s", msg)
            except Exception:  # noqa: BLE001 - a C++ noexcept callback must never raise
                pass

    return _Logger()


@dataclass(frozen=True)
class TensorInfo:
    """One engine I/O tensor: ``mode`` is "input" or "output", ``dtype`` a numpy name."""

    name: str
    mode: str
    dtype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        return f"{self.mode} {self.dtype}{_fmt(self.shape)}"


@dataclass(frozen=True)
class EngineInfo:
    """What a deserialized engine says about itself, plus the TensorRT version that loaded it."""

    tensors: tuple[TensorInfo, ...]
    tensorrt_version: str
    device_memory_bytes: int = 0


def _fmt(value: Any) -> str:
    if isinstance(value, tuple):
        return "[" + ",".join(str(v) for v in value) + "]"
    return str(value)


def trt_dtype_name(trt: Any, dtype: Any) -> str:
    """The numpy name of a ``trt.DataType`` (TensorRT's own name for bf16/fp8)."""
    try:
        return np.dtype(trt.nptype(dtype)).name
    except TypeError:  # bf16 / fp8 have no numpy type: report TensorRT's own name
        return str(dtype).rsplit(".", 1)[-1].lower()


def engine_info(engine: Any, trt: Any, context: Any = None) -> EngineInfo:
    """Read ``engine``'s I/O; shapes come from ``context`` when given (resolved dynamic dims)."""
    tensors = []
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        shape = context.get_tensor_shape(name) if context is not None else engine.get_tensor_shape(name)
        tensors.append(TensorInfo(
            name=name,
            mode=engine.get_tensor_mode(name).name.lower(),
            dtype=trt_dtype_name(trt, engine.get_tensor_dtype(name)),
            shape=tuple(int(d) for d in shape),
        ))
    return EngineInfo(tuple(tensors), str(trt.__version__), int(engine.device_memory_size_v2))


def platform_differences(entry: NetworkEntry, tensorrt_version: str, device: cuda.DeviceInfo) -> list[str]:
    """Lines for a plan built by another TensorRT or for another GPU (or never built)."""
    built = entry.engine
    if not built:
        return [f"{entry.name}: engine expected an entry in the manifest, found none (not built)"]
    lines = []
    if built.get("tensorrt_version") != tensorrt_version:
        lines.append(f"{entry.name}: tensorrt_version expected {built.get('tensorrt_version')} (the plan's), "
                     f"found {tensorrt_version} (installed)")
    if built.get("compute_capability") != device.compute_capability:
        lines.append(f"{entry.name}: compute_capability expected {built.get('compute_capability')} "
                     f"({built.get('gpu_name')}), found {device.compute_capability} ({device.name})")
    return lines


def optimization_profiles(entry: NetworkEntry) -> tuple[tuple[ResolvedNetwork, ...], tuple[int, ...]]:
    """The distinct static shapes of ``entry``'s profiles (one optimization profile each, in order of
    first use) and, per manifest profile, the index of its shape (what ``engine.profiles`` records)."""
    shapes: dict[ResolvedNetwork, int] = {}
    indices = tuple(shapes.setdefault(network, len(shapes)) for network in entry.profiles)
    return tuple(shapes), indices


def tensor_differences(tensors: tuple[TensorInfo, ...], entry: ResolvedNetwork) -> list[str]:
    """Lines for I/O tensors that differ from ``entry`` (a network at one shape) in presence, mode,
    dtype or shape."""
    lines: list[str] = []
    expected = {t.name: TensorInfo(t.name, "input", t.dtype, t.shape) for t in entry.inputs}
    expected.update({t.name: TensorInfo(t.name, "output", t.dtype, t.shape) for t in entry.outputs})
    found = {t.name: t for t in tensors}
    for name, want in expected.items():
        got = found.get(name)
        if got is None:
            lines.append(f"{entry.name}.{name}: expected {want.describe()}, found no such tensor in the engine")
            continue
        for field in ("mode", "dtype", "shape"):
            a, b = getattr(want, field), getattr(got, field)
            if a != b:
                lines.append(f"{entry.name}.{name}: {field} expected {_fmt(a)}, found {_fmt(b)}")
    for name in (t.name for t in tensors if t.name not in expected):
        lines.append(f"{entry.name}.{name}: expected no such tensor (not in the manifest), "
                     f"found {found[name].describe()}")
    return lines


def engine_differences(info: EngineInfo, entry: NetworkEntry, device: cuda.DeviceInfo, profile: int = 0) -> list[str]:
    """Every difference between an engine (its context at manifest profile ``profile``) and its
    manifest entry, one readable line each."""
    lines = platform_differences(entry, info.tensorrt_version, device)
    return lines + tensor_differences(info.tensors, entry.resolved(profile))


def check_engine_against_manifest(info: EngineInfo, entry: NetworkEntry, device: cuda.DeviceInfo,
                                  profile: int = 0) -> None:
    """Raise :class:`EngineMismatchError` listing every difference, or return None when they agree."""
    lines = engine_differences(info, entry, device, profile)
    if lines:
        raise EngineMismatchError(entry.name, lines)
    built = entry.engine or {}
    if built.get("gpu_name") not in (None, device.name):
        log.warning("%s: plan built on %s, running on %s (same compute capability %s)",
                    entry.name, built.get("gpu_name"), device.name, device.compute_capability)


def select_profile(context: Any, optimization_profile: int, stream_handle: int, name: str) -> None:
    """Make ``optimization_profile`` the context's (``set_optimization_profile_async`` on the stream
    ``stream_handle``); a new context starts on profile 0, so single-profile engines need no call."""
    if optimization_profile and not context.set_optimization_profile_async(optimization_profile, stream_handle):
        raise BackendError(f"{name}: set_optimization_profile_async({optimization_profile}) expected True, "
                           f"found False (a plan built for fewer profiles? rebuild with `kandinsky-trt build`)")


def set_static_input_shapes(engine: Any, context: Any, entry: ResolvedNetwork) -> None:
    """Give dynamic-dim inputs (``-1`` in the engine) the static shapes of ``entry`` (one profile's)."""
    names = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    for tensor in entry.inputs:
        if tensor.name in names and any(int(d) < 0 for d in engine.get_tensor_shape(tensor.name)):
            if not context.set_input_shape(tensor.name, tensor.shape):
                raise BackendError(f"{entry.name}.{tensor.name}: set_input_shape{_fmt(tensor.shape)} "
                                   "expected True, found False (outside the engine's profile)")


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
