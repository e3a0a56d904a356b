"""Bad API arguments (issue 8, kinds 1 and 6): a one-line ``KandinskyTrtError`` naming the argument,
what was expected and what was found, raised before any network runs.

The sweep tries every hostile value of :data:`BAD` on every pipeline that takes that argument
(found from the call signatures, so a new pipeline or argument is covered without a new test), on a
``Components`` whose networks refuse to load: an error raised after any network ran fails the test.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime import (
    KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline, KandinskyImg2ImgPipeline,
    KandinskyInpaintCombinedPipeline, KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline)
from kandinsky_trt.runtime.pipelines.components import Components, PipelineInputError
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.pipelines.inputs import MAX_IMAGES_PER_CALL, min_strength

E = 32
EMB = np.zeros((1, E), np.float32)
PICTURE = Image.new("RGB", (64, 64), (120, 30, 200))
MASK = np.zeros((64, 64), np.float32)
nan, inf = float("nan"), float("inf")


@pytest.fixture(scope="module")
def components(artifacts_fp32):
    with Components(artifacts_fp32[0]) as c:
        yield c


@pytest.fixture
def offline(components, monkeypatch):
    """The shared components with every network refusing to load: validation must not need one."""
    def refuse(network, profile=0):
        raise AssertionError(f"{network} was loaded before the bad argument was refused")

    monkeypatch.setattr(components, "session", refuse)
    return components


@pytest.fixture(scope="module")
def decoder(components):
    return KandinskyPipeline(components=components)


def _truncated_png(tmp_path_factory) -> Image.Image:
    path = tmp_path_factory.mktemp("broken") / "mask.png"
    Image.new("L", (64, 64), 255).save(path)
    path.write_bytes(path.read_bytes()[:-20])
    return Image.open(path)  # PIL opens lazily: the damage shows when the pixels are read


STEP = dict(num_inference_steps=2)
TEXT = dict(prompt="a cat", height=64, width=64, output_type="np", **STEP)
EMBEDS = dict(image_embeds=EMB, negative_image_embeds=EMB)
PIPELINES = {  # name: (factory, method, valid call)
    "prior": (KandinskyPriorPipeline, "__call__", dict(prompt="a cat", **STEP)),
    "interpolate": (KandinskyPriorPipeline, "interpolate",
                    dict(images_and_prompts=["a cat", PICTURE], weights=[0.5, 0.5], **STEP)),
    "text2img": (KandinskyPipeline, "__call__", TEXT | EMBEDS),
    "img2img": (KandinskyImg2ImgPipeline, "__call__", TEXT | EMBEDS | dict(image=PICTURE, strength=0.5)),
    "inpaint": (KandinskyInpaintPipeline, "__call__", TEXT | EMBEDS | dict(image=PICTURE, mask_image=MASK)),
    "combined": (KandinskyCombinedPipeline, "__call__", TEXT | dict(prior_num_inference_steps=2)),
    "combined_img2img": (KandinskyImg2ImgCombinedPipeline, "__call__",
                         TEXT | dict(prior_num_inference_steps=2, image=PICTURE, strength=0.5)),
    "combined_inpaint": (KandinskyInpaintCombinedPipeline, "__call__",
                         TEXT | dict(prior_num_inference_steps=2, image=PICTURE, mask_image=MASK)),
}
_SCALES = ["4", None, nan, inf, -inf, True, [4.0], 1j, np.array(4.0)]
_STEPS = [0, -1, 2.5, "2", True, None, 10**9]
_ARRAYS = ["abc", None, 3.0, np.zeros((1, 2)), [[1.0, 2.0], [3.0]], np.array(["a"]), np.zeros((1, E), complex),
           np.zeros((1, E), bool), {"a": 1}]
_EMBEDS = ["x", None, np.zeros((1, 7)), np.zeros((2, E)), np.full((1, E), nan), np.zeros((1, 1, E)),
           np.full((1, E), 1e39), [np.zeros(E), "a"]]
_IMAGES = [None, "x.png", Image.new("RGB", (0, 0)), Image.new("RGB", (0, 64)), np.zeros((0, 0, 3), np.uint8),
           np.full((64, 64, 3), 2.0), np.zeros((64, 64), np.uint8), [], 3]
BAD = {
    "guidance_scale": _SCALES, "prior_guidance_scale": _SCALES,
    "num_inference_steps": _STEPS, "prior_num_inference_steps": _STEPS,
    "num_images_per_prompt": [0, -3, MAX_IMAGES_PER_CALL + 1, 10**9, "2", 1.5, None],
    "generator": [-1, -(2**70), "x", True, 1.5, [1], np.random.RandomState(0)],
    "latents": [a for a in _ARRAYS if a is not None], "decoder_latents": [a for a in _ARRAYS if a is not None],
    "noise": [a for a in _ARRAYS if a is not None],
    "step_noise": ["abc", np.zeros((5, 5)), 3], "prior_step_noise": ["abc", np.zeros((5, 5))],
    "callback": ["print", 3, object()], "callback_steps": [0, -1, "1", None, 1.5],
    "output_type": [3, None, "latent", ["np"]],
    "prompt": [None, 3, [], ["a", 3], "a\ud800", b"a cat", ["ok", "\udcff"], ("a", None)],
    "negative_prompt": [3, ["a", "b"], "\udcff", [None]],
    "negative_prior_prompt": [3, ["a", "b"], "\ud800"],
    "image_embeds": _EMBEDS, "negative_image_embeds": _EMBEDS,
    "strength": [nan, inf, "0.5", None, 0, 0.0, 1.5, -0.1, True, 0.01],
    "image": _IMAGES,
    "mask_image": [None, "m.png", Image.new("L", (0, 0)), np.zeros((64, 64, 3, 3)), np.full((64, 64), nan),
                   np.full((64, 64), 3.0), "truncated"],
    "scheduler": ["euler", 3, ["ddim"]],
    "weights": [None, "1", [nan, 1.0], ["x", 1.0], [1.0], [1.0, 2.0, 3.0], [inf, 0.0], [True, 1.0]],
    "images_and_prompts": ["ab", [], [3, "a"], [None], ["\ud800", "a"]],
    "height": [0, -64, "64", 64.0], "width": [0, -64, "64", 64.0],
}
NAME_ALIASES = {"height": "height|height/width", "width": "width|height/width"}


def _cases():
    for pipe, (factory, method, _) in PIPELINES.items():
        params = inspect.signature(getattr(factory, method)).parameters
        for arg, values in BAD.items():
            if arg in params:
                for i, value in enumerate(values):
                    yield pytest.param(pipe, arg, value, id=f"{pipe}-{arg}-{i}")


CASES = list(_cases())


def test_the_sweep_is_large():
    """Every pipeline is swept, and every argument kind in BAD is used by some pipeline."""
    assert {c.values[0] for c in CASES} == set(PIPELINES)
    assert {c.values[1] for c in CASES} == set(BAD)
    assert len(CASES) > 400


@pytest.mark.parametrize("pipe, arg, value", CASES)
def test_bad_argument_is_refused_before_any_network(pipe, arg, value, offline, tmp_path_factory):
    factory, method, call = PIPELINES[pipe]
    if isinstance(value, str) and value == "truncated":
        value = _truncated_png(tmp_path_factory)
    with pytest.raises(KandinskyTrtError) as caught:
        getattr(factory(components=offline), method)(**(call | {arg: value}))
    message = str(caught.value)
    assert "\n" not in message, message
    name = NAME_ALIASES.get(arg, arg)
    assert re.match(rf"({name})(\[\d+\])?: expected .*found", message), message


def test_valid_calls_pass_validation(offline):
    """The sweep's base calls are valid: each fails only when it reaches the first network."""
    for pipe, (factory, method, call) in PIPELINES.items():
        with pytest.raises(AssertionError, match="was loaded before"):
            getattr(factory(components=offline), method)(**call)


