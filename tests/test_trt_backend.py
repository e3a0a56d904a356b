"""The TensorRT backend and the CUDA-graph loop.

CPU tests (always run): the engine-vs-manifest diff on plain :class:`EngineInfo` data; the backend's
load / bind / enqueue / run / shared-arena logic against a stand-in ``tensorrt`` module and a
simulated CUDA memory; :class:`CapturedLoop` (warm-up, capture, replay, invalidation) against a
simulated CUDA layer whose stream capture records operations and whose graph launch replays them.
These check our logic, not TensorRT or CUDA themselves.

``gpu`` / ``tensorrt`` tests run the real thing and skip where cuda-python, a GPU or TensorRT is
missing (they were not executed where this file was written: no GPU, no TensorRT there).
"""

from __future__ import annotations

import logging
import sys
import types

import numpy as np
import pytest
from fake_trt_runtime import (  # tests/ is on sys.path under pytest
    H100, TRT_VERSION, FakeCuda, FakeEngine, FakeMemory, FakeStream, fake_tensorrt, install, write_plan_artifacts)

from kandinsky_trt.runtime import cuda
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.trt import (
    EngineInfo,
    EngineMismatchError,
    TensorInfo,
    TensorRTUnavailableError,
    TrtBackend,
    check_engine_against_manifest,
    import_tensorrt,
)
from kandinsky_trt.runtime.cuda_graphs import CapturedLoop, LoopConfig, RowCopy, StepChain
from kandinsky_trt.runtime.manifest import Manifest, NetworkEntry, load_manifest
from kandinsky_trt.runtime.spec import ResolvedTensor


