"""TrtGraphLoop: the TensorRT strategy of the loop equals the host loop on the same engines.

CPU tests run the loop against the stand-in ``tensorrt`` module and simulated CUDA memory of
``tests/fakes/``, with engine executions going through the simulated CUDA layer (so a
stream capture records them and a graph launch replays them with the addresses and arena pointer
they had when captured, failing if those were freed since), and engines that compute real
step maths — a deterministic fake UNet and the step graphs' numpy reference
(:func:`~kandinsky_trt.runtime.contract.schedulers.apply_step`). The I/O is the real spec resolved at a tiny
profile. The host reference is the host loop over the same engines' host-level ``run``. These check
our loop logic (bindings, uploads, row copies, carries, capture/replay/re-capture, syncs), not
TensorRT or CUDA themselves.

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
from fakes.tensorrt import FakeEngine, install

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.trt import TensorInfo, TrtBackend
from kandinsky_trt.runtime.loops.host import HostLoop
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable, apply_step, fast_solver_config, scheduler_table
from kandinsky_trt.runtime.contract.spec import K, ModelDims, Profile, resolve
from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, UNET_LOOP
from kandinsky_trt.runtime.loops.trt_graph import TrtGraphLoop

PROFILE = Profile(batch=1, height=64, width=64, cfg=True)
DIMS = ModelDims(clip_dim=8, text_dim=8, image_size=8, text_len=4)
ARENA = {"unet": 3000, "unet_step": 0, "unet_inpaint": 3000, "unet_inpaint_step": 0, "movq_decoder": 9000}
DDIM = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
        "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "epsilon"}
DDPM = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
        "beta_start": 0.00085, "beta_end": 0.012, "variance_type": "learned_range", "clip_sample": True,
        "clip_sample_range": 2.0, "prediction_type": "epsilon"}
STEPS = 7


# -- engines that compute: a deterministic fake UNet, the step graphs' numpy reference -------------


def _fake_unet(sample, timestep, encoder_hidden_states, text_embeds, image_embeds):
    """noise channels and learned-variance channels in (-1, 1), depending on every input per batch row."""
    cond = (encoder_hidden_states.mean(axis=(1, 2)) + text_embeds.mean(1) - image_embeds.mean(1))[:, None, None, None]
    x = sample[:, :4]
    if sample.shape[1] > 4:  # the inpaint UNet also sees masked-image latents and the mask
        x = x + np.float32(0.1) * sample[:, 4:8] + sample[:, 8:9]
    eps = np.tanh(np.float32(0.8) * x + cond + timestep[0] / np.float32(1000))
    var = np.tanh(np.float32(0.5) * x - cond)
    return {"noise_pred": np.concatenate([eps, var], axis=1).astype(np.float32)}


def _fake_step(latents, model_output, coefficients, noise, guidance_scale, x0_prev, conditioning=None):  # noqa: PLR0913
    """What the step graph computes (export/step_graphs.py), with apply_step's float32 maths.

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


def _inputs(backend: TrtBackend, names, table: SchedulerTable, seed: int) -> LoopInputs:
    rng = np.random.default_rng(seed)
    net, step = backend.load(names.network).network, backend.load(names.step).network
    conditioning = {t.name: rng.standard_normal(t.shape).astype(t.dtype)
                    for t in net.inputs if t.name not in (names.sample_input, "timestep")}
    extras = {"conditioning": rng.standard_normal(step.tensor("conditioning").shape).astype(np.float32)} \
        if "conditioning" in step.input_names else {}
    latent = step.tensor("latents").shape
    noise = rng.standard_normal((int(table.stochastic.sum()), *latent)).astype(np.float32)
    return LoopInputs(rng.standard_normal(latent).astype(np.float32), conditioning, extras, noise, 4.0)


def _host(backend: TrtBackend, spec, table, inputs, callback=None) -> np.ndarray:
    return HostLoop(spec, backend.load(spec.network), backend.load(spec.step))(table, inputs, callback)


def _counts(loop: TrtGraphLoop) -> tuple[int, int, int]:
    return loop.steps.eager_runs, loop.steps.captures, loop.steps.launches


