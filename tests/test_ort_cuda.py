"""Device-bound ONNX Runtime loop (``runtime/loops/ort_bound.py``, ``runtime/backends/ort_cuda.py``).

CPU tests (always run): the bound loop on the CPU execution provider — the same bindings,
ping-pong and identity-row code the CUDA path runs — equals the host loop on the tiny fp32
artifacts (prior + UnCLIP, UNet + DDPM learned-range with stochastic rows, UNet + DPM-Solver++ 2M,
which reads the x0 history); graph-id and binding logic against stand-in ORT objects. The GPU
suite is tested by its dry run (``test_gpu_suite_dry_run.py``) and ``test_gpu_suite_shell.py``.

``gpu`` tests (CUDA graph replay == eager) need a CUDA device (the marker skips them without one)
and onnxruntime-gpu's CUDAExecutionProvider (``needs_cuda_ep``); they were not executed where this
file was written (no GPU there).
"""

from __future__ import annotations

import numpy as np
import pytest

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.ort_cuda import (
    CudaGraphOptions, DeviceSession, OrtCudaBackend, cuda_available, provider_config, upload)
from kandinsky_trt.runtime.loops.host import HostLoop
from kandinsky_trt.runtime.loops.ort_bound import bound_loop
from kandinsky_trt.runtime.contract.dtypes import DTYPE_TABLE
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.contract.schedulers import scheduler_table
from kandinsky_trt.runtime.contract.loop_specs import PRIOR_LOOP as PRIOR
from kandinsky_trt.runtime.contract.loop_specs import UNET_LOOP as UNET
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork, ResolvedTensor
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec

DDPM_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
               "beta_start": 0.00085, "beta_end": 0.012, "variance_type": "learned_range", "clip_sample": True,
               "clip_sample_range": 2.0, "prediction_type": "epsilon"}
EXACT = 1e-6  # same graphs, same EP: the loops must agree to float32 rounding (measured: 0.0)
needs_cuda_ep = pytest.mark.skipif(not cuda_available(), reason="onnxruntime has no CUDAExecutionProvider "
                                   "(pip install onnxruntime-gpu)")


@pytest.fixture(scope="module")
def components(artifacts_fp32):
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(artifacts_fp32[0], backend="ort", device="cpu") as c:
        yield c


def _host(c, spec: LoopSpec, table, inputs, callback=None) -> np.ndarray:
    """The host loop on ``c``'s sessions: the reference of the bound loop."""
    return HostLoop(spec, c.session(spec.network), c.session(spec.step))(table, inputs, callback)


def _inputs(c, names: LoopSpec, table, seed: int) -> LoopInputs:
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
    return LoopInputs(latents, conditioning, {}, noise, guidance_scale=4.0)


def _compare(c, names: LoopSpec, table, seeds=(0,)) -> float:
    """Max |bound loop - host loop| over the final latents and every callback, for each seed."""
    worst = 0.0
    with bound_loop(c.manifest, names, device="cpu") as loop:
        for seed in seeds:
            inputs = _inputs(c, names, table, seed)
            seen_host, seen_device = [], []
            expected = _host(c, names, table, inputs, lambda i, t, x: seen_host.append((i, t, x.copy())))
            found = loop(table, inputs, lambda i, t, x: seen_device.append((i, t, x)))
            assert [s[:2] for s in seen_device] == [s[:2] for s in seen_host]
            diffs = [np.abs(found - expected).max()] + [np.abs(a[2] - b[2]).max() for a, b in zip(seen_device, seen_host)]
            assert found.shape == expected.shape and found.dtype == np.float32
            worst = max(worst, *map(float, diffs))
    return worst


def test_prior_loop_matches_the_host_loop(components):
    table = components.loaded.scheduler("prior", 4)  # UnCLIP: stochastic except the last row
    assert table.stochastic.any() and not table.stochastic.all()
    assert _compare(components, PRIOR, table, seeds=(0, 1)) <= EXACT


def test_unet_ddpm_loop_with_noise_matches_the_host_loop(components):
    table = scheduler_table(DDPM_CONFIG, 4)  # learned-range variance; the t=0 row is deterministic
    assert table.stochastic.any() and not table.stochastic[-1]
    assert _compare(components, UNET, table, seeds=(0, 1)) <= EXACT


def test_unet_dpmpp_history_ping_pong_matches_the_host_loop(components):
    table = components.loaded.scheduler("decoder", 5, "dpmpp2m")  # odd count: ends on the other state side
    assert np.any(table.coefficients[:, list(table.to_manifest()["columns"]).index("r")] != 0)  # reads x0_prev
    assert _compare(components, UNET, table) <= EXACT


def test_single_step_and_ddim(components):
    assert _compare(components, UNET, components.loaded.scheduler("decoder", 1)) <= EXACT
    assert _compare(components, UNET, components.loaded.scheduler("decoder", 2)) <= EXACT


