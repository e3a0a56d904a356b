"""The device storage of the loop of slots on ONNX Runtime (``runtime/loops/device.py``, ``runtime/backends/ort_cuda.py``).

CPU tests (always run): ``OrtCudaBackend(manifest, "cpu")`` runs the device path — buffers bound
once, ``write_rows`` into row offsets, ping-pong step bindings, the runners — on the CPU execution
provider, and must equal the host storage (``SlotLoop(spec, HostStorage(...))``) bit for bit on
the tiny fp32 artifacts: chunked calls (prior + UnCLIP, UNet + DDPM learned-range with noise rows,
UNet + DPM-Solver++ 2M, which reads the x0 history), callbacks, and rows admitted at different steps
into one batch (the schedule of ``tests/test_slots.py``). Graph-id, run-option and binding logic
against stand-in ORT objects.

``gpu`` tests (CUDA graph replay == eager) need a CUDA device and onnxruntime-gpu's
CUDAExecutionProvider (``needs_cuda_ep``); they were not executed where this file was written (no GPU there).
"""

from __future__ import annotations

import numpy as np
import pytest
from test_slots import _mixed, _rows

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.ort import OrtBackend
from kandinsky_trt.runtime.backends.ort_cuda import (
    LOOP_NETWORKS, CudaGraphOptions, DeviceSession, OrtCudaBackend, cuda_available, provider_config, upload)
from kandinsky_trt.runtime.backends.registry import make_backend
from kandinsky_trt.runtime.contract.dtypes import DTYPE_TABLE
from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, LoopSpec
from kandinsky_trt.runtime.contract.loop_specs import PRIOR_LOOP as PRIOR
from kandinsky_trt.runtime.contract.loop_specs import UNET_LOOP as UNET
from kandinsky_trt.runtime.contract.schedulers import scheduler_table
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork, ResolvedTensor
from kandinsky_trt.runtime.loops.device import DeviceStorage, row_runs
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.host import HostStorage
from kandinsky_trt.runtime.loops.slots import SlotLoop
from kandinsky_trt.runtime.loops.template import LoopInputs, chunk_rows

DDPM_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
               "beta_start": 0.00085, "beta_end": 0.012, "variance_type": "learned_range", "clip_sample": True,
               "clip_sample_range": 2.0, "prediction_type": "epsilon"}
needs_cuda_ep = pytest.mark.skipif(not cuda_available(), reason="onnxruntime has no CUDAExecutionProvider "
                                   "(pip install onnxruntime-gpu)")


@pytest.fixture(scope="module")
def components(artifacts_fp32):
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(artifacts_fp32[0], backend="ort", device="cpu") as c:
        yield c


@pytest.fixture(scope="module")
def device(components):
    """The device backend on the CPU EP: its own sessions, bound buffers in host memory."""
    with OrtCudaBackend(components.manifest, "cpu") as backend:
        yield backend


def _host_loop(backend, spec: LoopSpec, profile: int = 0) -> SlotLoop:
    """The reference: the loop of slots on host arrays."""
    return SlotLoop(spec, HostStorage(spec, backend.load(spec.network, profile), backend.load(spec.step, profile)))


def _inputs(c, names: LoopSpec, table, seed: int, guidance: float = 4.0) -> LoopInputs:
    """Random inputs of the spec's shapes: N(0,1) floats, text masks of mixed lengths."""
    rng = np.random.default_rng(seed)
    network = c.manifest.network(names.network).resolved()
    conditioning = {}
    for t in network.inputs:
        if t.name in (names.sample_input, "timestep"):
            continue
        if t.dtype == "bool":
            conditioning[t.name] = np.arange(t.shape[1])[None, :] < rng.integers(2, t.shape[1], (t.shape[0], 1))
        else:
            conditioning[t.name] = rng.standard_normal(t.shape).astype(np.float32)
    latents = rng.standard_normal(c.manifest.network(names.step).resolved().tensor("latents").shape).astype(np.float32)
    stochastic = int(table.stochastic.sum())
    noise = rng.standard_normal((stochastic, *latents.shape)).astype(np.float32) if stochastic else None
    return LoopInputs(latents, conditioning, {}, noise, guidance_scale=guidance)


