"""The one stand-in ``tensorrt`` module: the subset of the TensorRT 10.x/11.x Python API we and
Polygraphy call, mirroring TensorRT 11 (no ``BuilderFlag.FP16``).

Build side (the engine-build tests, through Polygraphy's ``NetworkFromOnnxPath``, ``CreateConfig``,
``engine_bytes_from_network`` and ``engine_from_bytes``): the "parser" reads the ONNX graph's I/O
with ``onnx``; the "plan" is JSON of that I/O; what was called lands in ``STATE.calls``.
Runtime side (the backend and loop tests): a plan ``b"plan:<name>"`` deserializes to
``STATE.make_engine(name)``, a :class:`FakeEngine` whose execution is a numpy function over
simulated device memory (:mod:`fakes.cuda`).

One module object serves the whole session: Polygraphy imports ``tensorrt`` lazily once per process
and keeps that module, so tests change the behaviour through :data:`STATE` (:meth:`FakeTensorRT.reset`,
done by :func:`install`) rather than by building new modules.
"""

from __future__ import annotations

import enum
import json
import sys
import types

import numpy as np

from fakes.cuda import FakeCuda, FakeMemory, install_cuda
from kandinsky_trt.runtime.backends.trt_engine import TensorInfo

TRT_VERSION = "11.4.0.106"

# TensorRT's DataType values; nptype fails on the ones numpy lacks, as TensorRT's does.
DataType = enum.Enum("DataType", {"FLOAT": 0, "HALF": 1, "INT8": 2, "INT32": 3, "BOOL": 4, "UINT8": 5,
                                  "FP8": 6, "BF16": 7, "INT64": 8})
_NUMPY = {DataType.FLOAT: "float32", DataType.HALF: "float16", DataType.INT8: "int8", DataType.INT32: "int32",
          DataType.BOOL: "bool", DataType.UINT8: "uint8", DataType.INT64: "int64"}
_DATA_TYPES = {name: data_type for data_type, name in _NUMPY.items()}


def nptype(data_type: DataType):
    if data_type not in _NUMPY:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return np.dtype(_NUMPY[data_type]).type


class FakeTensorRT:
    """Behaviour switches and a record of calls, shared by the one stand-in module."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, parser_errors=(), build_fails: bool = False, make_engine=None) -> None:
        self.parser_errors, self.build_fails, self.make_engine = list(parser_errors), build_fails, make_engine
        self.deserialized: list[str] = []  # names of the b"plan:<name>" plans, in order
        self.calls: dict = {"pool": [], "profiles": [], "caches_loaded": [], "flags_cleared": [],
                            "flags_set": [], "parsed": None, "network_flags": None, "config": None}


STATE = FakeTensorRT()


class HostMemory(bytes):
    """``IHostMemory``: a buffer that is also a context manager (Polygraphy uses ``with cache.serialize()``)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class ParserError:
    """``IParserError``; TensorRT's ``str()`` of it is what Polygraphy logs."""

    def __init__(self, node: int, name: str, op: str, desc: str) -> None:
        self.text = f"In node {node} with name: {name} and operator: {op} (parse): UNSUPPORTED_NODE: {desc}"

    def __str__(self) -> str:
        return self.text


# -- runtime side: engines and execution contexts ---------------------------------------------------


class FakeEngine:
    """An engine with named I/O whose execution is ``fn`` (numpy) over simulated device memory.

    With ``cuda`` (a :class:`~fakes.cuda.FakeCuda`), executions are kernels of that layer: recorded
    while a stream is captured, replayed by a graph launch with the addresses and arena they had then.
    ``contexts`` is each execution context created, in order. A built plan's engine has no ``fn``.
    """

    def __init__(self, tensors: list[TensorInfo], fn=None, device_memory: int = 2048,
                 memory: FakeMemory | None = None, cuda_layer: FakeCuda | None = None) -> None:
        self.tensors, self.fn, self.device_memory_size_v2 = {t.name: t for t in tensors}, fn, device_memory
        self.memory, self.cuda, self.contexts = memory, cuda_layer, []

    num_io_tensors = property(lambda self: len(self.tensors))

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return types.SimpleNamespace(name=self.tensors[name].mode.upper())

    def get_tensor_dtype(self, name):
        return _DATA_TYPES[self.tensors[name].dtype]

    def get_tensor_shape(self, name):
        return self.tensors[name].shape

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        self.contexts.append(FakeContext(self))
        return self.contexts[-1]


class FakeContext:
    def __init__(self, engine: FakeEngine) -> None:
        self.engine, self.addresses, self.device_memory, self.executions = engine, {}, None, 0

    def get_tensor_shape(self, name):
        return self.engine.get_tensor_shape(name)

    def set_device_memory(self, ptr, size):
        assert size >= self.engine.device_memory_size_v2
        self.device_memory = (ptr, size)

    def set_tensor_address(self, name, ptr):
        self.addresses[name] = ptr
        return name in self.engine.tensors

    def execute_async_v3(self, stream_handle):
        if self.engine.cuda is None:
            self._run(self.addresses)
            return True
        # A kernel uses the addresses and arena it had when enqueued (a captured graph bakes them in).
        addresses, arena, memory = dict(self.addresses), self.device_memory, self.engine.memory

        def run():
            stale = [p for p in (*addresses.values(), arena[0]) if p in memory.freed]
            assert not stale, f"kernel uses freed device memory at {stale}"
            self._run(addresses)

        self.engine.cuda.kernel(run)
        return True

    def _run(self, addresses: dict) -> None:
        def array(t: TensorInfo):
            nbytes = int(np.prod(t.shape)) * np.dtype(t.dtype).itemsize
            return self.engine.memory.view(addresses[t.name], nbytes).view(t.dtype).reshape(t.shape)

        tensors = self.engine.tensors.values()
        outputs = self.engine.fn(**{t.name: array(t).copy() for t in tensors if t.mode == "input"})
        for t in tensors:
            if t.mode == "output":
                array(t)[...] = outputs[t.name]
        self.executions += 1


