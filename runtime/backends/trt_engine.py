"""What a TensorRT plan says about itself, checked against its manifest entry; TensorRT imported lazily.

Plain data and functions over ``tensorrt`` objects passed in (no import of ``tensorrt`` here except
in :func:`import_tensorrt`), so the checks run without TensorRT: :func:`engine_info` reads an
engine's I/O into :class:`EngineInfo`; :func:`check_engine_against_manifest` lists every difference
(TensorRT version, compute capability, tensor presence, mode, dtype, shape) one line each;
:func:`optimization_profiles` maps manifest profiles to a plan's optimization profiles (one per
distinct static shape); :func:`select_profile` and :func:`set_static_input_shapes` put a context on
one of them. Used by the backend (``trt.py``) and the engine builder (``engine/``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.contract.manifest import NetworkEntry
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork
from kandinsky_trt.runtime.cuda import runtime_api as cuda

log = logging.getLogger("kandinsky_trt.runtime.backends.trt")  # one logger for the backend and its checks


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
