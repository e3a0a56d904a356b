"""A stand-in ``tensorrt`` module for the engine-build tests: the subset of the TensorRT 10.x/11.x
Python API that Polygraphy's loaders (``NetworkFromOnnxPath``, ``CreateConfig``,
``engine_bytes_from_network``, ``engine_from_bytes``) and our builder call, mirroring TensorRT 11
(no ``BuilderFlag.FP16``). The "parser" reads the ONNX graph's I/O with ``onnx``; the "plan" is JSON
of that I/O; what was called lands in ``FakeTensorRT.calls``.

One module object serves the whole session (:func:`fake_tensorrt`): Polygraphy imports ``tensorrt``
lazily once per process and keeps that module, so tests change the behaviour through
:class:`FakeTensorRT` state (``reset``) rather than by building new modules.

The runtime backend's tests (tests/test_trt_backend.py) use their own engine/context stand-ins,
which simulate device memory and execution; this one covers the build side only.
"""

from __future__ import annotations

import enum
import functools
import json
import types

import numpy as np

TRT_VERSION = "11.4.0.106"


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


class FakeTensorRT:
    """Behaviour switches and a record of calls, shared by the one stand-in module."""

    def __init__(self) -> None:
        self.reset()

    def reset(self, parser_errors=(), build_fails: bool = False) -> None:
        self.parser_errors, self.build_fails = list(parser_errors), build_fails
        self.calls: dict = {"pool": [], "profiles": [], "caches_loaded": [], "flags_cleared": [],
                            "flags_set": [], "parsed": None, "network_flags": None, "config": None}


def _tensor(value_info) -> types.SimpleNamespace:
    t = value_info.type.tensor_type
    return types.SimpleNamespace(name=value_info.name, dtype=t.elem_type, is_shape_tensor=False,
                                 shape=tuple(d.dim_value for d in t.shape.dim))


def _classes(state: FakeTensorRT, trt: types.ModuleType) -> dict:
    def calls(key: str) -> list:  # looked up at call time: reset() replaces the dict
        return state.calls[key]

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
            self.network, self.errors = network, list(state.parser_errors)

        def parse_from_file(self, path):
            import onnx

            state.calls["parsed"] = path
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

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, min, opt, max):
            self.shapes[name] = (tuple(min), tuple(opt), tuple(max))

        def __bool__(self):
            return bool(self.shapes)

    class Config:
        builder_optimization_level, DLA_core, default_device_type = 3, -1, trt.DeviceType.GPU

        def __init__(self):
            self.cache, self.pools = None, {}
            state.calls["config"] = self

        def set_memory_pool_limit(self, pool, size):
            calls("pool").append((pool, size))
            self.pools[pool] = size

        def get_memory_pool_limit(self, pool):
            return self.pools.get(pool, 1 << 40)

        def create_timing_cache(self, data):
            calls("caches_loaded").append(bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            calls("profiles").append(profile.shapes)

        num_optimization_profiles = property(lambda self: len(state.calls["profiles"]))

        def get_flag(self, flag):
            return flag in state.calls["flags_set"]

        def set_flag(self, flag):
            calls("flags_set").append(flag)

        def clear_flag(self, flag):
            calls("flags_cleared").append(flag)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags=0):
            state.calls["network_flags"] = flags
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            if state.build_fails:
                self.logger.log(trt.Logger.ERROR, "Requested amount of GPU memory could not be allocated")
                return None
            io = [[t.name, t.dtype, list(t.shape)] for t in network.inputs + network.outputs]
            return HostMemory(json.dumps({"inputs": len(network.inputs), "io": io}).encode())

    return {"Builder": Builder, "OnnxParser": OnnxParser}


class Engine:
    def __init__(self, plan):
        self.plan, self.device_memory_size_v2 = json.loads(bytes(plan)), 2048

    num_io_tensors = property(lambda self: len(self.plan["io"]))

    def get_tensor_name(self, i):
        return self.plan["io"][i][0]

    def _row(self, name):
        return next((i, row) for i, row in enumerate(self.plan["io"]) if row[0] == name)

    def get_tensor_mode(self, name):
        return types.SimpleNamespace(name="INPUT" if self._row(name)[0] < self.plan["inputs"] else "OUTPUT")

    def get_tensor_dtype(self, name):
        return self._row(name)[1][1]

    def get_tensor_shape(self, name):
        return tuple(self._row(name)[1][2])

    def create_execution_context(self, strategy):
        assert strategy == "USER_MANAGED"
        return types.SimpleNamespace(get_tensor_shape=self.get_tensor_shape)


@functools.cache
def fake_tensorrt() -> tuple[types.ModuleType, FakeTensorRT]:
    """The session's one stand-in module and its state (see the module docstring)."""
    state = FakeTensorRT()
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION
    trt.ILogger = type("ILogger", (), {"__init__": lambda self: None})
    trt.Logger = types.SimpleNamespace(INTERNAL_ERROR=0, ERROR=1, WARNING=2, INFO=3, VERBOSE=4)
    trt.init_libnvinfer_plugins = lambda logger, namespace: True
    trt.NetworkDefinitionCreationFlag = enum.IntEnum("NetworkDefinitionCreationFlag", {"STRONGLY_TYPED": 0})
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {"TF32": 6})  # TensorRT 11: no FP16
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.DeviceType = enum.IntEnum("DeviceType", {"GPU": 0, "DLA": 1})
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    trt.nptype = lambda dtype: {1: np.float32, 10: np.float16}[dtype]
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=Engine)
    for name, cls in _classes(state, trt).items():
        setattr(trt, name, cls)
    return trt, state
