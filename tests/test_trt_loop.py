"""The device storage of the loop of slots on TensorRT equals the host storage on the same engines.

CPU tests run ``SlotLoop(spec, DeviceStorage(TrtBackend))`` against the stand-in ``tensorrt`` module
and simulated CUDA memory of ``tests/fakes/``, with engine executions going through the simulated
CUDA layer (so a stream capture records them and a graph launch replays them with the addresses
and arena pointer they had when captured, failing if those were freed since), and engines that
compute real step maths — a deterministic fake UNet (row by row, at each row's own timestep) and
the step graphs' numpy reference (:func:`~kandinsky_trt.runtime.contract.schedulers.apply_step`,
per row). The I/O is the real spec resolved at a tiny batch-2 profile. The host reference is
``SlotLoop(spec, HostStorage(...))`` over the same engines' host-level ``run``. These check our loop
logic (bindings once, row writes, ping-pong, capture/replay/re-capture, syncs), not TensorRT or
CUDA themselves.

The ``tensorrt`` + ``gpu`` test at the end builds real engines from the tiny checkpoint's ONNX
graphs and compares graph replay with eager execution; its markers skip it where TensorRT,
cuda-python or a GPU is missing (it was not executed where this file was written: no GPU, no
TensorRT there).
"""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest
from fakes.cuda import FakeCuda, FakeMemory
from fakes.plan_artifacts import write_plan_artifacts
from fakes.tensorrt import STATE, FakeEngine, install
from test_slots import _mixed

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.trt import TrtBackend
from kandinsky_trt.runtime.backends.trt_engine import TensorInfo
from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, UNET_LOOP
from kandinsky_trt.runtime.contract.schedulers import apply_step, fast_solver_config, scheduler_table
from kandinsky_trt.runtime.contract.spec import ModelDims, Profile, resolve
from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.loops.device import DeviceStorage
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.host import HostStorage
from kandinsky_trt.runtime.loops.slots import LoopRow, LoopStopped, SlotLoop
from kandinsky_trt.runtime.loops.template import LoopInputs, chunk_rows

PROFILE = Profile(batch=2, height=64, width=64, cfg=True)
DIMS = ModelDims(clip_dim=8, text_dim=8, image_size=8, text_len=4)
ARENA = {"unet": 3000, "unet_step": 0, "unet_inpaint": 3000, "unet_inpaint_step": 0, "movq_decoder": 9000}
DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
        "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "epsilon"}
DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
        "beta_start": 0.00085, "beta_end": 0.012, "variance_type": "learned_range", "clip_sample": True,
        "clip_sample_range": 2.0, "prediction_type": "epsilon"}
STEPS = 7
CUDA_OPS = ("memcpy_d2d", "begin_capture", "end_capture", "instantiate", "launch", "destroy_graph", "destroy_graph_exec")


# -- engines that compute: a deterministic fake UNet, the step graphs' numpy reference -------------


def _fake_unet(sample, timestep, encoder_hidden_states, text_embeds, image_embeds):
    """noise channels and learned-variance channels in (-1, 1), depending on every input per batch row."""
    cond = (encoder_hidden_states.mean(axis=(1, 2)) + text_embeds.mean(1) - image_embeds.mean(1))[:, None, None, None]
    x = sample[:, :4]
    if sample.shape[1] > 4:  # the inpaint UNet also sees masked-image latents and the mask
        x = x + np.float32(0.1) * sample[:, 4:8] + sample[:, 8:9]
    eps = np.tanh(np.float32(0.8) * x + cond + timestep[:, None, None, None] / np.float32(1000))
    var = np.tanh(np.float32(0.5) * x - cond)
    return {"noise_pred": np.concatenate([eps, var], axis=1).astype(np.float32)}


def _fake_step(latents, model_output, coefficients, noise, guidance_scale, x0_prev, conditioning=None):  # noqa: PLR0913
    """What the step graph computes (export/step_graphs.py), with apply_step's float32 maths, per row.

    The parameters are the step graph's input names (the fake engine calls it with keywords)."""
    x_next, x0 = apply_step(coefficients, latents, model_output, noise, guidance_scale, x0_prev, cfg=True)
    model_input = np.concatenate([x_next, x_next], axis=0)
    if conditioning is not None:
        model_input = np.concatenate([model_input, conditioning], axis=1)
    return {"latents_next": x_next, "x0": x0, "model_input": model_input}


