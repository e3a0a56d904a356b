"""The TensorRT calls of a build: parse, configure, build, measure — nothing else.

Written to the TensorRT 10.x/11.x Python API (docs.nvidia.com/deeplearning/tensorrt, Python API
"Core/Builder", "Parsers/Onnx"; "Migrating from TensorRT 10.x to 11.x"):

* networks are strongly typed: ``create_network(1 << int(NetworkDefinitionCreationFlag.STRONGLY_TYPED))``.
  TensorRT 11 removed ``BuilderFlag.FP16`` and always types strongly (the flag is accepted and
  ignored); on 10.x the flag is what makes the fp16 ONNX graph's own types the engine's types.
  Precision therefore comes from the exported graph, never from a builder flag;
* ``OnnxParser.parse_from_file`` (not ``parse(bytes)``) so weights stored as external data next
  to the ``.onnx`` file are found (Polygraphy's ``NetworkFromOnnxPath`` does the same);
* one optimization profile with min = opt = max = the manifest's shapes, only for inputs the
  graph leaves dynamic (the exporter writes static shapes, so usually none is needed);
* ``builder_optimization_level``, ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, bytes)``;
* a timing cache loaded with ``create_timing_cache`` / ``set_timing_cache`` and, after the
  build, merged with the file's current content (``ITimingCache.combine``) and written atomically;
* ``build_serialized_network`` → ``IHostMemory`` (a buffer), then one deserialization to read
  ``device_memory_size_v2`` and check the engine's I/O against the manifest.

Nothing here was executed on this project's CI (no GPU, no TensorRT libraries); the ``tensorrt``
tests run it where TensorRT is installed.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from kandinsky_trt.engine.builder import BuildRequest, BuiltPlan, Platform
from kandinsky_trt.engine.errors import EngineBuildError, OnnxParseError
from kandinsky_trt.runtime import cuda
from kandinsky_trt.runtime.backends.trt import (
    TensorInfo,
    engine_info,
    import_tensorrt,
    make_trt_logger,
    set_static_input_shapes,
    tensor_differences,
    trt_dtype_name,
)
from kandinsky_trt.runtime.manifest import NetworkEntry, write_bytes_atomic

log = logging.getLogger(__name__)


def describe_parser_error(error: Any) -> str:
    """One line per ``IParserError``: node index, name and operator, then the description."""
    node = error.node()
    where = "graph" if node < 0 else f"node {node} {error.node_name()!r} ({error.node_operator()})"
    return f"{where}: {error.desc()} [{error.code()}]"


def _parse(parser: Any, request: BuildRequest) -> None:
    ok = parser.parse_from_file(str(request.onnx_path))
    if ok and parser.num_errors == 0:
        return
    errors = [describe_parser_error(parser.get_error(i)) for i in range(parser.num_errors)]
    raise OnnxParseError(request.entry.name, request.onnx_path, errors)


def _resolved_shape(shape: tuple[int, ...], manifest_shape: tuple[int, ...]) -> tuple[int, ...]:
    """A dynamic (-1) shape compatible with the manifest's counts as the manifest's (the profile fixes it)."""
    compatible = len(shape) == len(manifest_shape) and all(d < 0 or d == m for d, m in zip(shape, manifest_shape))
    return manifest_shape if compatible else shape


def network_tensors(trt: Any, network: Any, entry: NetworkEntry) -> tuple[TensorInfo, ...]:
    """The parsed network's I/O as :class:`TensorInfo`, dynamic dims resolved against the manifest."""
    shapes = {t.name: t.shape for t in entry.inputs + entry.outputs}
    tensors = []
    for mode, count, get in (("input", network.num_inputs, network.get_input),
                             ("output", network.num_outputs, network.get_output)):
        for index in range(count):
            tensor = get(index)
            shape = tuple(int(d) for d in tensor.shape)
            if tensor.name in shapes and any(d < 0 for d in shape):
                shape = _resolved_shape(shape, shapes[tensor.name])
            tensors.append(TensorInfo(tensor.name, mode, trt_dtype_name(trt, tensor.dtype), shape))
    return tuple(tensors)