@pytest.mark.parametrize("pipe, arg, shape", [
    ("prior", "latents", (1, E)), ("text2img", "latents", (1, 4, 8, 8)), ("inpaint", "latents", (1, 4, 8, 8)),
    ("img2img", "noise", (1, 4, 8, 8)), ("combined", "decoder_latents", (1, 4, 8, 8)),
    ("combined", "latents", (1, E)), ("combined_img2img", "noise", (1, 4, 8, 8)),
    ("interpolate", "latents", (1, E)),
])
@pytest.mark.parametrize("fill", [nan, inf, 1e39])  # 1e39 overflows float32
def test_non_finite_arrays_of_the_right_shape(pipe, arg, shape, fill, offline):
    factory, method, call = PIPELINES[pipe]
    with pytest.raises(PipelineInputError, match=rf"^{arg}: expected finite values, found \d+ NaN/Inf"):
        getattr(factory(components=offline), method)(**(call | {arg: np.full(shape, fill)}))


def test_num_images_bound_counts_every_prompt(offline):
    with pytest.raises(PipelineInputError, match=rf"at most {MAX_IMAGES_PER_CALL} images per call .* found 5 x 13"):
        KandinskyPriorPipeline(components=offline)(["a"] * 5, num_images_per_prompt=13)
    with pytest.raises(PipelineInputError, match=r"num_images_per_prompt: expected an integer <= 64, found 1000000000"):
        KandinskyCombinedPipeline(components=offline)("a", num_images_per_prompt=10**9, **STEP)