FUNCTIONS = {"unet": _fake_unet, "unet_inpaint": _fake_unet, "unet_step": _fake_step,
             "unet_inpaint_step": _fake_step, "movq_decoder": lambda latents: {"image": None}}


def _tensors(name: str) -> list[TensorInfo]:
    net = resolve(name, PROFILE, DIMS)
    return ([TensorInfo(t.name, "input", t.dtype, t.shape) for t in net.inputs]
            + [TensorInfo(t.name, "output", t.dtype, t.shape) for t in net.outputs])


def _write_artifacts(directory) -> None:
    networks = {}
    for name in FUNCTIONS:
        net = resolve(name, PROFILE, DIMS)
        networks[name] = ([t.to_dict() for t in net.inputs], [t.to_dict() for t in net.outputs])
    write_plan_artifacts(directory, networks, ARENA, geometry=(PROFILE.to_dict(), DIMS.to_dict()))


class _Env(types.SimpleNamespace):
    """memory, cuda (the simulated CUDA layer), engines (name -> the engine last deserialized), directory."""

    def context(self, name: str):
        """The execution context created last for engine ``name`` (a loop's binding, once one is built)."""
        return self.engines[name].contexts[-1]

    def backend(self) -> TrtBackend:
        return TrtBackend(self.directory, cuda_ops=self.cuda)


@pytest.fixture()
def env(monkeypatch, tmp_path):
    memory = FakeMemory(1 << 21)
    memory.bytes[:] = 0xFF  # cudaMalloc does not zero: fresh buffers hold NaN bit patterns here
    env = _Env(memory=memory, cuda=FakeCuda(memory), engines={}, directory=tmp_path)

    def make_engine(name):
        env.engines[name] = FakeEngine(_tensors(name), FUNCTIONS[name], ARENA[name], memory, env.cuda)
        return env.engines[name]

    install(monkeypatch, make_engine, memory)
    _write_artifacts(tmp_path)
    return env


def _inputs(backend: TrtBackend, names, table, seed: int, guidance: float = 4.0) -> LoopInputs:
    """One chunk of two rows (the profile's batch)."""
    rng = np.random.default_rng(seed)
    net, step = backend.load(names.network).network, backend.load(names.step).network
    conditioning = {t.name: rng.standard_normal(t.shape).astype(t.dtype)
                    for t in net.inputs if t.name not in (names.sample_input, "timestep")}
    extras = {"conditioning": rng.standard_normal(step.tensor("conditioning").shape).astype(np.float32)} \
        if "conditioning" in step.input_names else {}
    latent = step.tensor("latents").shape
    noise = rng.standard_normal((int(table.stochastic.sum()), *latent)).astype(np.float32)
    return LoopInputs(rng.standard_normal(latent).astype(np.float32), conditioning, extras, noise, guidance)


def _host(backend: TrtBackend, spec, table, inputs, callback=None) -> np.ndarray:
    with SlotLoop(spec, HostStorage(spec, backend.load(spec.network), backend.load(spec.step))) as loop:
        return loop.run(chunk_rows(inputs, table), callback)


def _device(backend: TrtBackend, spec=UNET_LOOP, graph: bool = True) -> SlotLoop:
    loop = make_loop(backend, spec, 0, cuda_graph=graph)
    assert isinstance(loop.storage, DeviceStorage)
    return loop


def _counts(loop: SlotLoop) -> tuple[int, int, int]:
    """(eager runs, captures, launches) over both step runners (A and B)."""
    steps = [runner.steps for runner in loop.storage.runners]
    return tuple(sum(getattr(s, name) for s in steps) for name in ("eager_runs", "captures", "launches"))


# -- the device storage equals the host storage ------------------------------------------------------


