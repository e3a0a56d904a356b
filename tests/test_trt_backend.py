"""The TensorRT backend.

CPU tests (always run): the engine-vs-manifest diff on plain :class:`EngineInfo` data; the backend's
load / bind / enqueue / run / shared-arena logic against a stand-in ``tensorrt`` module and a
simulated CUDA memory (``tests/fakes/``). These check our logic, not TensorRT or CUDA
themselves. The CUDA-graph loop's tests are in ``test_cuda_graphs.py``.

``gpu`` / ``tensorrt`` tests run the real thing and skip where cuda-python, a GPU or TensorRT is
missing (they were not executed where this file was written: no GPU, no TensorRT there).
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
from fakes.cuda import H100, FakeMemory  # tests/ is on sys.path under pytest
from fakes.plan_artifacts import write_plan_artifacts
from fakes.tensorrt import TRT_VERSION, FakeEngine, install

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.trt import TrtBackend
from kandinsky_trt.runtime.backends.trt_engine import (EngineInfo, EngineMismatchError, TensorInfo,
                                                       TensorRTUnavailableError, check_engine_against_manifest,
                                                       import_tensorrt)
from kandinsky_trt.runtime.contract.manifest import Manifest, NetworkEntry, load_manifest
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork, ResolvedTensor


def _unet_entry(engine: dict | None = None) -> NetworkEntry:
    inputs = (ResolvedTensor("sample", "float32", (2, 4, 64, 64)), ResolvedTensor("timestep", "float32", (1,)))
    outputs = (ResolvedTensor("noise_pred", "float32", (2, 8, 64, 64)),)
    return NetworkEntry(
        name="unet", onnx="unet.onnx", onnx_sha256="a" * 64, precision="fp16", inputs=inputs, outputs=outputs,
        profiles=(ResolvedNetwork("unet", inputs, outputs),),
        engine=engine if engine is not None else {
            "file": "unet.plan", "sha256": "b" * 64, "tensorrt_version": TRT_VERSION, "gpu_name": H100.name,
            "compute_capability": "9.0", "onnx_sha256": "a" * 64, "device_memory_bytes": 0, "profiles": [0],
        },
    )


def _matching_info(**overrides) -> EngineInfo:
    tensors = {
        "sample": TensorInfo("sample", "input", "float32", (2, 4, 64, 64)),
        "timestep": TensorInfo("timestep", "input", "float32", (1,)),
        "noise_pred": TensorInfo("noise_pred", "output", "float32", (2, 8, 64, 64)),
    }
    tensors.update(overrides)
    return EngineInfo(tuple(t for t in tensors.values() if t is not None), TRT_VERSION, 1 << 20)


def _differences(info: EngineInfo, entry: NetworkEntry | None = None, device=H100) -> list[str]:
    with pytest.raises(EngineMismatchError) as caught:
        check_engine_against_manifest(info, entry or _unet_entry(), device)
    assert str(caught.value).count("\n  ") == len(caught.value.differences)  # every line is in the message
    return list(caught.value.differences)


# -- check_engine_against_manifest on plain data ------------------------------------------------------


def test_matching_engine_passes():
    assert check_engine_against_manifest(_matching_info(), _unet_entry(), H100) is None


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (TensorInfo("sample", "input", "float32", (2, 4, 96, 96)),
         "unet.sample: shape expected [2,4,64,64], found [2,4,96,96]"),
        (TensorInfo("sample", "input", "float16", (2, 4, 64, 64)),
         "unet.sample: dtype expected float32, found float16"),
        (TensorInfo("timestep", "output", "float32", (1,)),
         "unet.timestep: mode expected input, found output"),
    ],
)
def test_each_tensor_mismatch_is_one_line(override, line):
    assert _differences(_matching_info(**{override.name: override})) == [line]


def test_missing_and_unexpected_tensors_are_named():
    info = _matching_info(timestep=None, extra=TensorInfo("extra", "output", "float32", (1,)))
    assert _differences(info) == [
        "unet.timestep: expected input float32[1], found no such tensor in the engine",
        "unet.extra: expected no such tensor (not in the manifest), found output float32[1]",
    ]


def test_platform_mismatches():
    info = EngineInfo(_matching_info().tensors, "10.8.0.43")
    l4 = cuda.DeviceInfo(0, "NVIDIA L4", "8.9")
    assert _differences(info, device=l4) == [
        "unet: tensorrt_version expected 11.4.0.106 (the plan's), found 10.8.0.43 (installed)",
        "unet: compute_capability expected 9.0 (NVIDIA H100 80GB HBM3), found 8.9 (NVIDIA L4)",
    ]


def test_several_mismatches_are_all_listed():
    info = EngineInfo(
        (TensorInfo("sample", "input", "float16", (2, 4, 96, 96)), TensorInfo("noise_pred", "output", "float32", (1,))),
        "10.8.0.43",
    )
    lines = _differences(info)
    assert lines == [
        "unet: tensorrt_version expected 11.4.0.106 (the plan's), found 10.8.0.43 (installed)",
        "unet.sample: dtype expected float32, found float16",
        "unet.sample: shape expected [2,4,64,64], found [2,4,96,96]",
        "unet.timestep: expected input float32[1], found no such tensor in the engine",
        "unet.noise_pred: shape expected [2,8,64,64], found [1]",
    ]


def test_unbuilt_entry_is_reported():
    assert _differences(_matching_info(), _unet_entry(engine={})) == [
        "unet: engine expected an entry in the manifest, found none (not built)"
    ]


def test_tensorrt_unavailable_has_install_advice(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` fail even where installed
    with pytest.raises(TensorRTUnavailableError) as caught:
        import_tensorrt()
    message = str(caught.value)
    assert "pip install" in message and "GPU" in message and "--backend ort" in message
    assert isinstance(caught.value, ImportError)


def test_trt_logger_forwards_to_logging_and_keeps_errors(caplog):
    from kandinsky_trt.runtime.backends.trt_engine import make_trt_logger

    trt = types.SimpleNamespace(ILogger=type("ILogger", (), {}))
    sink = logging.getLogger("test.trt")
    logger = make_trt_logger(trt, sink)
    with caplog.at_level(logging.DEBUG, logger="test.trt"):
        for severity, msg in (("WARNING", "slow tactic"), ("ERROR", "out of memory"), ("VERBOSE", "noise")):
            logger.log(types.SimpleNamespace(name=severity), msg)
        logger.log(None, "no severity")  # unknown severities are logged at INFO, never raised
        sink.isEnabledFor = None  # a broken sink must not raise back into TensorRT either
        logger.log(types.SimpleNamespace(name="ERROR"), "still kept")
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "TensorRT: slow tactic"), (logging.ERROR, "TensorRT: out of memory"),
        (logging.INFO, "TensorRT: no severity"),
    ]  # VERBOSE maps below DEBUG and is dropped here
    assert logger.errors == ["out of memory", "still kept"]
    del sink.isEnabledFor


# -- the backend against a stand-in tensorrt module and simulated CUDA memory -------------------------


def _toy_tensors(name: str) -> list[TensorInfo]:
    if name == "toy":
        return [TensorInfo("x", "input", "float32", (2, 3)), TensorInfo("y", "input", "float32", (2, 3)),
                TensorInfo("z", "output", "float32", (2, 3))]
    return [TensorInfo("z", "input", "float32", (2, 3)), TensorInfo("w", "output", "float32", (2, 3))]


TOY_FUNCTIONS = {"toy": lambda x, y: {"z": x * y + x}, "toy2": lambda z: {"w": 2 * z}}
TOY_ARENA = {"toy": 1000, "toy2": 5000}


def _write_toy_artifacts(directory, version=TRT_VERSION) -> Manifest:
    networks = {}
    for name in ("toy", "toy2"):
        io = [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in _toy_tensors(name)]
        networks[name] = (io[:-1], io[-1:])
    return write_plan_artifacts(directory, networks, TOY_ARENA, version)


@pytest.fixture()
def fake_trt(monkeypatch):
    """Installs the stand-in ``tensorrt`` and CUDA layer; returns (state, memory)."""
    memory = FakeMemory()
    state = install(monkeypatch, lambda name: FakeEngine(_toy_tensors(name), TOY_FUNCTIONS[name], TOY_ARENA[name],
                                                         memory), memory)
    return state, memory


def _feeds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {n: rng.standard_normal((2, 3)).astype(np.float32) for n in ("x", "y")}


def test_backend_runs_a_network_from_host_arrays(fake_trt, tmp_path):
    _write_toy_artifacts(tmp_path)
    with TrtBackend(tmp_path) as backend:
        toy = backend.load("toy")
        feeds, syncs = _feeds(), backend.stream.syncs
        out = toy.run(feeds)
        np.testing.assert_array_equal(out["z"], feeds["x"] * feeds["y"] + feeds["x"])
        assert backend.stream.syncs == syncs + 1  # one sync per run() call
        assert backend.load("toy") is toy


def test_networks_share_one_arena_sized_to_the_largest(fake_trt, tmp_path):
    _, memory = fake_trt
    _write_toy_artifacts(tmp_path)
    backend = TrtBackend(tmp_path)
    toy = backend.load("toy")
    first_arena = toy._context.device_memory
    assert first_arena[1] == TOY_ARENA["toy"] and backend.generation == 1
    toy2 = backend.load("toy2")  # needs more: the arena moves and every context follows
    assert backend.generation == 2 and first_arena[0] in memory.freed
    assert toy._context.device_memory == toy2._context.device_memory
    assert toy2._context.device_memory[1] == TOY_ARENA["toy2"]
    backend.close()
    assert toy.closed and toy2.closed and toy2._context is None
    assert toy2._context is None and backend.stream.closed
    backend.close()  # idempotent


def test_bind_and_enqueue_at_device_level(fake_trt, tmp_path):
    _, memory = fake_trt
    _write_toy_artifacts(tmp_path)
    with TrtBackend(tmp_path) as backend:
        toy = backend.load("toy")
        buffers = {t.name: backend.allocate(t) for t in toy.network.inputs + toy.network.outputs}
        assert [b.nbytes for b in buffers.values()] == [24, 24, 24]  # ResolvedTensor.nbytes: 2*3 float32
        with pytest.raises(BackendError, match=r"buffers expected \['x', 'y', 'z'\], found \['x', 'y'\]"):
            backend.bind("toy", {"x": buffers["x"], "y": buffers["y"]})
        with pytest.raises(BackendError, match=r"toy.z: buffer expected >= 24 bytes"):
            backend.bind("toy", {"x": buffers["x"], "y": buffers["y"], "z": cuda.DeviceBuffer(8)})
        binding = backend.bind("toy", buffers)
        context = binding._context
        assert context is not toy._context and context.device_memory == toy._context.device_memory  # one arena
        feeds, syncs = _feeds(1), backend.stream.syncs
        for name, array in feeds.items():
            buffers[name].copy_from_host(array)
        binding.enqueue()
        np.testing.assert_array_equal(buffers["z"].copy_to_host(np.empty((2, 3), np.float32)),
                                      feeds["x"] * feeds["y"] + feeds["x"])
        assert backend.stream.syncs == syncs  # enqueue never synchronizes
        addresses = dict(context.addresses)
        other = _feeds(2)
        np.testing.assert_array_equal(toy.run(other)["z"], other["x"] * other["y"] + other["x"])
        assert context.addresses == addresses  # host-level run has a context of its own: the binding is untouched
        np.testing.assert_array_equal(buffers["z"].copy_to_host(np.empty((2, 3), np.float32)),
                                      feeds["x"] * feeds["y"] + feeds["x"])
        backend.load("toy2")  # a larger arena: every context follows it, the binding's too
        assert context.device_memory == toy._context.device_memory and context.device_memory[1] == TOY_ARENA["toy2"]
        binding.close()
        with pytest.raises(BackendError, match="toy: expected an open binding, found it closed"):
            binding.enqueue()


def test_tampered_plan_is_refused(fake_trt, tmp_path):
    _write_toy_artifacts(tmp_path)
    (tmp_path / "toy.plan").write_bytes(b"plan:toy2")
    with TrtBackend(tmp_path) as backend, pytest.raises(EngineMismatchError, match="toy: plan sha256 expected"):
        backend.load("toy")


def test_plan_from_another_tensorrt_is_refused_before_deserializing(fake_trt, tmp_path):
    state, _ = fake_trt
    _write_toy_artifacts(tmp_path, version="10.8.0.43")
    with TrtBackend(tmp_path) as backend, pytest.raises(EngineMismatchError) as caught:
        backend.load("toy")
    assert caught.value.differences == ("toy: tensorrt_version expected 10.8.0.43 (the plan's), "
                                        f"found {TRT_VERSION} (installed)",)
    assert state.deserialized == []


def test_engine_io_is_checked_on_load(fake_trt, tmp_path):
    manifest = _write_toy_artifacts(tmp_path)
    data = manifest.to_dict()
    for io in (data["networks"][0], data["networks"][0]["profiles"][0]):  # the graph's and the profile's
        io["inputs"][0]["shape"] = [4, 3]
    Manifest.from_dict(data, tmp_path).save()
    with TrtBackend(tmp_path) as backend, pytest.raises(EngineMismatchError) as caught:
        backend.load("toy")
    assert caught.value.differences == ("toy.x: shape expected [4,3], found [2,3]",)


def test_backend_without_tensorrt(monkeypatch, tmp_path):
    _write_toy_artifacts(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError, match="pip install"):
        TrtBackend(load_manifest(tmp_path))
