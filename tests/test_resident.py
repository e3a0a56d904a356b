"""Device-resident stage chains: host syncs per image, and results equal to the host path (issue 19, item 5).

The TensorRT backend runs on the stand-in ``tensorrt`` module and simulated CUDA memory of
``tests/fakes``, with each engine's execution being ONNX Runtime (CPU) on the tiny fp32 artifacts'
own graph: the pipelines' data movement (uploads, device-to-device copies, downloads, stream syncs)
is the backend's, the maths the real networks'. ``FakeStream.syncs`` counts the host
synchronisations. "Before" is the path every stage took before this change (host arrays between
stages: ``Components.resident_chain`` yielding None), measured here on the same stand-in:

=====================================  ======  =====
syncs per image (one chunk)            before  after
=====================================  ======  =====
text2img (``KandinskyPipeline``)            3      1
prior (``KandinskyPriorPipeline``)          2      1
combined (``KandinskyCombinedPipeline``)    5      1
img2img (``KandinskyImg2ImgPipeline``)      4      1
inpaint (``KandinskyInpaintPipeline``)      4      1
=====================================  ======  =====

The prior's sync is its embeddings' download (the pipeline's output; the CLIP mean/std post-processing
runs on the device, the ``prior_embeds`` bridge graph); in the combined pipeline the embeddings stay on
the device. img2img's and inpainting's start (MoVQ encoding, then the ``img2img_start`` /
``inpaint_start`` bridge graph) runs on the device too. A chunk of several images costs the same (one
download per chunk).

ONNX Runtime's device backend (``OrtCudaBackend``) runs on its CPU execution provider, with the
resident chain forced on (``copies_on_device``; it is off there, as its copies go through the host):
it must equal the host path bit for bit, and its device-to-host hops (``OrtValue.numpy`` of bound
buffers plus host-level ``InferenceSession.run`` calls: each a synchronous download on CUDA) are
counted, which is why the chain stays off on ONNX Runtime. Forced on, every golden case (all seven
pipelines and interpolate, at four profiles) must still give the recorded host-path outputs.
None of this was run on a GPU.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from contextlib import contextmanager

import numpy as np
import onnxruntime as ort
import pytest
from fakes.cuda import FakeCuda, FakeMemory
from fakes.tensorrt import TRT_VERSION, FakeEngine, install
from PIL import Image

from kandinsky_trt.runtime.backends.base import BackendError, DeviceRows
from kandinsky_trt.runtime.backends.ort import OrtBackend
from kandinsky_trt.runtime.backends.ort_cuda import OrtCudaBackend
from kandinsky_trt.runtime.backends.resident import ResidentStages
from kandinsky_trt.runtime.backends.trt_engine import TensorInfo
from kandinsky_trt.runtime.contract.manifest import load_manifest
from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.pipelines import loaded as loaded_module
from kandinsky_trt.runtime.pipelines.combined import KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.decoder import (KandinskyImg2ImgPipeline, KandinskyInpaintPipeline,
                                                     KandinskyPipeline)
from kandinsky_trt.runtime.pipelines.prior import KandinskyPriorPipeline

CUDA_OPS = ("memcpy_d2d", "begin_capture", "end_capture", "instantiate", "launch", "destroy_graph",
            "destroy_graph_exec")
ARENA = 256  # one size for every engine: the arena grows (and syncs) only at the first load
STEPS = 3


def _with_plans(source, directory) -> None:
    """A copy of ``source`` whose manifest records a built plan ``b"plan:<name>"`` for every network."""
    shutil.copytree(source, directory)
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    for entry in manifest["networks"]:
        plan = f"plan:{entry['name']}".encode()
        (directory / f"{entry['name']}.plan").write_bytes(plan)
        entry["engine"] = {"file": f"{entry['name']}.plan", "sha256": hashlib.sha256(plan).hexdigest(),
                           "tensorrt_version": TRT_VERSION, "gpu_name": "NVIDIA H100 80GB HBM3",
                           "compute_capability": "9.0", "onnx_sha256": entry["onnx_sha256"],
                           "device_memory_bytes": ARENA, "profiles": [0] * len(manifest["profiles"])}
    path.write_text(json.dumps(manifest))


def _stand_in(source, directory, monkeypatch):
    """``source`` artifacts as TensorRT plans on the stand-ins; engines execute the ONNX graphs (ORT CPU).
    Returns the host backend the engines run on (the caller closes it)."""
    _with_plans(source, directory)
    manifest = load_manifest(directory)
    host = OrtBackend(manifest)
    memory = FakeMemory(1 << 26)
    memory.bytes[:] = 0xFF  # cudaMalloc does not zero
    layer = FakeCuda(memory)

    def make_engine(name):
        net = manifest.network(name).resolved(0)
        tensors = ([TensorInfo(t.name, "input", t.dtype, t.shape) for t in net.inputs]
                   + [TensorInfo(t.name, "output", t.dtype, t.shape) for t in net.outputs])
        return FakeEngine(tensors, lambda **feeds: host.load(name).run(feeds), ARENA, memory, layer)

    install(monkeypatch, make_engine, memory)
    for name in CUDA_OPS:
        monkeypatch.setattr(cuda, name, getattr(layer, name))
    return host


@pytest.fixture()
def trt(artifacts_fp32, tmp_path, monkeypatch):
    """The tiny fp32 batch-1 artifacts on the TensorRT stand-in."""
    host = _stand_in(artifacts_fp32[0], tmp_path / "artifacts", monkeypatch)
    yield tmp_path / "artifacts"
    host.close()


@pytest.fixture()
def trt_b2(artifacts_fp32_b2_wide, tmp_path, monkeypatch):
    """The tiny fp32 batch-2 64x128 artifacts on the TensorRT stand-in: [uncond; cond] rows interleave."""
    host = _stand_in(artifacts_fp32_b2_wide[0], tmp_path / "artifacts", monkeypatch)
    yield tmp_path / "artifacts"
    host.close()


@contextmanager
def _host_hops(monkeypatch):
    """Yields no chain from ``Components.resident_chain``: every stage's output goes to the host (the old path)."""
    with monkeypatch.context() as patch:
        @contextmanager
        def no_chain(self):
            yield None

        patch.setattr(Components, "resident_chain", no_chain)
        yield