@pytest.mark.parametrize("config", [DDIM, DDPM, fast_solver_config(DDIM)], ids=["ddim", "ddpm_learned_range", "dpmpp2m"])
@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_loop_equals_host_storage(env, config, graph):
    """DDIM (deterministic), DDPM with learned variance (noise rows), DPM-Solver++ 2M (x0 -> x0_prev carry)."""
    table = scheduler_table(config, STEPS)
    with env.backend() as backend, _device(backend, UNET_LOOP, graph) as loop:
        for chunk, seed in enumerate((1, 2)):  # two chunks: the graphs of the first are replayed by the second
            inputs = _inputs(backend, UNET_LOOP, table, seed)
            expected = _host(backend, UNET_LOOP, table, inputs)
            syncs, freed = backend.stream.syncs, len(env.memory.freed)
            got = loop.run(chunk_rows(inputs, table))
            # Same float32 numpy operations in the same order on both paths: bit-identical.
            assert got.tobytes() == expected.tobytes()
            assert backend.stream.syncs == syncs + 1  # the retirement's download; none inside the steps
            assert len(env.memory.freed) == freed  # nothing is allocated or freed per chunk
            if graph:  # per runner (A even steps, B odd): one eager warm-up, one capture, then replays
                assert _counts(loop) == (2, 2, (chunk + 1) * STEPS - 2)
            else:
                assert _counts(loop) == ((chunk + 1) * STEPS, 0, 0)
        assert not np.allclose(got, inputs.latents, atol=1e-2)  # the loop did move the latents
    assert not env.cuda.execs  # the graphs are destroyed on close


def test_rows_admitted_at_different_steps_equal_the_host_storage_and_keep_the_graphs(env):
    """Rows of different schedulers, step counts, guidance (above and at most 1) admitted whenever a
    slot frees, side by side at different positions: each equals the host storage's result for the
    same schedule, bit for bit; admissions are row copies, so the two captured graphs are replayed
    across them, never re-captured."""
    with env.backend() as backend:
        rows = []
        for seed, (config, steps, guidance) in enumerate([(DDIM, 3, 4.0), (DDPM, 5, 1.0), (fast_solver_config(DDIM), 4, 7.5),
                                                          (DDPM, 2, 3.0), (DDIM, 6, 0.5)]):
            table = scheduler_table(config, steps)
            rows.append(chunk_rows(_inputs(backend, UNET_LOOP, table, 10 + seed, guidance), table)[seed % 2])
        with SlotLoop(UNET_LOOP, HostStorage(UNET_LOOP, backend.load("unet"), backend.load("unet_step"))) as host:
            expected, _ = _mixed(host, rows)
        with _device(backend) as loop:
            pointers = {name: b.ptr for name, b in loop.storage.network_buffers.items()}
            got, side_by_side = _mixed(loop, rows)
            assert _counts(loop)[:2] == (2, 2)  # one warm-up and one capture per runner, whatever was admitted
            again, _ = _mixed(loop, rows[::-1])
            assert _counts(loop)[:2] == (2, 2)
            assert {name: b.ptr for name, b in loop.storage.network_buffers.items()} == pointers
    assert any(pa != pb or la != lb for la, pa, lb, pb in side_by_side)
    for i in range(len(rows)):
        assert got[i].tobytes() == expected[i].tobytes() == again[len(rows) - 1 - i].tobytes(), f"row {i}"


def test_stochastic_rows_reach_the_step_graph(env):
    """A DDPM table's noise rows matter: other noise gives other latents, the same noise the same ones."""
    table = scheduler_table(DDPM, STEPS)
    with env.backend() as backend, _device(backend) as loop:
        inputs = _inputs(backend, UNET_LOOP, table, 5)
        first = loop.run(chunk_rows(inputs, table))
        other = loop.run(chunk_rows(LoopInputs(inputs.latents, inputs.conditioning, {}, -inputs.noise, 4.0), table))
        again = loop.run(chunk_rows(inputs, table))
    assert np.abs(first - other).max() > 1e-2
    np.testing.assert_array_equal(first, again)


def test_inpaint_loop_writes_step_extras(env):
    table = scheduler_table(DDIM, STEPS)
    with env.backend() as backend, _device(backend, INPAINT_LOOP) as loop:
        inputs = _inputs(backend, INPAINT_LOOP, table, 3)
        np.testing.assert_array_equal(loop.run(chunk_rows(inputs, table)), _host(backend, INPAINT_LOOP, table, inputs))
        moved = inputs.step_extras["conditioning"] + 1
        shifted = LoopInputs(inputs.latents, inputs.conditioning, {"conditioning": moved}, inputs.noise, 4.0)
        np.testing.assert_array_equal(loop.run(chunk_rows(shifted, table)), _host(backend, INPAINT_LOOP, table, shifted))