# -- the loop equals denoise() -------------------------------------------------------------------


@pytest.mark.parametrize("config", [DDIM, DDPM, fast_solver_config(DDIM)], ids=["ddim", "ddpm_learned_range", "dpmpp2m"])
@pytest.mark.parametrize("graph", [True, False], ids=["graph", "eager"])
def test_loop_equals_host_denoise(env, config, graph):
    """DDIM (deterministic), DDPM with learned variance (noise rows), DPM-Solver++ 2M (x0 -> x0_prev carry)."""
    table = scheduler_table(config, STEPS)
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, UNET_LOOP, graph, env.cuda) as loop:
        for chunk, seed in enumerate((1, 2)):  # two chunks: the graph of the first is replayed by the second
            inputs = _inputs(backend, UNET_LOOP, table, seed)
            expected = _host(backend, UNET_LOOP, table, inputs)
            syncs, freed = backend.stream.syncs, len(env.memory.freed)
            got = loop(table, inputs)
            # Same float32 numpy operations in the same order on both paths: bit-identical.
            np.testing.assert_array_equal(got, expected)
            assert backend.stream.syncs == syncs + 1  # one sync per chunk, none inside the loop
            # the table buffers are freed after the chunk: coefficients, timesteps (+ noise rows if stochastic)
            assert len(env.memory.freed) - freed == (3 if table.stochastic.any() else 2)
            if graph:  # step 0 eager (warm-up), step 1 captures then launches, steps 2..n-1 replay it
                assert _counts(loop) == (1, 1, STEPS - 1 + chunk * STEPS)
            else:
                assert _counts(loop) == ((chunk + 1) * STEPS, 0, 0)
        assert not np.allclose(got, inputs.latents, atol=1e-2)  # the loop did move the latents
    assert not env.cuda.execs  # the graph is destroyed on close


def test_stochastic_rows_reach_the_step_graph(env):
    """A DDPM table's noise rows matter: other noise gives other latents, the same noise the same ones."""
    table = scheduler_table(DDPM, STEPS)
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, UNET_LOOP, True, env.cuda) as loop:
        inputs = _inputs(backend, UNET_LOOP, table, 5)
        first = loop(table, inputs)
        other = loop(table, LoopInputs(inputs.latents, inputs.conditioning, {}, -inputs.noise, 4.0))
        again = loop(table, inputs)
    assert np.abs(first - other).max() > 1e-2
    np.testing.assert_array_equal(first, again)


def test_inpaint_loop_uploads_step_extras(env):
    table = scheduler_table(DDIM, STEPS)
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, INPAINT_LOOP, True, env.cuda) as loop:
        inputs = _inputs(backend, INPAINT_LOOP, table, 3)
        np.testing.assert_array_equal(loop(table, inputs), _host(backend, INPAINT_LOOP, table, inputs))
        moved = inputs.step_extras["conditioning"] + 1
        shifted = LoopInputs(inputs.latents, inputs.conditioning, {"conditioning": moved}, inputs.noise, 4.0)
        np.testing.assert_array_equal(loop(table, shifted), _host(backend, INPAINT_LOOP, table, shifted))


def test_callback_gets_every_step_and_costs_a_sync_each(env):
    table = scheduler_table(DDPM, STEPS)
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, UNET_LOOP, True, env.cuda) as loop:
        inputs = _inputs(backend, UNET_LOOP, table, 4)
        host_calls, device_calls = [], []
        expected = _host(backend, UNET_LOOP, table, inputs, lambda i, t, x: host_calls.append((i, t, x.copy())))
        syncs = backend.stream.syncs

        def record(i, t, x):
            device_calls.append((i, t, x.copy()))
            x[...] = np.nan  # the callback's array is a copy: the loop's state is unaffected

        got = loop(table, inputs, record)
        assert backend.stream.syncs == syncs + STEPS + 1  # one per step for the callback, one at the end
    np.testing.assert_array_equal(got, expected)
    assert [(i, t) for i, t, _ in device_calls] == [(i, int(t)) for i, t in enumerate(table.timesteps)]
    for (_, _, ours), (_, _, theirs) in zip(device_calls, host_calls):
        np.testing.assert_array_equal(ours, theirs)


