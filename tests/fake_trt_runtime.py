"""Stand-ins for the CUDA runtime and TensorRT's runtime objects, shared by the backend and loop tests.

A simulated device memory (one byte array addressed by pointer), streams that count syncs, device
buffers on that memory, engines whose execution is a numpy function over the bound addresses, and
a CUDA layer whose stream capture records operations and whose graph launch replays them. They
check our logic (bindings, uploads, row copies, carries, capture/replay/invalidation, syncs), not
TensorRT or CUDA themselves. Imported by tests as ``fake_trt_runtime`` (tests/ is on sys.path).
"""

from __future__ import annotations

import hashlib
import sys
import types

import numpy as np

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.trt import TensorInfo
from manifest_helpers import complete_manifest
from kandinsky_trt.runtime.contract.manifest import Manifest

H100 = cuda.DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0")
TRT_VERSION = "11.4.0.106"


class FakeMemory:
    """Device memory by pointer: one byte array, bump allocation, frees recorded."""

    BASE = 0x10000

    def __init__(self, size: int = 1 << 16) -> None:
        self.bytes = np.zeros(size, np.uint8)
        self.top = 0
        self.freed: list[int] = []

    def alloc(self, nbytes: int) -> int:
        ptr = self.BASE + self.top
        self.top += -(-nbytes // 256) * 256  # 256-byte aligned, like cudaMalloc
        assert self.top <= self.bytes.size
        return ptr

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        offset = ptr - self.BASE
        return self.bytes[offset:offset + nbytes]


class FakeStream:
    def __init__(self) -> None:
        self.handle, self.syncs, self.closed = object(), 0, False

    @property
    def ptr(self) -> int:
        return 7

    def synchronize(self) -> None:
        self.syncs += 1

    def close(self) -> None:
        self.closed, self.handle = True, None


def fake_buffer_class(memory: FakeMemory):
    """A ``cuda.DeviceBuffer`` stand-in on ``memory`` (copies are immediate)."""

    class FakeDeviceBuffer:
        def __init__(self, nbytes: int) -> None:
            self.nbytes, self.ptr = nbytes, memory.alloc(nbytes)

        def copy_from_host(self, array, stream=None):
            memory.view(self.ptr, array.nbytes)[:] = np.frombuffer(np.ascontiguousarray(array).tobytes(), np.uint8)

        def copy_to_host(self, out, stream=None):
            out.view(np.uint8).reshape(-1)[:] = memory.view(self.ptr, out.nbytes)
            return out

        def close(self):
            if self.ptr:
                memory.freed.append(self.ptr)
                self.ptr = 0

    return FakeDeviceBuffer


class FakeCuda:
    """Stream capture records operations instead of running them; a graph launch replays them."""

    def __init__(self, memory: FakeMemory) -> None:
        self.memory, self.capturing, self.recorded = memory, False, []
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.next_id = 0

    def _submit(self, op) -> None:
        if self.capturing:
            self.recorded.append(op)
        else:
            op()

    def memcpy_d2d(self, dst, src, nbytes, stream):
        self._submit(lambda: self.memory.view(dst, nbytes).__setitem__(slice(None), self.memory.view(src, nbytes)))

    def kernel(self, fn):
        self._submit(fn)

    def begin_capture(self, stream):
        assert not self.capturing
        self.capturing, self.recorded = True, []

    def end_capture(self, stream):
        self.capturing, self.next_id = False, self.next_id + 1
        self.graphs[self.next_id] = self.recorded
        return self.next_id

    def instantiate(self, graph):
        self.next_id += 1
        self.execs[self.next_id] = list(self.graphs[graph])
        return self.next_id

    def launch(self, graph_exec, stream):
        for op in self.execs[graph_exec]:
            op()

    def destroy_graph(self, graph):
        del self.graphs[graph]

    def destroy_graph_exec(self, graph_exec):
        del self.execs[graph_exec]


class FakeEngine:
    """An engine with named I/O whose execution is a numpy function over simulated device memory.

    With ``cuda`` (a :class:`FakeCuda`), executions are kernels of that layer: recorded while a
    stream is captured, replayed by a graph launch with the addresses and arena they had then.
    ``contexts`` is each execution context created, in order.
    """

    def __init__(self, tensors: list[TensorInfo], fn, device_memory: int, memory: FakeMemory,
                 cuda_layer: FakeCuda | None = None) -> None:
        self.tensors, self.fn, self.device_memory_size_v2 = {t.name: t for t in tensors}, fn, device_memory
        self.memory, self.cuda, self.contexts = memory, cuda_layer, []

    num_io_tensors = property(lambda self: len(self.tensors))

    def get_tensor_name(self, i):
        return list(self.tensors)[i]

    def get_tensor_mode(self, name):
        return types.SimpleNamespace(name=self.tensors[name].mode.upper())

    def get_tensor_dtype(self, name):
        return self.tensors[name].dtype

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


def fake_tensorrt(make_engine, deserialized: list | None = None) -> types.ModuleType:
    """A ``tensorrt`` module whose Runtime turns a plan ``b"plan:<name>"`` into ``make_engine(name)``."""

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            name = bytes(data).decode().split(":", 1)[1]
            if deserialized is not None:
                deserialized.append(name)
            return make_engine(name)

    module = types.ModuleType("tensorrt")
    module.__version__, module.ILogger, module.Runtime = TRT_VERSION, type("ILogger", (), {}), Runtime
    module.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    module.nptype = lambda dtype: np.dtype(dtype).type
    return module


def install(monkeypatch, module: types.ModuleType, memory: FakeMemory) -> None:
    """Make ``tensorrt`` and the runtime's CUDA wrapper (device, streams, buffers) the stand-ins."""
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    monkeypatch.setattr(cuda, "device_info", lambda device=None: H100)
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "DeviceBuffer", fake_buffer_class(memory))


def write_plan_artifacts(directory, networks: dict, arena: dict, version: str = TRT_VERSION,
                         geometry: tuple[dict, dict] | None = None) -> Manifest:
    """A manifest of built plans ``b"plan:<name>"``; ``networks`` maps name -> (inputs, outputs) dicts.

    ``geometry`` is (profile, model_dims); default a 64x64 batch-1 profile of a tiny model.
    """
    profile, dims = geometry or ({"batch": 1, "height": 64, "width": 64, "cfg": True},
                                 {"clip_dim": 8, "text_dim": 8, "image_size": 8, "text_len": 4, "latent_scale": 8})
    entries = []
    for name, (inputs, outputs) in networks.items():
        plan = f"plan:{name}".encode()
        (directory / f"{name}.plan").write_bytes(plan)
        entries.append({
            "name": name, "onnx": f"{name}.onnx", "onnx_sha256": "c" * 64, "external_data": [], "precision": "fp32",
            "fp32_islands": [], "inputs": inputs, "outputs": outputs,
            "engine": {"file": f"{name}.plan", "sha256": hashlib.sha256(plan).hexdigest(), "tensorrt_version": version,
                       "gpu_name": H100.name, "compute_capability": "9.0", "onnx_sha256": "c" * 64,
                       "device_memory_bytes": arena[name]},
        })
    manifest = Manifest.from_dict(complete_manifest({
        "producer": {}, "precision": "fp32", "profile": profile, "model_dims": dims,
        "checkpoints": {}, "networks": entries, "constants": [], "schedulers": {}, "tokenizers": {},
        "image_processor": {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3},
    }, directory), directory)
    manifest.save()
    return manifest