def test_callback_gets_every_step_and_costs_a_sync_each(env):
    table = scheduler_table(DDPM, STEPS)
    with env.backend() as backend, _device(backend) as loop:
        inputs = _inputs(backend, UNET_LOOP, table, 4)
        host_calls, device_calls = [], []
        expected = _host(backend, UNET_LOOP, table, inputs, lambda i, t, x: host_calls.append((i, t, x.copy())))
        syncs = backend.stream.syncs

        def record(i, t, x):
            device_calls.append((i, t, x.copy()))
            x[...] = np.nan  # the callback's array is a copy: the loop's state is unaffected

        got = loop.run(chunk_rows(inputs, table), record)
        assert backend.stream.syncs == syncs + STEPS + 1  # one per step for the callback, one at the retirement
    np.testing.assert_array_equal(got, expected)
    assert [(i, t) for i, t, _ in device_calls] == [(i, int(t)) for i, t in enumerate(table.timesteps)]
    for (_, _, ours), (_, _, theirs) in zip(device_calls, host_calls):
        np.testing.assert_array_equal(ours, theirs)


def test_syncs_counted_zero_per_step_one_per_retired_batch(env):
    """Stream synchronisations of a device loop: none for an admission or a step, one for each step
    that retires rows (its one download), whatever the number of rows it retires."""
    with env.backend() as backend, _device(backend) as loop:
        short, long = scheduler_table(DDIM, 2), scheduler_table(DDPM, 5)
        a = chunk_rows(_inputs(backend, UNET_LOOP, short, 1), short)[0]
        b = chunk_rows(_inputs(backend, UNET_LOOP, long, 2), long)[1]
        syncs, per_step = backend.stream.syncs, []
        loop.admit(a)
        loop.admit(b)
        assert backend.stream.syncs == syncs  # admission: row copies only
        for _ in range(5):
            before = backend.stream.syncs
            retired = loop.step()
            per_step.append((len(retired), backend.stream.syncs - before))
    assert per_step == [(0, 0), (1, 1), (0, 0), (0, 0), (1, 1)]


def test_grown_arena_forces_a_recapture(env):
    table = scheduler_table(DDIM, STEPS)
    with env.backend() as backend, _device(backend) as loop:
        loop.run(chunk_rows(_inputs(backend, UNET_LOOP, table, 1), table))
        old = dict(env.cuda.execs)
        assert len(old) == 2  # one graph per step runner
        generation = backend.generation
        backend.load("movq_decoder")  # needs a larger activation arena: the old one is freed
        assert backend.generation == generation + 1
        with pytest.raises(AssertionError, match="freed device memory"):  # the stale graph would be wrong
            for op in next(iter(old.values())):
                op()
        inputs = _inputs(backend, UNET_LOOP, table, 2)
        got = loop.run(chunk_rows(inputs, table))
        np.testing.assert_array_equal(got, _host(backend, UNET_LOOP, table, inputs))
        # chunk 2: per runner an eager warm-up on the new arena and a second capture; old graphs destroyed
        assert _counts(loop) == (4, 4, 2 * (STEPS - 2))
        assert not set(old) & set(env.cuda.execs) and len(env.cuda.execs) == 2


def test_first_network_input_is_written_at_admission(env):
    """Admission writes [x; x] into the network's sample rows of the slot; the links are one buffer."""
    table = scheduler_table(DDIM, 1)
    with env.backend() as backend, _device(backend) as loop:
        inputs = _inputs(backend, UNET_LOOP, table, 6)
        seen = []
        unet = env.context("unet")
        original = unet.engine.fn
        unet.engine.fn = lambda **feeds: (seen.append(feeds["sample"]), original(**feeds))[1]
        loop.run(chunk_rows(inputs, table))
        storage = loop.storage
        assert storage.network_buffers["sample"] is storage.bindings[1].buffers["model_input"]  # spec.links
        assert storage.network_buffers["noise_pred"] is storage.bindings[2].buffers["model_output"]
    np.testing.assert_array_equal(seen[0], np.concatenate([inputs.latents, inputs.latents]))


# -- sessions, errors, lifecycle --------------------------------------------------------------------