def _embeds(components: Components, seed: int = 0):
    rng = np.random.default_rng(seed)
    width = components.loaded.embedding_width
    return rng.standard_normal((1, width)).astype(np.float32), rng.standard_normal((1, width)).astype(np.float32)


def _calls(components: Components) -> dict:
    """One call per pipeline (batch-1 artifacts: one chunk, one image each), seeded, as numpy."""
    positive, negative = _embeds(components)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), np.float32)
    mask[16:48, 16:48] = 1
    return {
        "text2img": lambda: KandinskyPipeline(components=components)(
            "a cat", positive, negative, num_inference_steps=STEPS, generator=1, output_type="np").images,
        "prior": lambda: KandinskyPriorPipeline(components=components)(
            "a cat", num_inference_steps=STEPS, generator=1).image_embeds,
        "combined": lambda: KandinskyCombinedPipeline(components=components)(
            "a cat", num_inference_steps=STEPS, prior_num_inference_steps=STEPS, generator=1, output_type="np").images,
        "img2img": lambda: KandinskyImg2ImgPipeline(components=components)(
            "a cat", image, positive, negative, num_inference_steps=4, strength=0.5, generator=1,
            output_type="np").images,
        "inpaint": lambda: KandinskyInpaintPipeline(components=components)(
            "a cat", image, mask, positive, negative, num_inference_steps=STEPS, generator=1, output_type="np").images,
    }


def _syncs(components: Components, call) -> tuple[int, np.ndarray]:
    stream = components.backend.stream
    before = stream.syncs
    out = call()
    return stream.syncs - before, out


BEFORE = {"text2img": 3, "prior": 2, "combined": 5, "img2img": 4, "inpaint": 4}
AFTER = {"text2img": 1, "prior": 1, "combined": 1, "img2img": 1, "inpaint": 1}