def test_buffers_bound_once_and_linked(components):
    with bound_loop(components.manifest, UNET, device="cpu") as loop:
        sample = loop.network_buffers["sample"]
        a, b = (run.buffers for run in loop._step_runs)
        assert a["model_input"] is sample and b["model_input"] is sample
        assert a["model_output"] is loop.network_buffers["noise_pred"] is b["model_output"]
        latents, x0 = loop.state["latents"], loop.state["x0_prev"]
        assert (a["latents"], a["latents_next"], a["x0_prev"], a["x0"]) == (latents[0], latents[1], x0[0], x0[1])
        assert (b["latents"], b["latents_next"], b["x0_prev"], b["x0"]) == (latents[1], latents[0], x0[1], x0[0])
        pointers = {name: v.data_ptr() for name, v in loop.network_buffers.items()}
        table = components.loaded.scheduler("decoder", 2)
        inputs = _inputs(components, UNET, table, 3)
        loop(table, inputs)
        loop(table, inputs)
        assert {name: v.data_ptr() for name, v in loop.network_buffers.items()} == pointers
        assert loop.graph_ids == {"network": None, "step_a": None, "step_b": None}  # CPU EP: no graphs
        # The step graph wrote the next network input straight into the network's sample buffer.
        last = loop.state["latents"][1].numpy()  # identity row, then B, A: the state is back in buffers 1
        np.testing.assert_array_equal(sample.numpy(), np.concatenate([last, last]))


def test_bad_inputs_are_named(components):
    table = scheduler_table(DDPM_CONFIG, 3)
    good = _inputs(components, UNET, table, 0)
    with bound_loop(components.manifest, UNET, device="cpu") as loop:
        with pytest.raises(BackendError, match=r"inputs.conditioning: expected \['encoder_hidden_states'"):
            loop(table, LoopInputs(good.latents, {}, {}, good.noise, 4.0))
        with pytest.raises(BackendError, match=r"inputs.latents: expected float32\[1, 4, 8, 8\], found float32\[2, 4, 8, 8\]"):
            loop(table, LoopInputs(np.concatenate([good.latents] * 2), good.conditioning, {}, good.noise, 4.0))
        with pytest.raises(BackendError, match="inputs.noise: expected 2 rows"):
            loop(table, LoopInputs(good.latents, good.conditioning, {}, None, 4.0))


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


def _hide_cuda_ep(monkeypatch) -> None:
    """ONNX Runtime as the CPU-only package has it, even where onnxruntime-gpu is installed."""
    import onnxruntime as ort

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])


def test_cuda_without_onnxruntime_gpu_fails_clearly(components, monkeypatch):
    _hide_cuda_ep(monkeypatch)
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        bound_loop(components.manifest, UNET, device="cuda")


def test_backends_return_their_loop(components, monkeypatch):
    """``backend.loop``: the host loop on the CPU, the bound loop for ORT on CUDA; one loop per spec."""
    from kandinsky_trt.runtime.backends.ort import OrtBackend, OrtOptions

    table = components.loaded.scheduler("decoder", 2)
    inputs = _inputs(components, UNET, table, 0)
    first = components.denoise(UNET, table, inputs)
    np.testing.assert_array_equal(components.denoise(UNET, table, inputs), first)
    assert [type(loop) for loop in components._loops.values()] == [HostLoop]
    with OrtCudaBackend(components.manifest, "cpu") as backend, backend.loop(UNET) as loop:
        assert type(loop).__name__ == "OrtBoundLoop" and loop.replay_graphs
        assert np.abs(loop(table, inputs) - first).max() <= EXACT
    _hide_cuda_ep(monkeypatch)  # ORT on CUDA builds the bound loop, which needs onnxruntime-gpu
    with pytest.raises(BackendError, match="onnxruntime-gpu"):
        OrtBackend(components.manifest, OrtOptions(device="cuda")).loop(UNET)


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
        class Binding:
            def __init__(self):
                self.inputs, self.outputs = {}, {}

            def bind_ortvalue_input(self, name, value):
                self.inputs[name] = value

            def bind_ortvalue_output(self, name, value):
                self.outputs[name] = value

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


# ---------------------------------------------------------------- GPU (skipped without the CUDA EP)


def _graph_vs_eager(c, names: LoopSpec, table, seed: int) -> tuple[np.ndarray, ...]:
    """(first call, replay call, same bindings eagerly, session without graphs, CPU host loop)."""
    inputs = _inputs(c, names, table, seed)
    with bound_loop(c.manifest, names, device="cuda", cuda_graph=True) as graphed, \
            bound_loop(c.manifest, names, device="cuda", cuda_graph=False) as plain:
        assert set(graphed.graph_ids.values()) == {1, 2}  # network id 1; step bindings 1 and 2
        assert set(plain.graph_ids.values()) == {None}
        first, replay = graphed(table, inputs), graphed(table, inputs)  # the second only replays
        graphed.replay_graphs = False
        eager = graphed(table, inputs)
        other = plain(table, inputs)
    return first, replay, eager, other, _host(c, names, table, inputs)


@pytest.mark.gpu
@needs_cuda_ep
@pytest.mark.parametrize("names", [UNET, PRIOR], ids=["unet", "prior"])
def test_cuda_graph_replay_equals_eager(components, names):
    """Replay of the captured graphs == the same bindings run eagerly (same session, same kernels);
    a session without graphs and the CPU loop agree within kernel-choice / TF32 rounding
    (tolerances not measured here: no GPU where this was written)."""
    table = scheduler_table(DDPM_CONFIG, 6) if names is UNET else components.loaded.scheduler("prior", 6)
    first, replay, eager, other, cpu = _graph_vs_eager(components, names, table, 0)
    assert np.abs(replay - eager).max() <= 1e-6 and np.abs(first - eager).max() <= 1e-6
    scale = max(1.0, float(np.abs(cpu).max()))
    assert np.abs(other - eager).max() <= 1e-3 * scale
    assert np.abs(eager - cpu).max() <= 5e-2 * scale