def test_each_engine_is_deserialized_once_whatever_the_loops(env):
    """One engine per network per process: host runs and every loop (two specs, graphs on and off)
    share it; each loop binding is an execution context of its own."""
    with env.backend() as backend:
        loops = [_device(backend, spec, graph) for spec in (UNET_LOOP, INPAINT_LOOP) for graph in (True, False)]
        _host(backend, UNET_LOOP, scheduler_table(DDIM, 2), _inputs(backend, UNET_LOOP, scheduler_table(DDIM, 2), 1))
        for loop in loops:
            loop.close()
    assert sorted(STATE.deserialized) == ["unet", "unet_inpaint", "unet_inpaint_step", "unet_step"]


def test_bad_rows_are_refused_before_anything_is_enqueued(env):
    table = scheduler_table(DDPM, STEPS)
    with env.backend() as backend, _device(backend) as loop:
        good = chunk_rows(_inputs(backend, UNET_LOOP, table, 1), table)[0]
        executions = [c.executions for c in env.engines["unet_step"].contexts]
        with pytest.raises(BackendError, match=r"noise: expected 6 rows .* found 2"):
            loop.admit(LoopRow(good.latents, good.conditioning, table, 4.0, good.noise[:2]))
        missing = {k: v for k, v in good.conditioning.items() if k != "text_embeds"}
        with pytest.raises(BackendError, match=r"row conditioning: expected \['encoder_hidden_states', "
                                               r"'image_embeds', 'text_embeds'\], found"):
            loop.admit(LoopRow(good.latents, missing, table, 4.0, good.noise))
        with pytest.raises(BackendError, match=r"latents: expected float32\[4, 8, 8\], found float32\[2, 8, 8\]"):
            loop.admit(LoopRow(good.latents[:2], good.conditioning, table, 4.0, good.noise))
        assert [c.executions for c in env.engines["unet_step"].contexts] == executions and loop.free == [0, 1]
        np.testing.assert_array_equal(loop.run([good])[0], loop.run([good])[0])


def test_close_frees_buffers_and_graphs_but_not_the_backend(env):
    table = scheduler_table(DDIM, 3)
    backend = env.backend()
    loop = _device(backend)
    loop.run(chunk_rows(_inputs(backend, UNET_LOOP, table, 1), table))
    storage = loop.storage
    owned = {b.ptr for b in (*storage.network_buffers.values(), *storage.step_buffers.values(),
                             *(b for pair in storage.state.values() for b in pair))}
    assert len(owned) == 6 + 2 * 2 + 3  # unet I/O, two sides of latents and x0_prev, coefficients/noise/guidance
    network_binding = storage.bindings[0]
    syncs = backend.stream.syncs
    loop.close()
    assert backend.stream.syncs == syncs + 1  # queued work done before anything is freed
    assert owned <= set(env.memory.freed) and not env.cuda.execs
    loop.close()  # idempotent
    with pytest.raises(BackendError, match="found it closed"):
        loop.run(chunk_rows(_inputs(backend, UNET_LOOP, table, 1), table))
    assert backend.load("unet_step") is not None  # the backend is still open
    with pytest.raises(BackendError, match="open binding, found it closed"):  # no enqueue into freed buffers
        network_binding.enqueue()
    unet = backend.load("unet")
    feeds = {t.name: np.zeros(t.shape, t.dtype) for t in unet.network.inputs}
    assert unet.run(feeds)["noise_pred"].shape == unet.network.outputs[0].shape
    backend.close()


def test_components_run_trt_loops_and_close_them(env, monkeypatch):
    from kandinsky_trt.runtime.pipelines.components import Components

    for name in CUDA_OPS:
        monkeypatch.setattr(cuda, name, getattr(env.cuda, name))  # the backend's default CUDA layer
    table = scheduler_table(DDPM, STEPS)
    components = Components(env.directory, backend="trt")
    inputs = _inputs(components.backend, UNET_LOOP, table, 1)
    expected = _host(components.backend, UNET_LOOP, table, inputs)
    np.testing.assert_array_equal(components.denoise(UNET_LOOP, table, inputs), expected)
    np.testing.assert_array_equal(components.denoise(UNET_LOOP, table, inputs), expected)
    (loop,) = components._loops.values()
    assert isinstance(loop.storage, DeviceStorage) and _counts(loop) == (2, 2, 2 * STEPS - 2)  # one loop, reused
    components.close()
    assert loop._closed and not env.cuda.execs and components.backend._closed