def test_syncs_per_image_on_tensorrt_before_and_after(trt, artifacts_fp32, monkeypatch):
    """Stream syncs of one image per pipeline: the host-hop path (before) and the resident chain (after);
    both give the host path's (ONNX Runtime CPU) result bit for bit."""
    with Components(artifacts_fp32[0], backend="ort") as host:
        expected = {name: call() for name, call in _calls(host).items()}
    with Components(trt, backend="trt") as components:
        calls = _calls(components)
        for name, call in calls.items():
            call()  # loads the engines (the first load grows the arena: a sync), binds, captures
            with _host_hops(monkeypatch):
                call()
                before, old = _syncs(components, call)
            after, new = _syncs(components, call)
            assert (name, before, after) == (name, BEFORE[name], AFTER[name])
            assert old.tobytes() == expected[name].tobytes(), name
            assert new.tobytes() == expected[name].tobytes(), name


def test_two_chunks_cost_one_sync_each(trt):
    """Two prompts on batch-1 artifacts: two chunks, one download (and sync) each."""
    with Components(trt, backend="trt") as components:
        pipe = KandinskyPipeline(components=components)
        positive, negative = _embeds(components)
        run = lambda: pipe(["a cat", "a dog"], np.repeat(positive, 2, 0), np.repeat(negative, 2, 0),  # noqa: E731
                           num_inference_steps=STEPS, generator=1, output_type="np").images
        run()
        assert _syncs(components, run)[0] == 2


def _batch_two_cases(components: Components) -> dict:
    """Three rows per call on batch-2 artifacts (a full chunk and a padded one), by case name.

    Combined text2img: each row's conditioning at rows j and B + j (device rows copied run by run);
    guidance <= 1 repeats the cond rows on the device; the prior's embeddings stay on the device and
    the decoder gathers its rows from the prior's kept chunks (with a negative prompt the prior samples
    the negatives too: six prior rows in three chunks, a decoder chunk's negatives from another chunk
    than its positives). img2img and inpaint start on the device (MoVQ-encode each chunk's distinct
    images, gather every row's latents, the bridge graph): one image per prompt (three prompts), or
    one image for three images of one prompt (its latents gathered into several rows)."""
    rng = np.random.default_rng(5)
    images = [Image.fromarray(rng.integers(0, 255, (64, 128, 3), dtype=np.uint8)) for _ in range(3)]
    mask = np.zeros((64, 128), np.float32)
    mask[16:48, 32:96] = 1
    embeds = rng.standard_normal((2, 3, components.loaded.embedding_width)).astype(np.float32)
    three = ["a cat", "a dog", "a fox"]
    steps = dict(num_inference_steps=STEPS, generator=2, output_type="np")
    per_prompt = dict(num_inference_steps=4, generator=4, output_type="np", negative_prompt="blurry")
    one_image = dict(per_prompt, num_images_per_prompt=3)
    combined = KandinskyCombinedPipeline(components=components)
    img2img, inpaint = KandinskyImg2ImgPipeline(components=components), KandinskyInpaintPipeline(components=components)
    img2img_combined = KandinskyImg2ImgCombinedPipeline(components=components)
    return {
        "combined-guided": lambda: combined(three, prior_num_inference_steps=STEPS, **steps).images,
        "combined-unguided": lambda: combined(three, prior_num_inference_steps=STEPS, guidance_scale=1.0,
                                              prior_guidance_scale=1.0, **steps).images,
        "combined-sampled-negatives": lambda: combined(three, negative_prompt="blurry",
                                                       prior_num_inference_steps=STEPS, **steps).images,
        "img2img-image-per-prompt": lambda: img2img(three, images, embeds[0], embeds[1], strength=0.6,
                                                    **per_prompt).images,
        "inpaint-image-per-prompt": lambda: inpaint(three, images, [mask] * 3, embeds[0], embeds[1],
                                                    **per_prompt).images,
        "inpaint-one-image": lambda: inpaint("a cat", images[0], mask, embeds[0, :1], embeds[1, :1],
                                             **one_image).images,
        "img2img-combined-one-image": lambda: img2img_combined("a cat", images[0], prior_num_inference_steps=STEPS,
                                                               strength=0.6, **one_image).images,
    }


