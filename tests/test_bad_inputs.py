"""Bad input: each a clear error naming the argument, what was expected and what was found."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime import (
    KandinskyImg2ImgPipeline, KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline)
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.components import Components, PipelineInputError
from kandinsky_trt.runtime.image_processing import NonFiniteOutputError, postprocess
from kandinsky_trt.runtime import manifest as mf
from kandinsky_trt.runtime.manifest import ManifestError

E = 32
EMB = np.zeros((1, E), np.float32)


@pytest.fixture(scope="module")
def components(artifacts_fp32):
    with Components(artifacts_fp32[0]) as c:
        yield c


@pytest.fixture(scope="module")
def decoder(components):
    return KandinskyPipeline(components=components)


@pytest.mark.parametrize("kwargs, match", [
    (dict(height=128), r"height/width: these artifacts were exported for 64x64 \(profile b1_64x64_cfg\); found 128x64"),
    (dict(width=0), r"width: expected an integer >= 1, found 0"),
    (dict(num_inference_steps=0), r"num_inference_steps: expected an integer >= 1, found 0"),
    (dict(num_images_per_prompt=0), r"num_images_per_prompt: expected an integer >= 1, found 0"),
    (dict(output_type="pt"), r"output_type: expected one of \('pil', 'np'\), found 'pt'"),
    (dict(scheduler="euler"), r"scheduler: expected one of \('ddim', 'ddpm', 'dpmpp2m'\), found 'euler'"),
    (dict(negative_prompt=["a", "b"]), r"negative_prompt: expected 1 prompts \(one per prompt\), found 2"),
    (dict(latents=np.zeros((1, 4, 16, 16))), r"latents: expected shape \(1, 4, 8, 8\), found \(1, 4, 16, 16\)"),
    (dict(image_embeds=np.zeros((2, E))), r"image_embeds: expected 1 rows \(one per prompt\), found shape \(2, 32\)"),
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


def test_guidance_needs_a_cfg_profile(tmp_path, artifacts_fp32):
    out = tmp_path / "art"
    shutil.copytree(artifacts_fp32[0], out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["profile"]["cfg"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PipelineInputError, match="guidance_scale: .*without classifier-free guidance.*found 4.0"):
        KandinskyPipeline(out)("a", EMB, EMB, height=64, width=64, num_inference_steps=1)


def test_unknown_backend(artifacts_fp32):
    with pytest.raises(PipelineInputError, match=r"backend: expected one of \('ort', 'torch', 'trt'\), found 'tvm'"):
        Components(artifacts_fp32[0], backend="tvm")


def test_missing_manifest(tmp_path):
    with pytest.raises(ManifestError, match="run `kandinsky-trt export` first"):
        KandinskyPipeline(tmp_path)


def test_missing_and_corrupt_onnx(tmp_path, artifacts_fp32):
    out = tmp_path / "art"
    shutil.copytree(artifacts_fp32[0], out)
    files = {n: e.onnx for n, e in mf.load_manifest(out).networks.items()}  # content-addressed names
    (out / files["unet"]).unlink()
    with Components(out) as c:
        with pytest.raises(BackendError, match=r"unet: expected the ONNX file .*unet\.[0-9a-f]{16}\.onnx, found no such file"):
            c.session("unet")
    (out / files["movq_decoder"]).write_bytes(b"garbage")
    with Components(out) as c:
        with pytest.raises(BackendError, match="movq_decoder: .*does not match the manifest's sha256"):
            c.session("movq_decoder")


def test_wrong_feed_shape_is_named(components):
    session = components.session("movq_decoder")
    with pytest.raises(BackendError, match=r"movq_decoder.latents: expected float32\[1, 4, 8, 8\], found float32\[1, 4, 9, 8\]"):
        session.run({"latents": np.zeros((1, 4, 9, 8), np.float32)})


def test_non_finite_output_is_an_error_not_a_black_image():
    images = np.zeros((2, 3, 8, 8), np.float32)
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteOutputError, match=r"NaN/Inf values in image\(s\) \[1\]"):
        postprocess(images, "pil")


def test_cli_reports_user_errors_without_traceback(tmp_path, capsys):
    from kandinsky_trt.runtime.cli import main

    assert main(["generate", "a cat", "--artifacts", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: artifacts: expected") and "Traceback" not in err