def _run(loop: SlotLoop, table, inputs) -> tuple[np.ndarray, list]:
    seen = []
    out = loop.run(chunk_rows(inputs, table), lambda i, t, x: seen.append((i, t, x.copy())))
    return out, seen


def _compare(c, device, names: LoopSpec, table, seeds=(0,), guidance: float = 4.0) -> None:
    """Device storage == host storage, bit for bit: final latents and every callback's latents."""
    with make_loop(device, names) as loop, _host_loop(c.backend, names) as host:
        assert isinstance(loop.storage, DeviceStorage)
        for seed in seeds:
            inputs = _inputs(c, names, table, seed, guidance)
            (found, seen_device), (expected, seen_host) = _run(loop, table, inputs), _run(host, table, inputs)
            assert found.dtype == np.float32 and found.tobytes() == expected.tobytes()
            assert [s[:2] for s in seen_device] == [s[:2] for s in seen_host]
            for a, b in zip(seen_device, seen_host):
                assert a[2].tobytes() == b[2].tobytes()


def test_prior_loop_equals_the_host_storage(components, device):
    table = components.loaded.scheduler("prior", 4)  # UnCLIP: stochastic except the last row
    assert table.stochastic.any() and not table.stochastic.all()
    _compare(components, device, PRIOR, table, seeds=(0, 1))
    _compare(components, device, PRIOR, table, guidance=1.0)  # unguided: the cond rows in both halves


def test_unet_ddpm_loop_with_noise_equals_the_host_storage(components, device):
    table = scheduler_table(DDPM_CONFIG, 4)  # learned-range variance; the t=0 row is deterministic
    assert table.stochastic.any() and not table.stochastic[-1]
    _compare(components, device, UNET, table, seeds=(0, 1))


def test_unet_dpmpp_history_ping_pong_equals_the_host_storage(components, device):
    table = components.loaded.scheduler("decoder", 5, "dpmpp2m")  # odd count: ends on the other state side
    assert np.any(table.coefficients[:, list(table.to_manifest()["columns"]).index("r")] != 0)  # reads x0_prev
    _compare(components, device, UNET, table)


def test_single_step_and_ddim(components, device):
    _compare(components, device, UNET, components.loaded.scheduler("decoder", 1))
    _compare(components, device, UNET, components.loaded.scheduler("decoder", 2))


def test_buffers_bound_once_linked_and_ping_ponged(components, device):
    with make_loop(device, UNET) as loop:
        storage = loop.storage
        sample, (network, a, b) = storage.network_buffers["sample"], (x.buffers for x in storage.bindings)
        assert a["model_input"] is sample and b["model_input"] is sample
        assert a["model_output"] is storage.network_buffers["noise_pred"] is b["model_output"]
        latents, x0 = storage.state["latents"], storage.state["x0_prev"]
        assert (a["latents"], a["latents_next"], a["x0_prev"], a["x0"]) == (latents[0], latents[1], x0[0], x0[1])
        assert (b["latents"], b["latents_next"], b["x0_prev"], b["x0"]) == (latents[1], latents[0], x0[1], x0[0])
        buffers = [*storage.network_buffers.values(), *storage.step_buffers.values(), *latents, *x0]
        pointers, bindings = [v.data_ptr() for v in buffers], storage.bindings
        table = components.loaded.scheduler("decoder", 3)
        for seed in (3, 4):
            loop.run(chunk_rows(_inputs(components, UNET, table, seed), table))
        assert [v.data_ptr() for v in buffers] == pointers and storage.bindings is bindings  # never rebound
        assert [r.graph_ids for r in storage.runners] == [(None, None), (None, None)]  # CPU EP: no graphs
        # The step graph wrote the next network input straight into the network's sample buffer.
        last = storage.read_latents()
        np.testing.assert_array_equal(sample.numpy(), np.concatenate([last, last]))


@pytest.fixture(scope="module")
def multi(artifacts_fp32_multi):
    """Rows of every kind (test_slots' requests) and both storages on the 4-profile artifacts."""
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(artifacts_fp32_multi[0]) as c, OrtCudaBackend(c.manifest, "cpu") as backend:
        yield c, backend, _rows(c)