def test_grown_arena_forces_a_recapture(env):
    table = scheduler_table(DDIM, STEPS)
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, UNET_LOOP, True, env.cuda) as loop:
        loop(table, _inputs(backend, UNET_LOOP, table, 1))
        (old_exec, ops), = env.cuda.execs.items()
        generation = backend.generation
        backend.load("movq_decoder")  # needs a larger activation arena: the old one is freed
        assert backend.generation == generation + 1
        with pytest.raises(AssertionError, match="freed device memory"):  # the stale graph would be wrong
            for op in ops:
                op()
        inputs = _inputs(backend, UNET_LOOP, table, 2)
        got = loop(table, inputs)
        np.testing.assert_array_equal(got, _host(backend, UNET_LOOP, table, inputs))
        # chunk 2: eager warm-up on the new arena, a second capture, and the old graph destroyed
        assert _counts(loop) == (2, 2, 2 * (STEPS - 1))
        assert old_exec not in env.cuda.execs and len(env.cuda.execs) == 1


def test_first_network_input_comes_from_the_identity_row(env):
    """Before step 0 the step graph (identity row) writes [x; x] into the network's sample buffer."""
    table = scheduler_table(DDIM, 1)
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, UNET_LOOP, True, env.cuda) as loop:
        inputs = _inputs(backend, UNET_LOOP, table, 6)
        seen = []
        unet = env.context("unet")
        original = unet.engine.fn
        unet.engine.fn = lambda **feeds: (seen.append(feeds["sample"]), original(**feeds))[1]
        loop(table, inputs)
    np.testing.assert_array_equal(seen[0], np.concatenate([inputs.latents, inputs.latents]))
    assert loop.network_buffers["sample"] is loop.step_buffers["model_input"]  # spec.links: one buffer
    assert loop.network_buffers["noise_pred"] is loop.step_buffers["model_output"]


# -- errors, edge cases, lifecycle ----------------------------------------------------------------


def test_bad_calls_are_refused_before_anything_is_enqueued(env):
    table = scheduler_table(DDPM, STEPS)
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, UNET_LOOP, True, env.cuda) as loop:
        good = _inputs(backend, UNET_LOOP, table, 1)
        executions = env.context("unet_step").executions
        with pytest.raises(BackendError, match=r"inputs.noise: expected 6 rows .* found 2"):
            loop(table, LoopInputs(good.latents, good.conditioning, {}, good.noise[:2], 4.0))
        missing = {k: v for k, v in good.conditioning.items() if k != "text_embeds"}
        with pytest.raises(BackendError, match=r"inputs.conditioning: expected \['encoder_hidden_states', "
                                               r"'image_embeds', 'text_embeds'\], found"):
            loop(table, LoopInputs(good.latents, missing, {}, good.noise, 4.0))
        wrong = dict(good.conditioning, text_embeds=good.conditioning["text_embeds"].astype(np.float64))
        with pytest.raises(BackendError, match=r"\['text_embeds'\]: expected float32\[2, 8\], found float64\[2, 8\]"):
            loop(table, LoopInputs(good.latents, wrong, {}, good.noise, 4.0))
        with pytest.raises(BackendError, match=r"inputs.latents: expected float32\[1, 4, 8, 8\], found"):
            loop(table, LoopInputs(good.latents[:, :2], good.conditioning, {}, good.noise, 4.0))
        assert env.context("unet_step").executions == executions
        np.testing.assert_array_equal(loop(table, good), _host(backend, UNET_LOOP, table, good))


def test_empty_table_returns_the_latents(env):
    table = SchedulerTable("DDIMScheduler", np.zeros(0, np.int64), np.zeros((0, K), np.float32), np.zeros(0, bool))
    with TrtBackend(env.directory) as backend, TrtGraphLoop(backend, UNET_LOOP, True, env.cuda) as loop:
        inputs = _inputs(backend, UNET_LOOP, table, 1)
        np.testing.assert_array_equal(loop(table, inputs), _host(backend, UNET_LOOP, table, inputs))
        assert _counts(loop) == (0, 0, 0)