def test_batch_two_chunks_with_padding_equal_the_host_path(trt_b2, artifacts_fp32_b2_wide):
    """Every case of :func:`_batch_two_cases`: bit for bit the host path's images, one sync per chunk
    (its images) and none for the prior's embeddings or the MoVQ encoder's latents."""
    with Components(artifacts_fp32_b2_wide[0], backend="ort") as host:
        expected = {name: call() for name, call in _batch_two_cases(host).items()}
    with Components(trt_b2, backend="trt") as components:
        for name, call in _batch_two_cases(components).items():
            call()  # the first call of a shape loads and binds
            syncs, got = _syncs(components, call)
            assert (name, syncs) == (name, 2)
            assert got.shape == (3, 64, 128, 3) and got.tobytes() == expected[name].tobytes(), name


def test_artifacts_without_the_bridge_graph_keep_the_host_post_processing(artifacts_fp32, tmp_path, monkeypatch):
    """Artifacts exported before the ``prior_embeds`` bridge graph (no such network in the manifest)
    still run on the chain: the prior's embeddings are downloaded and post-processed in numpy, one
    sync more for the combined pipeline, and the same bits."""
    source = tmp_path / "without"
    shutil.copytree(artifacts_fp32[0], source)
    manifest = json.loads((source / "manifest.json").read_text())
    (entry,) = [n for n in manifest["networks"] if n["name"] == "prior_embeds"]
    manifest["networks"].remove(entry)
    del manifest["files"][entry["onnx"]]
    (source / entry["onnx"]).unlink()
    (source / "manifest.json").write_text(json.dumps(manifest))
    host = _stand_in(source, tmp_path / "artifacts", monkeypatch)
    try:
        with Components(artifacts_fp32[0], backend="ort") as reference:
            expected = {name: _calls(reference)[name]() for name in ("prior", "combined")}
        with Components(tmp_path / "artifacts", backend="trt") as components:
            assert not components.loaded.has("prior_embeds")
            for name, syncs in (("prior", 1), ("combined", 2)):
                call = _calls(components)[name]
                call()
                assert _syncs(components, call)[0] == syncs, name
                assert call().tobytes() == expected[name].tobytes(), name
    finally:
        host.close()


def test_loop_into_device_rows_is_checked(trt):
    """``SlotLoop.run(into=...)`` takes one device row per row and no callback; host loops copy nothing."""
    from kandinsky_trt.runtime.contract.loop_specs import UNET_LOOP
    from kandinsky_trt.runtime.loops.host import HostStorage
    from kandinsky_trt.runtime.loops.slots import SlotLoop
    from kandinsky_trt.runtime.loops.template import LoopInputs, chunk_rows

    with Components(trt, backend="trt") as components:
        backend, table = components.backend, components.loaded.scheduler("decoder", 2)
        net, step = backend.load("unet").network, backend.load("unet_step").network
        rng = np.random.default_rng(0)
        conditioning = {t.name: rng.standard_normal(t.shape).astype(t.dtype)
                        for t in net.inputs if t.name not in ("sample", "timestep")}
        inputs = LoopInputs(rng.standard_normal(step.tensor("latents").shape).astype(np.float32), conditioning,
                            {}, None, 4.0)
        rows = chunk_rows(inputs, table)
        with components.resident_chain() as chain:
            into = chain.stage_input("movq_decoder", "latents", inputs.latents)
            with SlotLoop(UNET_LOOP, HostStorage(UNET_LOOP, backend.load("unet"), backend.load("unet_step"))) as host:
                expected = host.run(rows)
                with pytest.raises(BackendError, match="HostStorage: expected a device storage"):
                    host.run(rows, into=into)
            got = chain.denoise(UNET_LOOP, table, inputs, into)
            (loop,) = components._loops.values()
            with pytest.raises(BackendError, match=r"into: expected 1 device rows and no callback, found 1 rows "
                                                   r"and a callback"):
                loop.run(rows, lambda *a: None, into=into)
            assert got is into and chain.download(got, "latents").tobytes() == expected.tobytes()


