"""The TensorRT part of a build, on Polygraphy's loaders (``polygraphy.backend.trt``; no shelling out).

Polygraphy makes the TensorRT calls, as NVIDIA maintains and tests them for each TensorRT release:
``NetworkFromOnnxPath(path, strongly_typed=True)`` (a ``STRONGLY_TYPED`` network — TensorRT 11 has
no ``BuilderFlag.FP16``, the fp16 graph's own types are the engine's — parsed with
``parse_from_file``, so external weights are found); ``CreateConfig`` (one optimization profile per
distinct static shape of the manifest's profiles, min = opt = max; optimization level; workspace limit; timing cache loaded; TF32 cleared, so
fp32 islands run in fp32); ``engine_bytes_from_network`` (build, then the timing cache merged with
the file and saved); ``engine_from_bytes`` (deserialized once to measure).

Ours, because Polygraphy does not do it: the I/O checks against the manifest, the activation size
for the shared arena, an atomic timing-cache write (Polygraphy writes in place: it updates a temporary
copy that then replaces the file), and Polygraphy's log — TensorRT's included — routed into
``logging`` (logger ``Polygraphy``) during the build, errors kept for our exceptions.
Not run against real TensorRT here (no GPU, no TensorRT libraries): the CPU tests drive these
loaders against a stand-in ``tensorrt`` module.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from kandinsky_trt.engine.errors import EngineBuildError, OnnxParseError, TensorRTUnavailableError
from kandinsky_trt.engine.plan import BuildRequest, BuiltPlan, Platform
from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.trt_engine import (TensorInfo, engine_info, import_tensorrt, optimization_profiles,
                                                       select_profile, set_static_input_shapes, tensor_differences,
                                                       trt_dtype_name)
from kandinsky_trt.runtime.contract.manifest import NetworkEntry
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork

log = logging.getLogger(__name__)


def _import_polygraphy() -> tuple[Any, Any, type]:
    """(``polygraphy.backend.trt``, Polygraphy's ``G_LOGGER``, ``PolygraphyException``), or install advice."""
    try:
        from polygraphy.backend import trt as loaders
        from polygraphy.exception import PolygraphyException
        from polygraphy.logger import G_LOGGER
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"polygraphy: expected the package (the engine build runs on its loaders), found none ({err}); "
            "install it with: pip install 'kandinsky-trt[gpu]'"
        ) from None
    return loaders, G_LOGGER, PolygraphyException


@contextlib.contextmanager
def polygraphy_logging(g_logger: Any) -> Iterator[list[str]]:
    """Route Polygraphy's (process-wide) log into ``logging`` for the block; yields the error messages."""
    saved = (g_logger.use_python_logging_system, g_logger.colors, g_logger.letter, g_logger.module_severity)
    g_logger.use_python_logging_system = True  # records go to logging.getLogger("Polygraphy")
    g_logger.colors = g_logger.letter = False  # logging adds the level itself
    if log.isEnabledFor(logging.DEBUG):
        g_logger.module_severity = g_logger.VERBOSE  # TensorRT's INFO lines are Polygraphy VERBOSE
    errors: list[str] = []
    keeper = logging.Handler(logging.ERROR)  # TensorRT's and Polygraphy's errors, for our messages
    keeper.emit = lambda record: errors.append(record.getMessage())
    logging.getLogger("Polygraphy").addHandler(keeper)
    try:
        yield errors
    finally:
        logging.getLogger("Polygraphy").removeHandler(keeper)
        (g_logger.use_python_logging_system, g_logger.colors, g_logger.letter, g_logger.module_severity) = saved


def static_profile(loaders: Any, network: ResolvedNetwork) -> Any:
    """min = opt = max = ``network``'s shape (one manifest profile's) for every input."""
    profile = loaders.Profile()
    for tensor in network.inputs:
        profile.add(tensor.name, tensor.shape, tensor.shape, tensor.shape)
    return profile


def network_tensors(trt: Any, network: Any, graph: ResolvedNetwork) -> tuple[TensorInfo, ...]:
    """The parsed network's I/O as :class:`TensorInfo`; a dynamic dim (-1) where the graph has a
    profile dim counts as that dim (the optimization profiles fix it), a static one must match."""
    shapes = {t.name: t.shape for t in graph.inputs + graph.outputs}
    tensors = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for index in range(count):
            tensor = get(index)
            shape, wanted = tuple(int(d) for d in tensor.shape), shapes.get(tensor.name, ())
            if len(shape) == len(wanted) and all(d == w or (d < 0 and isinstance(w, str))
                                                 for d, w in zip(shape, wanted)):
                shape = wanted
            tensors.append(TensorInfo(tensor.name, mode, trt_dtype_name(trt, tensor.dtype), shape))
    return tuple(tensors)