@pytest.mark.parametrize("steps", [2, 3, 7, 10, 30, 100, 999])
def test_tiny_strength_names_the_minimum_that_runs_a_step(steps, offline):
    """diffusers silently runs no step (or noises at t = 999); here the error says the minimum."""
    minimum = min_strength(steps, 1000)
    assert int(steps * minimum) >= 1 and int(1000 * minimum) >= 2
    assert max(1.0 / steps, 0.002) <= minimum <= 1.01 * max(1.0 / steps, 0.002)  # rounded up, 3 digits
    below = minimum / 2
    pipe = KandinskyImg2ImgPipeline(components=offline)
    call = PIPELINES["img2img"][2] | dict(num_inference_steps=steps)
    with pytest.raises(PipelineInputError, match=rf"^strength: expected >= {minimum} with num_inference_steps="
                                                 rf"{steps} .*which runs no step"):
        pipe(**(call | dict(strength=below)))
    with pytest.raises(AssertionError, match="was loaded before"):  # the minimum itself is accepted
        pipe(**(call | dict(strength=minimum)))


def test_combined_names_its_own_arguments(offline):
    """The combined pipelines hand arguments on under inner names; errors use the caller's names."""
    pipe = KandinskyCombinedPipeline(components=offline)
    with pytest.raises(PipelineInputError, match=r"^prior_guidance_scale: expected a finite number, found nan"):
        pipe(**(TEXT | dict(prior_guidance_scale=nan)))
    with pytest.raises(PipelineInputError, match=r"^decoder_latents: expected shape \(1, 4, 8, 8\), found \(1, 4\)"):
        pipe(**(TEXT | dict(decoder_latents=np.zeros((1, 4)))))
    with pytest.raises(PipelineInputError, match=r"^prior_step_noise: expected shape"):
        pipe(**(TEXT | dict(prior_step_noise=np.zeros((1, 1)))))


# -- the cases of the first bad-input suite (kept assertion for assertion) -------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=128), r"height/width: expected a size these artifacts hold \(width x height: 64x64\), found width 64 "
                       r"x height 128 \(served as 64x128\)"),
    (dict(width=0), r"width: expected an integer >= 1, found 0"),
    (dict(num_inference_steps=0), r"num_inference_steps: expected an integer >= 1, found 0"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt: expected an integer >= 1, found 0"),
    (dict(output_type="pt"), r"output_type: expected one of \('pil', 'np'\), found 'pt'"),
    (dict(scheduler="euler"), r"scheduler: expected one of \('ddim', 'ddpm', 'dpmpp2m'\), found 'euler'"),
    (dict(negative_prompt=["a", "b"]), r"negative_prompt: expected 1 prompts \(one per prompt\), found 2"),
    (dict(latents=np.zeros((1, 4, 16, 16))), r"latents: expected shape \(1, 4, 8, 8\), found \(1, 4, 16, 16\)"),
    (dict(image_embeds=np.zeros((2, E))), r"image_embeds: expected 1 rows \(one per prompt\), found shape \(2, 32\)"),
    # issue 8 reproductions
    (dict(guidance_scale="4"), r"guidance_scale: expected a finite number, found '4'"),
    (dict(guidance_scale=nan), r"guidance_scale: expected a finite number, found nan"),
    (dict(latents="abc"), r"latents: expected a float array, found str"),
    (dict(image_embeds=np.zeros((1, 7))), r"image_embeds: expected shape \(1, 32\), found \(1, 7\)"),
    (dict(generator=-1), r"generator: expected a seed >= 0, found -1"),
    (dict(callback="print"), r"callback: expected a callable \(i, t, latents\) or None, found 'print'"),
    (dict(num_images_per_prompt=10**9), r"num_images_per_prompt: expected an integer <= 64, found 1000000000"),
    (dict(prompt="a \ud800 cat"), r"prompt: expected valid Unicode text, found the lone surrogate '\\ud800'"),
])
def test_decoder_argument_errors(decoder, kwargs, match):
    call = dict(prompt="a cat", image_embeds=EMB, negative_image_embeds=EMB, height=64, width=64,
                num_inference_steps=2) | kwargs
    with pytest.raises(PipelineInputError, match=match):
        decoder(**call)