@pytest.mark.parametrize("spec", [PRIOR, UNET, INPAINT_LOOP], ids=lambda s: s.network)
def test_rows_admitted_at_different_steps_equal_the_host_storage(multi, spec):
    """test_slots' schedule (rows of different tables, guidance, tasks admitted whenever a slot
    frees) on the device storage equals the same schedule on the host storage, bit for bit."""
    c, backend, rows = multi
    profile = c.manifest.profile_index(2, (64, 64))
    with make_loop(backend, spec, profile) as loop, _host_loop(c.backend, spec, profile) as host:
        buffers = [v.data_ptr() for v in loop.storage.network_buffers.values()]
        device_rows, side_by_side = _mixed(loop, rows[spec])
        host_rows, _ = _mixed(host, rows[spec])
        assert [v.data_ptr() for v in loop.storage.network_buffers.values()] == buffers
    assert any(pa != pb or la != lb for la, pa, lb, pb in side_by_side)  # rows ran at different positions
    assert sorted(device_rows) == sorted(host_rows) == list(range(len(rows[spec])))
    for i in device_rows:
        assert device_rows[i].tobytes() == host_rows[i].tobytes(), f"{spec.network} row {i}"


def test_partial_writes_touch_only_their_rows(device):
    """``write_rows`` of part of a buffer (admission: a slot's rows) leaves the other rows as they were."""
    tensor = ResolvedTensor("x", "float32", (4, 3))
    buffer = device.allocate(tensor)
    device.write_rows(buffer, tensor, 0, np.arange(12, dtype=np.float32).reshape(4, 3))
    device.write_rows(buffer, tensor, 1, -np.ones((2, 3), np.float32))
    np.testing.assert_array_equal(device.read(buffer, tensor), [[0, 1, 2], [-1, -1, -1], [-1, -1, -1], [9, 10, 11]])
    with pytest.raises(BackendError, match=r"x: rows expected within \[0, 4\), found \[3, 5\)"):
        device.write_rows(buffer, tensor, 3, np.zeros((2, 3), np.float32))
    assert [list(r) for r in row_runs(np.array([0, 1, 3, 5, 6]))] == [[0, 1], [2], [3, 4]]


def test_bad_rows_are_refused_before_anything_runs(components, device):
    table = scheduler_table(DDPM_CONFIG, 3)
    good = chunk_rows(_inputs(components, UNET, table, 0), table)[0]
    with make_loop(device, UNET) as loop:
        with pytest.raises(BackendError, match=r"row conditioning: expected \['encoder_hidden_states'"):
            loop.admit(type(good)(good.latents, {}, table, 4.0, good.noise))
        with pytest.raises(BackendError, match=r"latents: expected float32\[4, 8, 8\], found float32\[2, 4, 8, 8\]"):
            loop.admit(type(good)(np.stack([good.latents] * 2), good.conditioning, table, 4.0, good.noise))
        with pytest.raises(BackendError, match="noise: expected 2 rows"):
            loop.admit(type(good)(good.latents, good.conditioning, table, 4.0, None))
        assert loop.free == [0]
    with pytest.raises(BackendError, match="expected an open storage, found it closed"):
        loop.storage.step()


def test_upload_checks_shape_and_dtype():
    import onnxruntime as ort

    value = ort.OrtValue.ortvalue_from_shape_and_type([2], np.float32, "cpu", 0)
    upload(value, np.array([1.5, 2.5], np.float32), "x")
    np.testing.assert_array_equal(value.numpy(), [1.5, 2.5])
    with pytest.raises(BackendError, match=r"x: expected float32\[2\], found float64\[2\]"):
        upload(value, np.zeros(2), "x")  # update_inplace alone would copy 16 bytes into 8
    with pytest.raises(BackendError, match=r"found float32\[3\]"):
        upload(value, np.zeros(3, np.float32), "x")


def test_provider_config(monkeypatch):
    import onnxruntime as ort

    assert provider_config("cpu", CudaGraphOptions()) == ["CPUExecutionProvider"]
    with pytest.raises(BackendError, match="expected 'cpu' or 'cuda'"):
        provider_config("rocm", CudaGraphOptions())
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    on = provider_config("cuda", CudaGraphOptions(device_id=1))
    off = provider_config("cuda", CudaGraphOptions(enabled=False))
    assert on[0] == ("CUDAExecutionProvider", {"device_id": "1", "enable_cuda_graph": "1"})
    assert off[0] == ("CUDAExecutionProvider", {"device_id": "0", "enable_cuda_graph": "0"})
    assert on[1] == off[1] == "CPUExecutionProvider"