def _check_io(tensors: tuple[TensorInfo, ...], entry: ResolvedNetwork, what: str) -> None:
    lines = tensor_differences(tensors, entry)
    if lines:
        raise EngineBuildError(
            f"{entry.name}: {what} expected the manifest's I/O, found {len(lines)} difference(s):\n  "
            + "\n  ".join(lines) + "\n(the export and the manifest disagree: re-run `kandinsky-trt export`)"
        )


def _build_bytes(loaders: Any, network: tuple, config: Any, cache: Path | None) -> Any:
    """``engine_bytes_from_network``; it updates a temporary copy of ``cache`` that then replaces it."""
    if cache is None:
        return loaders.engine_bytes_from_network(network, config)
    fd, tmp = tempfile.mkstemp(prefix=f".{cache.name}.", suffix=".tmp", dir=cache.parent)
    os.close(fd)
    try:
        if cache.is_file():  # Polygraphy merges what the file holds into the new cache
            shutil.copyfile(cache, tmp)
        plan = loaders.engine_bytes_from_network(network, config, save_timing_cache=tmp)
        os.replace(tmp, cache)
        return plan
    finally:
        for leftover in (tmp, tmp + ".lock"):  # Polygraphy locks the file it writes through "<path>.lock"
            Path(leftover).unlink(missing_ok=True)


class TensorRTPlanBuilder:
    """Builds plans with the installed TensorRT on the current GPU (see the module docstring)."""

    def __init__(self) -> None:
        self._trt = import_tensorrt()
        self._loaders, self._g_logger, self._failed = _import_polygraphy()

    def platform(self) -> Platform:
        device = cuda.device_info()
        return Platform(str(self._trt.__version__), device.name, device.compute_capability)

    def build(self, request: BuildRequest) -> BuiltPlan:
        loaders, entry = self._loaders, request.entry
        with polygraphy_logging(self._g_logger) as errors:
            network = self._parse(request, errors)
            _check_io(network_tensors(self._trt, network[1], entry.graph), entry.graph, "the parsed ONNX graph")
            workspace, cache = request.workspace_bytes, request.timing_cache
            shapes, _ = optimization_profiles(entry)
            config = loaders.CreateConfig(
                profiles=[static_profile(loaders, shape) for shape in shapes],
                builder_optimization_level=request.opt_level,
                memory_pool_limits=None if workspace is None else {self._trt.MemoryPoolType.WORKSPACE: workspace},
                load_timing_cache=str(cache) if cache is not None and cache.is_file() else None)
            try:
                plan = _build_bytes(loaders, network, config, cache)
            except self._failed as err:  # Polygraphy reports a failed build by raising PolygraphyException
                raise EngineBuildError(
                    f"{entry.name}: build_serialized_network expected a plan, found none ({err}). Likely "
                    "causes: out of GPU memory (lower --workspace, stop other GPU processes, or use a GPU "
                    "with more memory), or a layer TensorRT cannot implement. TensorRT said: "
                    + ("; ".join(errors[-5:]) or "no error (rerun with --verbose for its full log)")
                ) from None
            return BuiltPlan(plan, self._measure(plan, entry, errors))

    def _parse(self, request: BuildRequest, errors: list[str]) -> tuple:
        try:
            return self._loaders.NetworkFromOnnxPath(str(request.onnx_path), strongly_typed=True)()
        except self._failed:  # Polygraphy logs each parser error, then raises PolygraphyException
            raise OnnxParseError(request.entry.name, request.onnx_path, errors[:-1] or errors) from None

    def _measure(self, plan: Any, entry: NetworkEntry, errors: list[str]) -> int:
        """Deserialize once: activation bytes for the shared arena (the largest over the optimization
        profiles), and the engine's I/O checked at each optimization profile."""
        trt = self._trt
        try:
            engine = self._loaders.engine_from_bytes(plan)
        except self._failed as err:
            raise EngineBuildError(f"{entry.name}: the new plan expected to deserialize, found an error "
                                   f"({err}; {'; '.join(errors[-5:])})") from None
        info = None
        for index, shape in enumerate(optimization_profiles(entry)[0]):
            context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
            select_profile(context, index, 0, entry.name)  # the default stream: nothing is enqueued
            set_static_input_shapes(engine, context, shape)
            info = engine_info(engine, trt, context)
            _check_io(info.tensors, shape, f"the built engine (optimization profile {index})")
        return info.device_memory_bytes