def _add_profile(builder: Any, network: Any, config: Any, entry: NetworkEntry) -> None:
    """min = opt = max = the manifest shape, for the inputs the graph leaves dynamic."""
    profile, dynamic = builder.create_optimization_profile(), []
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        if any(int(d) < 0 for d in tensor.shape):
            shape = entry.resolved.tensor(tensor.name).shape
            profile.set_shape(tensor.name, shape, shape, shape)
            dynamic.append(tensor.name)
    if dynamic:
        log.info("%s: dynamic inputs %s fixed to the manifest's shapes by one profile", entry.name, dynamic)
        config.add_optimization_profile(profile)


def attach_timing_cache(config: Any, path: Path | None) -> Any:
    """Load ``path`` (or start empty) into ``config``; the returned cache must outlive the build."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("timing cache %s: expected one written by this TensorRT on this GPU, found an "
                    "incompatible one; starting from an empty cache", path)
        cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def save_timing_cache(config: Any, path: Path) -> None:
    """Merge the build's timing cache with what ``path`` holds now, then write it atomically."""
    cache = config.get_timing_cache()
    if cache is None:
        return
    if path.is_file():  # another build may have written entries meanwhile (Polygraphy merges the same way)
        previous = config.create_timing_cache(path.read_bytes())
        if previous is not None and not cache.combine(previous, ignore_mismatch=False):
            log.debug("timing cache %s: entries from another TensorRT/GPU were not merged", path)
    write_bytes_atomic(path, memoryview(cache.serialize()))


class TensorRTPlanBuilder:
    """Builds plans with the installed TensorRT on the current GPU (see the module docstring)."""

    def __init__(self) -> None:
        self._trt = import_tensorrt()

    def platform(self) -> Platform:
        device = cuda.device_info()
        return Platform(str(self._trt.__version__), device.name, device.compute_capability)

    def build(self, request: BuildRequest) -> BuiltPlan:
        trt, entry = self._trt, request.entry
        logger = make_trt_logger(trt, log)
        builder = trt.Builder(logger)
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        _parse(parser, request)
        self._check_io(network_tensors(trt, network, entry), entry, "the parsed ONNX graph")
        config = builder.create_builder_config()
        config.builder_optimization_level = request.opt_level
        if request.workspace_bytes is not None:
            config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, request.workspace_bytes)
        _add_profile(builder, network, config, entry)
        attach_timing_cache(config, request.timing_cache)  # the config keeps the cache alive (keep_alive)
        plan = builder.build_serialized_network(network, config)
        if plan is None:
            raise EngineBuildError(
                f"{entry.name}: build_serialized_network expected a plan, found None. Likely causes: out "
                "of GPU memory (lower --workspace, stop other GPU processes, or use a GPU with more "
                "memory), or a layer TensorRT cannot implement. TensorRT said: "
                + ("; ".join(logger.errors[-5:]) or "no error (rerun with --verbose for its full log)")
            )
        if request.timing_cache is not None:
            save_timing_cache(config, request.timing_cache)
        return BuiltPlan(plan, self._measure(plan, entry, logger))

    def _measure(self, plan: Any, entry: NetworkEntry, logger: Any) -> int:
        """Deserialize once: activation bytes for the shared arena, and the engine's I/O check."""
        trt = self._trt
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineBuildError(f"{entry.name}: the new plan expected to deserialize, found None "
                                   f"({'; '.join(logger.errors[-5:])})")
        context = engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        set_static_input_shapes(engine, context, entry)
        info = engine_info(engine, trt, context)
        self._check_io(info.tensors, entry, "the built engine")
        return info.device_memory_bytes

    @staticmethod
    def _check_io(tensors: tuple[TensorInfo, ...], entry: NetworkEntry, what: str) -> None:
        lines = tensor_differences(tensors, entry)
        if lines:
            raise EngineBuildError(
                f"{entry.name}: {what} expected the manifest's I/O, found {len(lines)} difference(s):\n  "
                + "\n  ".join(lines) + "\n(the export and the manifest disagree: re-run `kandinsky-trt export`)"
            )