def _show_cuda_ep(monkeypatch) -> None:
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])


def _hide_cuda_ep(monkeypatch) -> None:
    """ONNX Runtime as the CPU-only package has it, even where onnxruntime-gpu is installed."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_ort_on_cuda_is_the_device_backend_and_only_loop_networks_get_graphs(components, monkeypatch):
    """The registry gives ``ort`` on ``cuda`` the device backend; its loop networks are created with
    CUDA graphs and run host-level calls with ``gpu_graph_id=-1``; stage networks get neither."""
    _show_cuda_ep(monkeypatch)
    backend = make_backend("ort", components.manifest, "cuda")
    assert isinstance(backend, OrtCudaBackend) and backend.options.device == "cuda"
    assert type(make_backend("ort", components.manifest, "cpu")) is OrtBackend  # the CPU stays on host arrays
    assert LOOP_NETWORKS == {"prior", "prior_step", "unet", "unet_step", "unet_inpaint", "unet_inpaint_step"}
    for network in ("unet", "prior_step"):
        assert backend._providers(network)[0][1]["enable_cuda_graph"] == "1"
        assert backend._run_options(network).get_run_config_entry("gpu_graph_id") == "-1"
    for network in ("text_encoder", "movq_decoder"):
        assert backend._providers(network)[0][1]["enable_cuda_graph"] == "0"
        assert backend._run_options(network) is None
    eager = OrtCudaBackend(components.manifest, "cuda", CudaGraphOptions(enabled=False))
    assert eager._run_options("unet") is None and eager._providers("unet")[0][1]["enable_cuda_graph"] == "0"


def test_cuda_without_onnxruntime_gpu_fails_clearly(components, monkeypatch):
    _hide_cuda_ep(monkeypatch)
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        OrtCudaBackend(components.manifest, "cuda")
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        make_backend("ort", components.manifest, "cuda")


def test_dtype_table_matches_onnx_and_onnxruntime():
    import onnx
    import onnxruntime as ort

    for dtype in DTYPE_TABLE.values():
        assert onnx.helper.tensor_dtype_to_np_dtype(dtype.onnx) == np.dtype(dtype.name)
        assert ort.OrtValue.ortvalue_from_shape_and_type([2], np.dtype(dtype.name), "cpu", 0).data_type() == dtype.ort
        assert np.dtype(dtype.name).itemsize == dtype.itemsize
    assert ResolvedTensor("x", "float16", (2, 3)).nbytes == 12


class _FakeValue:
    """Stands in for an OrtValue on a CUDA device (shape, dtype, device only)."""

    def __init__(self, shape, dtype="tensor(float)", device="Cuda"):
        self._shape, self._dtype, self._device = list(shape), dtype, device

    def shape(self):
        return self._shape

    def data_type(self):
        return self._dtype

    def device_name(self):
        return self._device


class _FakeSession:
    def __init__(self):
        self.runs = []

    def io_binding(self):
        session = self

        class Binding:
            def __init__(self):
                self.inputs, self.outputs = {}, {}

            def bind_ortvalue_input(self, name, value):
                self.inputs[name] = value

            def bind_ortvalue_output(self, name, value):
                self.outputs[name] = value

            def synchronize_inputs(self):
                session.runs.append((self, "sync"))

        return Binding()

    def run_with_iobinding(self, binding, run_options):
        self.runs.append((binding, run_options.get_run_config_entry("gpu_graph_id")))


def _toy_network() -> ResolvedNetwork:
    return ResolvedNetwork("toy", (ResolvedTensor("x", "float32", (2, 3)),), (ResolvedTensor("y", "float32", (2, 3)),))


def test_each_binding_gets_its_own_graph_id():
    session = _FakeSession()
    device = DeviceSession("toy", session, "cuda", CudaGraphOptions())
    runs = [device.bind(_toy_network(), {"x": _FakeValue((2, 3)), "y": _FakeValue((2, 3))}) for _ in range(2)]
    wider = ResolvedNetwork("toy", (ResolvedTensor("x", "float32", (4, 3)),), (ResolvedTensor("y", "float32", (4, 3)),))
    runs.append(device.bind(wider, {"x": _FakeValue((4, 3)), "y": _FakeValue((4, 3))}))  # another profile's shapes
    assert [r.graph_id for r in runs] == [1, 2, 3]  # unique per session, whatever the profile; never 0 nor -1
    runs[1].enqueue()
    runs[1].enqueue()
    runs[1].enqueue(graph=False)  # the same binding eagerly
    assert [graph_id for _, graph_id in session.runs] == ["2", "2", "-1"]
    eager = DeviceSession("toy", _FakeSession(), "cuda", CudaGraphOptions(enabled=False))
    assert eager.bind(_toy_network(), {"x": _FakeValue((2, 3)), "y": _FakeValue((2, 3))}).graph_id is None


def test_runner_replays_each_binding_by_its_id_and_syncs_uploads_once(components):
    """The ORT runner: bindings in order under their graph ids (or -1 eagerly); one
    ``synchronize_inputs`` before a run only when something was uploaded since the last run."""
    session = _FakeSession()
    device = DeviceSession("toy", session, "cuda", CudaGraphOptions())
    a, b = (device.bind(_toy_network(), {"x": _FakeValue((2, 3)), "y": _FakeValue((2, 3))}) for _ in range(2))
    backend = OrtCudaBackend(components.manifest, "cpu")
    graphed, eager = backend.runner((a, b)), backend.runner((a, b), cuda_graph=False)
    backend.uploads_pending = True
    graphed.run()
    graphed.run()
    eager.run()
    assert [(binding is a._binding, entry) for binding, entry in session.runs] == [
        (True, "sync"), (True, "1"), (False, "2"), (True, "1"), (False, "2"), (True, "-1"), (False, "-1")]


def test_bind_rejects_wrong_buffers():
    device = DeviceSession("toy", _FakeSession(), "cuda", CudaGraphOptions())
    with pytest.raises(BackendError, match=r"buffers expected \['x', 'y'\], found \['x'\]"):
        device.bind(_toy_network(), {"x": _FakeValue((2, 3))})
    with pytest.raises(BackendError, match=r"toy.y: expected a float32\[2, 3\] buffer, found float16\[2, 3\]"):
        device.bind(_toy_network(), {"x": _FakeValue((2, 3)), "y": _FakeValue((2, 3), "tensor(float16)")})
    with pytest.raises(BackendError, match="toy.x: expected a buffer on cuda, found Cpu"):
        device.bind(_toy_network(), {"x": _FakeValue((2, 3), device="Cpu"), "y": _FakeValue((2, 3))})


def test_device_sessions_are_cached_per_backend(components):
    with OrtCudaBackend(components.manifest, "cpu") as backend:
        assert backend.device_session("unet_step") is backend.device_session("unet_step")
        assert backend.device_session("unet").name == "unet"
        assert backend.load("unet").inference_session is backend.load("unet", 0).inference_session


# ---------------------------------------------------------------- GPU (skipped without the CUDA EP)


@pytest.mark.gpu
@needs_cuda_ep
@pytest.mark.parametrize("names", [UNET, PRIOR], ids=["unet", "prior"])
def test_cuda_graph_replay_equals_eager(components, names):
    """Replay of the captured graphs == the same bindings run eagerly (same session, same kernels);
    the CPU host storage agrees within kernel-choice / TF32 rounding (tolerance not measured here:
    no GPU where this was written)."""
    table = scheduler_table(DDPM_CONFIG, 6) if names is UNET else components.loaded.scheduler("prior", 6)
    inputs = _inputs(components, names, table, 0)
    with OrtCudaBackend(components.manifest, "cuda") as backend:
        with make_loop(backend, names, cuda_graph=True) as graphed, make_loop(backend, names, cuda_graph=False) as plain:
            assert {i for r in graphed.storage.runners for i in r.graph_ids} == {1, 2}
            first, replay = (graphed.run(chunk_rows(inputs, table)) for _ in range(2))
            eager = plain.run(chunk_rows(inputs, table))
    with _host_loop(components.backend, names) as host:
        cpu = host.run(chunk_rows(inputs, table))
    assert np.abs(replay - eager).max() <= 1e-6 and np.abs(first - eager).max() <= 1e-6
    scale = max(1.0, float(np.abs(cpu).max()))
    assert np.abs(eager - cpu).max() <= 5e-2 * scale