def _unet_entry(engine: dict | None = None) -> NetworkEntry:
    return NetworkEntry(
        name="unet", onnx="unet.onnx", onnx_sha256="a" * 64, precision="fp16",
        inputs=(ResolvedTensor("sample", "float32", (2, 4, 64, 64)), ResolvedTensor("timestep", "float32", (1,))),
        outputs=(ResolvedTensor("noise_pred", "float32", (2, 8, 64, 64)),),
        engine=engine if engine is not None else {
            "file": "unet.plan", "sha256": "b" * 64, "tensorrt_version": TRT_VERSION,
            "gpu_name": H100.name, "compute_capability": "9.0", "onnx_sha256": "a" * 64, "device_memory_bytes": 0,
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
    from kandinsky_trt.runtime.backends.trt import make_trt_logger

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
    """Installs a stand-in ``tensorrt`` and CUDA layer; returns (module, memory, deserialized names)."""
    memory = FakeMemory()
    deserialized: list[str] = []
    module = fake_tensorrt(lambda name: FakeEngine(_toy_tensors(name), TOY_FUNCTIONS[name], TOY_ARENA[name], memory),
                           deserialized)
    install(monkeypatch, module, memory)
    return module, memory, deserialized


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
    _, memory, _ = fake_trt
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
    _, memory, _ = fake_trt
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
    _, _, deserialized = fake_trt
    _write_toy_artifacts(tmp_path, version="10.8.0.43")
    with TrtBackend(tmp_path) as backend, pytest.raises(EngineMismatchError) as caught:
        backend.load("toy")
    assert caught.value.differences == ("toy: tensorrt_version expected 10.8.0.43 (the plan's), "
                                        f"found {TRT_VERSION} (installed)",)
    assert deserialized == []


def test_engine_io_is_checked_on_load(fake_trt, tmp_path):
    manifest = _write_toy_artifacts(tmp_path)
    data = manifest.to_dict()
    data["networks"][0]["inputs"][0]["shape"] = [4, 3]
    Manifest.from_dict(data, tmp_path).save()
    with TrtBackend(tmp_path) as backend, pytest.raises(EngineMismatchError) as caught:
        backend.load("toy")
    assert caught.value.differences == ("toy.x: shape expected [4,3], found [2,3]",)


def test_backend_without_tensorrt(monkeypatch, tmp_path):
    _write_toy_artifacts(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(TensorRTUnavailableError, match="pip install"):
        TrtBackend(load_manifest(tmp_path))


# -- CapturedLoop against a simulated CUDA layer ------------------------------------------------------


class Buf:
    def __init__(self, memory: FakeMemory, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.memory, self.nbytes, self.ptr = memory, array.nbytes, memory.alloc(array.nbytes)
        self.shape = array.shape
        memory.view(self.ptr, self.nbytes)[:] = np.frombuffer(array.tobytes(), np.uint8)

    def array(self) -> np.ndarray:
        return self.memory.view(self.ptr, self.nbytes).view(np.float32).reshape(self.shape)


STEPS = 6


class _Arena:
    """Stands in for the backend: its ``generation`` changes when its arena moves."""

    generation = 0


def _toy_loop(enabled: bool, move_at: int | None = None):
    """A denoising-shaped loop: x_next = x * c[0] + c[1] + noise, carried back into x; per-step rows."""
    memory = FakeMemory()
    fake = FakeCuda(memory)
    rng = np.random.default_rng(3)
    coefficients, noise, x0 = (rng.standard_normal(s).astype(np.float32) for s in ((STEPS, 2), (STEPS, 4), (4,)))
    bufs = {"x": Buf(memory, x0), "c": Buf(memory, np.zeros(2)), "noise": Buf(memory, np.zeros(4)),
            "x_next": Buf(memory, np.zeros(4))}
    arena, workspace = _Arena(), [Buf(memory, np.zeros(1))]  # what the network's kernel reads besides its I/O
    stream = FakeStream()

    def network(stream_):
        b, scratch = dict(bufs), workspace[0]  # read at enqueue time, like TensorRT addresses

        def run():
            assert scratch.ptr not in memory.freed, "kernel uses freed device memory"
            b["x_next"].array()[:] = b["x"].array() * b["c"].array()[0] + b["c"].array()[1] + b["noise"].array()
        fake.kernel(run)

    rows = (RowCopy(Buf(memory, coefficients), bufs["c"]), RowCopy(Buf(memory, noise), bufs["noise"]))
    config = LoopConfig(StepChain((network,), carries=((bufs["x_next"], bufs["x"]),), cuda=fake), rows,
                        watch=(arena,), enabled=enabled)
    loop = CapturedLoop(config, stream, cuda=fake)
    for step in range(STEPS):
        if step == move_at:  # the arena moves: a replay of the old graph would read freed memory
            memory.freed.append(workspace[0].ptr)
            workspace[0] = Buf(memory, np.zeros(1))
            arena.generation += 1
        loop.step(step)
    expected = x0.copy()
    for step in range(STEPS):
        expected = expected * coefficients[step, 0] + coefficients[step, 1] + noise[step]
    return loop, fake, stream, bufs["x"].array().copy(), expected


def test_graph_replay_equals_eager_and_numpy():
    graph_loop, fake, stream, graph_x, expected = _toy_loop(enabled=True)
    eager_loop, _, _, eager_x, _ = _toy_loop(enabled=False)
    np.testing.assert_allclose(graph_x, expected, rtol=1e-6)
    np.testing.assert_array_equal(graph_x, eager_x)  # same float32 operations in the same order
    assert (graph_loop.eager_runs, graph_loop.captures, graph_loop.launches) == (1, 1, STEPS - 1)
    assert (eager_loop.eager_runs, eager_loop.captures, eager_loop.launches) == (STEPS, 0, 0)
    assert stream.syncs == 0  # no host sync inside the loop
    assert len(fake.execs) == 1 and not fake.graphs  # the source graph is freed after instantiation
    graph_loop.close()
    assert not fake.execs
    with pytest.raises(RuntimeError, match="closed"):
        graph_loop.step(0)


def test_a_moved_arena_invalidates_and_recaptures():
    loop, fake, _, x, expected = _toy_loop(enabled=True, move_at=3)
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    # steps 0 eager, 1 capture+launch, 2 launch, 3 eager after the move, 4 re-capture+launch, 5 launch
    assert (loop.eager_runs, loop.captures, loop.launches) == (2, 2, 4)
    assert len(fake.execs) == 1  # the stale graph was destroyed


def test_failed_capture_ends_the_capture_and_raises():
    fake, calls = FakeCuda(FakeMemory()), []

    def enqueue(stream):
        calls.append(fake.capturing)
        if fake.capturing:
            raise BackendError("enqueue failed during capture")

    loop = CapturedLoop(LoopConfig(enqueue), FakeStream(), cuda=fake)
    loop.step(0)
    with pytest.raises(BackendError, match="during capture"):
        loop.step(1)
    assert calls == [False, True] and not fake.capturing and not fake.graphs and not fake.execs


def test_row_copy_validation():
    memory = FakeMemory()
    target = Buf(memory, np.zeros(2))
    with pytest.raises(ValueError, match="whole number of 8-byte rows"):
        RowCopy(Buf(memory, np.zeros(3)), target)
    row = RowCopy(Buf(memory, np.zeros((2, 2))), target)
    with pytest.raises(IndexError, match=r"0 <= step < 2"):
        row.enqueue(2, FakeStream(), FakeCuda(memory))
    with pytest.raises(ValueError, match="equal sizes"):
        StepChain((), carries=((target, Buf(memory, np.zeros(3))),))


# -- real CUDA / TensorRT (skipped where unavailable) ------------------------------------------------


def _require_cuda():
    if not cuda.cuda_available():
        pytest.skip("needs cuda-python and a CUDA GPU")


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_with_copies():
    """Real capture/instantiate/launch over D2D copies only (no kernels needed)."""
    _require_cuda()
    table = np.arange(STEPS * 4, dtype=np.float32).reshape(STEPS, 4)
    results = {}
    for enabled in (True, False):
        with cuda.Stream() as stream:
            buffers = [cuda.DeviceBuffer.from_numpy(np.zeros(4, np.float32)) for _ in range(3)]
            rows_table = cuda.DeviceBuffer.from_numpy(table)
            target, middle, out = buffers
            chain = StepChain((lambda s: middle.copy_from(target, s),), carries=((middle, out),))
            with CapturedLoop(LoopConfig(chain, (RowCopy(rows_table, target),), enabled=enabled), stream) as loop:
                loop.run(STEPS)
                stream.synchronize()
                results[enabled] = out.to_numpy((4,), np.float32)
                assert loop.captures == (1 if enabled else 0)
            for b in (*buffers, rows_table):
                b.close()
    np.testing.assert_array_equal(results[True], table[-1])
    np.testing.assert_array_equal(results[False], table[-1])