def test_close_frees_buffers_and_graph_but_not_the_backend(env):
    table = scheduler_table(DDIM, 3)
    backend = TrtBackend(env.directory)
    loop = TrtGraphLoop(backend, UNET_LOOP, True, env.cuda)
    loop(table, _inputs(backend, UNET_LOOP, table, 1))
    owned = {b.ptr for b in (*loop.network_buffers.values(), *loop.step_buffers.values())}
    assert len(owned) == 6 + 9 - 2  # unet I/O + unet_step I/O; the two linked pairs are one buffer each
    network_binding = loop._bindings[0]
    loop.close()
    assert owned <= set(env.memory.freed) and not env.cuda.execs
    loop.close()  # idempotent
    with pytest.raises(BackendError, match="found it closed"):
        loop(table, _inputs(backend, UNET_LOOP, table, 1))
    assert backend.load("unet_step") is not None  # the backend is still open
    with pytest.raises(BackendError, match="open binding, found it closed"):  # no enqueue into freed buffers
        network_binding.enqueue()
    unet = backend.load("unet")
    feeds = {t.name: np.zeros(t.shape, t.dtype) for t in unet.network.inputs}
    assert unet.run(feeds)["noise_pred"].shape == unet.network.outputs[0].shape
    backend.close()


def test_components_run_trt_loops_and_close_them(env, monkeypatch):
    from kandinsky_trt.runtime.pipelines.components import Components

    for name in ("memcpy_d2d", "begin_capture", "end_capture", "instantiate", "launch", "destroy_graph",
                 "destroy_graph_exec"):
        monkeypatch.setattr(cuda, name, getattr(env.cuda, name))  # the loop's default CUDA layer
    table = scheduler_table(DDPM, STEPS)
    components = Components(env.directory, backend="trt")
    inputs = _inputs(components.backend, UNET_LOOP, table, 1)
    expected = _host(components.backend, UNET_LOOP, table, inputs)
    np.testing.assert_array_equal(components.denoise(UNET_LOOP, table, inputs), expected)
    np.testing.assert_array_equal(components.denoise(UNET_LOOP, table, inputs), expected)
    (loop,) = components._loops.values()
    assert isinstance(loop, TrtGraphLoop) and _counts(loop) == (1, 1, 2 * STEPS - 1)  # one loop, reused
    components.close()
    assert loop._closed and not env.cuda.execs and components.backend._closed


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


def test_stop_hook_costs_no_host_sync_and_stops_at_a_step_boundary(env, monkeypatch):
    """``Components.should_stop`` (serving's cancellation check) is read after each step without
    fetching the latents: a checked run makes exactly the syncs and device-to-host copies of an
    unchecked one, a stop raises at the boundary where it turned true, and the loop stays reusable."""
    from kandinsky_trt.runtime.loops.template import LoopStopped
    from kandinsky_trt.runtime.pipelines.components import Components

    for name in ("memcpy_d2d", "begin_capture", "end_capture", "instantiate", "launch", "destroy_graph",
                 "destroy_graph_exec"):
        monkeypatch.setattr(cuda, name, getattr(env.cuda, name))
    table = scheduler_table(DDPM, STEPS)
    components = Components(env.directory, backend="trt")
    inputs = _inputs(components.backend, UNET_LOOP, table, 7)
    expected = _host(components.backend, UNET_LOOP, table, inputs)
    components.denoise(UNET_LOOP, table, inputs)  # builds the loop (and captures its graph)
    (loop,) = components._loops.values()
    downloads = []
    buffer_class = type(loop.step_buffers["latents"])
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
    assert _counts(loop)[2] == launches + 2  # the captured graph replays steps 0 and 1, none after the stop
    with pytest.raises(LoopStopped, match="before its first step"):
        costs(lambda: True)
    np.testing.assert_array_equal(costs(None)[0], expected)  # the loop is reusable after a stop
    components.close()