def test_sizes_round_up_to_64_like_diffusers(decoder):
    """Not an error: diffusers decodes ceil(h/64)*64 pixels; 50x60 runs on 64x64 artifacts."""
    images = decoder("a cat", EMB, EMB, height=50, width=60, num_inference_steps=1, output_type="np").images
    assert images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("prompt, match", [
    ([], r"prompt: expected at least one prompt, found an empty list"),
    (3, r"prompt: expected a str or a list of str, found int"),
])
def test_prompt_errors(components, prompt, match):
    with pytest.raises(PipelineInputError, match=match):
        KandinskyPriorPipeline(components=components)(prompt, num_inference_steps=2)


@pytest.mark.parametrize("strength", [0.0, 1.5, -0.1])
def test_strength_outside_range(components, strength):
    pipe = KandinskyImg2ImgPipeline(components=components)
    with pytest.raises(PipelineInputError, match=rf"strength: expected a number in \(0, 1\], found {strength}"):
        pipe("a", Image.new("RGB", (64, 64)), EMB, EMB, height=64, width=64, strength=strength)


def test_inpaint_mask_size_mismatch(components):
    pipe = KandinskyInpaintPipeline(components=components)
    with pytest.raises(ValueError, match=r"image/mask: expected 64x64"):
        pipe("a", np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32), np.float32), EMB, EMB, height=64, width=64)


def test_zero_size_image_is_refused(components):
    """Accepted silently before issue 8."""
    pipe = KandinskyImg2ImgPipeline(components=components)
    with pytest.raises(KandinskyTrtError, match=r"^image: expected an image of at least 1x1 pixels, found 0x0"):
        pipe("a", Image.new("RGB", (0, 0)), EMB, EMB, height=64, width=64, num_inference_steps=4, strength=0.5)


def test_interpolate_weights_none(components):
    with pytest.raises(PipelineInputError, match=r"^weights: expected a list of 1 numbers, found NoneType"):
        KandinskyPriorPipeline(components=components).interpolate(["a cat"], None, num_inference_steps=2)


def test_guidance_needs_a_cfg_profile(tmp_path, artifacts_fp32, monkeypatch):
    out = tmp_path / "art"
    shutil.copytree(artifacts_fp32[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["profiles"][0]["cfg"] = False
    for net in manifest["networks"]:  # the resolved I/O of a profile without guidance: B2 = B
        for kind in ("inputs", "outputs"):
            for graph, tensor in zip(net[kind], net["profiles"][0][kind]):
                tensor["shape"] = [1 if dim == "B2" else size for dim, size in zip(graph["shape"], tensor["shape"])]
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineInputError, match="guidance_scale: .*without classifier-free guidance.*found 4.0"):
        KandinskyPipeline(out)("a", EMB, EMB, height=64, width=64, num_inference_steps=1)
    with Components(out) as c:
        with pytest.raises(PipelineInputError, match="guidance_scale: .*without classifier-free guidance.*found 1.5"):
            KandinskyPriorPipeline(components=c)("a", num_inference_steps=1, guidance_scale=1.5)
        monkeypatch.setattr(c, "session", lambda name, profile=0: (_ for _ in ()).throw(AssertionError(f"{name} reached")))
        for scale in (1.0, 0.5, -2.0):  # no guidance (diffusers' rule): such artifacts serve it
            with pytest.raises(AssertionError, match="text_encoder reached"):
                KandinskyPipeline(components=c)("a", EMB, EMB, height=64, width=64, num_inference_steps=1,
                                                guidance_scale=scale)


def test_unknown_backend(artifacts_fp32):
    with pytest.raises(PipelineInputError, match=r"backend: expected one of \('ort', 'torch', 'trt'\), found 'tvm'"):
        Components(artifacts_fp32[0], backend="tvm")