def test_stop_hook_costs_no_host_sync_and_stops_at_a_step_boundary(env, monkeypatch):
    """``Components.should_stop`` (serving's cancellation check) is read after each step without
    fetching the latents: a checked run makes exactly the syncs and device-to-host copies of an
    unchecked one, a stop raises at the boundary where it turned true, and the loop stays reusable."""
    from kandinsky_trt.runtime.pipelines.components import Components

    for name in CUDA_OPS:
        monkeypatch.setattr(cuda, name, getattr(env.cuda, name))
    table = scheduler_table(DDPM, STEPS)
    components = Components(env.directory, backend="trt")
    inputs = _inputs(components.backend, UNET_LOOP, table, 7)
    expected = _host(components.backend, UNET_LOOP, table, inputs)
    components.denoise(UNET_LOOP, table, inputs)  # builds the loop (and captures its graphs)
    (loop,) = components._loops.values()
    downloads = []
    buffer_class = type(loop.storage.state["latents"][0])
    copy = buffer_class.copy_to_host
    monkeypatch.setattr(buffer_class, "copy_to_host", lambda self, out, stream=None: (downloads.append(1),
                                                                                       copy(self, out, stream))[1])

    def costs(should_stop):
        components.should_stop = should_stop
        syncs, before = components.backend.stream.syncs, len(downloads)
        try:
            return components.denoise(UNET_LOOP, table, inputs), components.backend.stream.syncs - syncs, \
                len(downloads) - before
        finally:
            components.should_stop = None

    plain, plain_syncs, plain_copies = costs(None)
    checks = []
    checked, checked_syncs, checked_copies = costs(lambda: checks.append(1) or False)
    assert (checked_syncs, checked_copies) == (plain_syncs, plain_copies) == (1, 1)
    assert len(checks) == STEPS  # before the loop, then after every step but the last
    np.testing.assert_array_equal(plain, expected)
    np.testing.assert_array_equal(checked, expected)
    launches = _counts(loop)[2]
    calls = []
    with pytest.raises(LoopStopped, match=f"stopped after step 2 of {STEPS}"):
        costs(lambda: calls.append(1) or len(calls) == 3)  # true after the second step
    assert _counts(loop)[2] == launches + 2  # the captured graphs replay steps 0 and 1, none after the stop
    with pytest.raises(LoopStopped, match="before its first step"):
        costs(lambda: True)
    np.testing.assert_array_equal(costs(None)[0], expected)  # the loop is reusable after a stop
    components.close()


# -- real TensorRT on a GPU (skipped where unavailable) -------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_engines_graph_replay_equals_eager(artifacts_fp32, tmp_path):
    """Tiny checkpoint -> ONNX -> TensorRT plans (unet, unet_step); the loop with and without CUDA graphs.

    Graph replay must equal eager execution bit for bit (same engines, same kernels, same order), and
    both must stay near the ONNX Runtime CPU host loop. The 1e-2 tolerance against ORT is a guess for
    TensorRT's fp32 (TF32 tactics allowed by default) over 7 steps of a random tiny UNet: never measured.
    """
    from kandinsky_trt.engine.builder import BuildConfig, build_engines
    from kandinsky_trt.runtime.pipelines.components import Components

    source, _ = artifacts_fp32
    artifacts = shutil.copytree(source, tmp_path / "artifacts")  # the build writes into the manifest
    build_engines(BuildConfig(artifacts, networks=("unet", "unet_step"), opt_level=0))
    table = scheduler_table(DDPM, STEPS)
    results = {}
    for graph in (True, False):
        with Components(artifacts, backend="trt", device="cuda", cuda_graph=graph) as components:
            inputs = _inputs(components.backend, UNET_LOOP, table, 1)
            results[graph] = [components.denoise(UNET_LOOP, table, inputs) for _ in range(2)]
    with Components(artifacts, backend="ort") as components:
        reference = components.denoise(UNET_LOOP, table, inputs)
    for got in (*results[True], *results[False]):
        np.testing.assert_array_equal(got, results[True][0])
    np.testing.assert_allclose(results[True][0], reference, rtol=1e-2, atol=1e-2)