class Runtime:
    """Plans ``b"plan:<name>"`` (runtime tests) come from ``STATE.make_engine``; others are our Builder's JSON."""

    def __init__(self, logger):
        self.logger = logger

    def deserialize_cuda_engine(self, data):
        plan = bytes(data)
        if plan.startswith(b"plan:"):
            name = plan.split(b":", 1)[1].decode()
            STATE.deserialized.append(name)
            return STATE.make_engine(name)
        built = json.loads(plan)
        return FakeEngine([TensorInfo(name, "input" if i < built["inputs"] else "output", dtype, tuple(shape))
                           for i, (name, dtype, shape) in enumerate(built["io"])])


# -- build side: networks, the ONNX parser, configs, the builder -------------------------------------

Logger = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)
DeviceType = enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 1})


def _tensor(value_info) -> types.SimpleNamespace:
    from onnx.helper import tensor_dtype_to_np_dtype

    t = value_info.type.tensor_type
    return types.SimpleNamespace(name=value_info.name, dtype=_DATA_TYPES[tensor_dtype_to_np_dtype(t.elem_type).name],
                                 is_shape_tensor=False, shape=tuple(d.dim_value for d in t.shape.dim))


class Network:
    def __init__(self, flags):
        self.flags, self.inputs, self.outputs = flags, [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return self.inputs[i]

    def get_output(self, i):
        return self.outputs[i]

    def get_flag(self, flag):
        return bool(self.flags & (1 << int(flag)))

    def __iter__(self):  # layers; Polygraphy scans them for precision settings
        return iter(())


class OnnxParser:
    def __init__(self, network, logger):
        self.network, self.errors = network, list(STATE.parser_errors)

    def parse_from_file(self, path):
        import onnx

        STATE.calls["parsed"] = path
        graph = onnx.load(path, load_external_data=False).graph
        self.network.inputs = [_tensor(v) for v in graph.input]
        self.network.outputs = [_tensor(v) for v in graph.output]
        return not self.errors

    num_errors = property(lambda self: len(self.errors))

    def get_error(self, i):
        return self.errors[i]


class TimingCache:
    def __init__(self, data):
        self.data = bytes(data)

    def serialize(self):
        return HostMemory(self.data + b"+timings")

    def combine(self, other, ignore_mismatch):
        return True


class OptimizationProfile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, min, opt, max):
        self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

    def __bool__(self):
        return bool(self.shapes)


class BuilderConfig:
    builder_optimization_level, DLA_core, default_device_type = 3, -1, DeviceType.GPU

    def __init__(self):
        self.cache, self.pools = None, {}
        STATE.calls["config"] = self

    def set_memory_pool_limit(self, pool, size):
        STATE.calls["pool"].append((pool, size))
        self.pools[pool] = size

    def get_memory_pool_limit(self, pool):
        return self.pools.get(pool, 1 << 40)

    def create_timing_cache(self, data):
        STATE.calls["caches_loaded"].append(bytes(data))
        return TimingCache(data)

    def set_timing_cache(self, cache, ignore_mismatch):
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache

    def add_optimization_profile(self, profile):
        STATE.calls["profiles"].append(profile.shapes)

    num_optimization_profiles = property(lambda self: len(STATE.calls["profiles"]))

    def get_flag(self, flag):
        return flag in STATE.calls["flags_set"]

    def set_flag(self, flag):
        STATE.calls["flags_set"].append(flag)

    def clear_flag(self, flag):
        STATE.calls["flags_cleared"].append(flag)


class Builder:
    def __init__(self, logger):
        self.logger = logger

    def create_network(self, flags=0):
        STATE.calls["network_flags"] = flags
        return Network(flags)

    def create_builder_config(self):
        return BuilderConfig()

    def create_optimization_profile(self):
        return OptimizationProfile()

    def build_serialized_network(self, network, config):
        """The plan: JSON of the network's I/O (numpy dtype names), which :class:`Runtime` reads back."""
        if STATE.build_fails:
            self.logger.log(Logger.ERROR, "Requested amount of GPU memory could not be allocated")
            return None
        io = [[t.name, _NUMPY[t.dtype], list(t.shape)] for t in network.inputs + network.outputs]
        return HostMemory(json.dumps({"inputs": len(network.inputs), "io": io}).encode())


# -- the module -------------------------------------------------------------------------------------


def _module() -> types.ModuleType:
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6})  # TensorRT 11: no FP16
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    trt.Logger, trt.DeviceType, trt.DataType, trt.nptype = Logger, DeviceType, DataType, nptype
    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt


MODULE = _module()


def install(monkeypatch, make_engine=None, memory: FakeMemory | None = None) -> FakeTensorRT:
    """``tensorrt`` is :data:`MODULE` (fresh state; plans ``b"plan:<name>"`` become ``make_engine(name)``)
    on a simulated H100 (with ``memory``: its streams and buffers too); returns the state."""
    STATE.reset(make_engine=make_engine)
    monkeypatch.setitem(sys.modules, "tensorrt", MODULE)
    install_cuda(monkeypatch, memory)
    return STATE