def test_device_start_rows_are_checked(trt):
    """A loop row's start latents on the device are one row of the latents' shape; with step extras
    (inpaint) its first network input row must come with them; both checked before anything is written."""
    from dataclasses import replace

    from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, UNET_LOOP
    from kandinsky_trt.runtime.loops.template import LoopInputs, chunk_rows

    with Components(trt, backend="trt") as components:
        table = components.loaded.scheduler("decoder", 2)
        with components.resident_chain() as chain:
            for spec in (UNET_LOOP, INPAINT_LOOP):
                backend = components.backend
                net, step = backend.load(spec.network).network, backend.load(spec.step).network
                latents = chain.stage_input("movq_decoder", "latents", np.zeros(step.tensor("latents").shape))
                conditioning = {t.name: np.zeros(t.shape, t.dtype)
                                for t in net.inputs if t.name not in ("sample", "timestep")}
                extras = {t.name: np.zeros(t.shape, t.dtype) for t in step.inputs if t.name == "conditioning"}
                (row,) = chunk_rows(LoopInputs(latents, conditioning, extras, None, 4.0), table)
                assert len(row.latents) == 1

                def admit(r, spec=spec, latents=latents):
                    return components.with_loop(spec, latents, lambda loop: loop.admit(r))

                if spec is INPAINT_LOOP:
                    with pytest.raises(BackendError, match="first_input: expected the first network input's "
                                                           "device row"):
                        admit(row)
                    sample = backend.load(spec.network).network.tensor("sample")
                    wrong = chain.gather("sample", [np.zeros((1, 4, *sample.shape[2:]), np.float32)])
                    with pytest.raises(BackendError, match=r"first_input: expected float32\[1, 9, 8, 8\], "
                                                           r"found float32\[1, 4, 8, 8\]"):
                        admit(replace(row, first_input=wrong))
                else:
                    with pytest.raises(BackendError, match=r"latents: expected float32\[1, 4, 8, 8\], "
                                                           r"found float32\[2, 4, 8, 8\]"):
                        admit(replace(row, latents=latents[[0, 0]]))
                    components.with_loop(spec, latents, lambda loop: loop.release(loop.admit(row)))


def test_a_step_callback_takes_the_host_path(trt):
    """A callback downloads the latents every step, so that call keeps the host hops (3 + one per step)."""
    with Components(trt, backend="trt") as components:
        positive, negative = _embeds(components)
        pipe = KandinskyPipeline(components=components)
        run = lambda: pipe("a cat", positive, negative, num_inference_steps=STEPS, generator=1,  # noqa: E731
                           output_type="np", callback=lambda *a: None)
        run()
        assert _syncs(components, run)[0] == 3 + STEPS


# -- ONNX Runtime's device backend on the CPU EP ------------------------------------------------------


class _Hops:
    """Device-to-host hops of ONNX Runtime: bound buffers read (``OrtValue.numpy``) and host-level runs."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        numpy, run = ort.OrtValue.numpy, ort.InferenceSession.run

        def counted_numpy(value):
            self.count += 1
            return numpy(value)

        def counted_run(session, *args, **kwargs):
            self.count += 1
            return run(session, *args, **kwargs)

        monkeypatch.setattr(ort.OrtValue, "numpy", counted_numpy)
        monkeypatch.setattr(ort.InferenceSession, "run", counted_run)

    def of(self, call) -> tuple[int, np.ndarray]:
        before = self.count
        out = call()
        return self.count - before, out


ORT_BEFORE = {"text2img": 3, "prior": 2, "combined": 5, "img2img": 4, "inpaint": 4}
# Each device-rows write is a host hop on ONNX Runtime (no device-to-device copy in its Python API):
# text2img: text encoder outputs x2, the retired latents, the image; prior: encoder outputs x2, the
# retired latents, the bridge graph's input, its kept copy, the embeddings' download; combined: the
# prior's hops but the download, the decoder's text2img hops and its gathered image embeddings (written
# into a buffer, then into the loop): 13; img2img/inpaint: text2img's plus the MoVQ latents gathered into
# the bridge graph's input and its two outputs admitted (img2img: the latents into the state and the
# first network input; inpaint: the step-graph conditioning and the first network input): 7.
ORT_AFTER = {"text2img": 4, "prior": 6, "combined": 13, "img2img": 7, "inpaint": 7}


def test_ort_device_backend_equals_the_host_path_and_counts_its_hops(artifacts_fp32, monkeypatch):
    """The resident chain on ``OrtCudaBackend`` (CPU EP, forced on) gives the host path's results bit
    for bit; its host hops are counted: ONNX Runtime's Python API keeps a download per device-rows
    write, so the chain would cost more hops than the host path (why it is off there)."""
    with Components(artifacts_fp32[0], backend="ort") as host:
        expected = {name: call() for name, call in _calls(host).items()}
    monkeypatch.setattr(loaded_module, "make_backend", lambda name, manifest, device: OrtCudaBackend(manifest, "cpu"))
    hops = _Hops(monkeypatch)
    with Components(artifacts_fp32[0], backend="ort") as components:
        backend = components.backend
        assert isinstance(backend, OrtCudaBackend) and not backend.copies_on_device
        for name, call in _calls(components).items():
            call()
            before, old = hops.of(call)  # the chain is off on ONNX Runtime: the host path
            backend.copies_on_device = True  # forced on: the resident chain over host hops
            call()
            after, new = hops.of(call)
            backend.copies_on_device = False
            assert (name, before, after) == (name, ORT_BEFORE[name], ORT_AFTER[name])
            assert old.tobytes() == new.tobytes() == expected[name].tobytes(), name


def test_stage_feeds_are_checked_and_rows_selected(artifacts_fp32):
    """Resident stage runs take exactly the network's inputs; device rows select rows like numpy."""
    with OrtCudaBackend(load_manifest(artifacts_fp32[0]), "cpu") as backend:
        stages = ResidentStages(backend)
        net = backend.load("movq_decoder").network
        latents = np.random.default_rng(0).standard_normal(net.tensor("latents").shape).astype(np.float32)
        with pytest.raises(BackendError, match=r"movq_decoder: inputs expected \['latents'\], found \[\]"):
            stages.run("movq_decoder", {})
        with pytest.raises(BackendError, match=r"movq_decoder.latents: expected float32\[1, 4, 8, 8\], found float64"):
            stages.run("movq_decoder", {"latents": latents.astype(np.float64)})
        image = stages.run("movq_decoder", {"latents": latents})["image"]
        assert isinstance(image, DeviceRows) and image.shape == net.tensor("image").shape
        expected = backend.load("movq_decoder").run({"latents": latents})["image"]
        np.testing.assert_array_equal(stages.download(image), expected)
        rows = DeviceRows(None, net.tensor("image"), [0, 0, 0])
        assert rows[1:].rows == (0, 0) and rows.runs() == [(0, 1), (0, 1), (0, 1)]
        assert DeviceRows(None, net.tensor("image"), [2, 3, 5]).runs() == [(2, 2), (5, 1)]
        stages.close()
        stages.close()


def test_every_golden_case_on_a_forced_chain_equals_the_recorded_outputs(artifacts_fp32_multi, monkeypatch):
    """Every pipeline of the golden cases (prior, interpolate, the three decoders, the three combined;
    2 sizes x 2 batches) on ``OrtCudaBackend`` (CPU EP) with the resident chain forced on: the outputs
    recorded on the host path (tests/golden/fp32_multi), bit for bit on a CPU of the recorded class."""
    from golden_outputs import assert_equals_recorded, run_cases

    def chained_backend(name, manifest, device):
        backend = OrtCudaBackend(manifest, "cpu")
        backend.copies_on_device = True
        return backend

    monkeypatch.setattr(loaded_module, "make_backend", chained_backend)
    chains = []
    original = Components.resident_chain

    @contextmanager
    def counted(self):
        with original(self) as chain:
            chains.append(chain)
            yield chain

    monkeypatch.setattr(Components, "resident_chain", counted)
    artifacts = artifacts_fp32_multi[0]
    outputs = run_cases(artifacts, load_manifest(artifacts).sizes())
    assert chains and all(chain is not None for chain in chains)
    assert_equals_recorded("fp32_multi", outputs, "the resident chain")
