"""A MoVQ with two levels, as in diffusers' own Kandinsky test configuration: scale factor 2, latent = H/2.

The scale factor comes from the checkpoint (``2 ** (levels - 1)``), is recorded in the manifest as
``model_dims.latent_scale`` and drives every latent shape and the size rounding (diffusers'
``get_new_h_w``: sides rounded up to a multiple of the factor squared, 4 here). The three decoder
pipelines match diffusers at the fp32 tolerance of ``test_pipelines``, at a size that is not a
multiple of 64.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, read_model_dims
from kandinsky_trt.runtime import KandinskyImg2ImgPipeline, KandinskyInpaintPipeline, KandinskyPipeline
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.manifest import load_manifest
from kandinsky_trt.runtime.contract.spec import Profile, SpecError
from pipeline_helpers import check_close, diffusers_pipelines, embeds, generator, max_diff, torch_draws
from test_pipelines import TOLERANCE

SIZE, SCALE, E = 48, 2, 32  # 48 px: a multiple of 2**2 but not of 64; latents 24x24
LATENT = SIZE // SCALE
TOL = TOLERANCE["artifacts_fp32"][1]


@pytest.fixture(scope="module")
def two_level_checkpoint(tmp_path_factory):
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path_factory.mktemp("tiny2") / "checkpoint", seed=0, movq_levels=2)
    return CheckpointDirs(ckpt.prior, ckpt.decoder, ckpt.inpaint)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, two_level_checkpoint):
    out = tmp_path_factory.mktemp("artifacts_movq2")
    profile = Profile(1, SIZE, SIZE, cfg=True)
    report = export_artifacts(ExportConfig(two_level_checkpoint, out, (profile,), "fp32", exporter="legacy", verify=True))
    assert report.passed
    return out


@pytest.fixture(scope="module")
def diffusers_pipes(two_level_checkpoint):
    return diffusers_pipelines(two_level_checkpoint, prior=False)


def _picture(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))


def test_scale_factor_is_read_and_recorded(two_level_checkpoint, artifacts, diffusers_pipes):
    assert read_model_dims(two_level_checkpoint).latent_scale == SCALE == diffusers_pipes["text2img"].movq_scale_factor
    manifest = load_manifest(artifacts)
    assert manifest.model_dims.latent_scale == SCALE
    assert manifest.network("movq_decoder").resolved().tensor("latents").shape == (1, 4, LATENT, LATENT)
    assert manifest.network("movq_encoder").resolved().tensor("image").shape == (1, 3, SIZE, SIZE)
    assert manifest.network("unet").resolved().tensor("sample").shape == (2, 4, LATENT, LATENT)


@pytest.mark.parametrize("levels", [0, 5, 2.0, True])
def test_bad_movq_levels_are_refused(tmp_path, levels):
    from kandinsky_trt.export.checkpoints import CheckpointError, write_tiny_checkpoint

    with pytest.raises(CheckpointError, match=f"movq_levels: expected an integer from 1 to 4, found {levels!r}"):
        write_tiny_checkpoint(tmp_path, movq_levels=levels)


def test_export_refuses_a_size_the_movq_cannot_make(two_level_checkpoint, tmp_path):
    config = ExportConfig(two_level_checkpoint, tmp_path / "out", (Profile(1, 50, SIZE),), "fp32")
    with pytest.raises(SpecError, match="height: expected a multiple of 4 .*scale factor 2 squared.*found 50"):
        export_artifacts(config)
    assert not (tmp_path / "out").exists()


def test_request_sizes_round_up_to_the_scale_factor_squared(artifacts):
    pipe = KandinskyPipeline(artifacts)
    emb = embeds(1, E, 1)
    with pytest.raises(PipelineInputError, match=r"width x height: 48x48\), found width 48 x height 49 \(served as 48x52\).*--size 48x52"):
        pipe("a cat", emb, emb, height=49, width=48, num_inference_steps=2)


def test_image_sizes_are_multiples_of_the_scale_factor():
    from kandinsky_trt.runtime.processing.images import ImageInputError, prepare_img2img_image, prepare_inpaint_inputs

    image = Image.new("RGB", (40, 40))
    assert prepare_img2img_image(image, 36, 38, scale_factor=2).shape == (1, 3, 36, 38)
    assert prepare_inpaint_inputs(image, image, 36, 38, scale_factor=2)[0].shape == (1, 3, 36, 38)
    with pytest.raises(ImageInputError, match=r"height: expected a positive multiple of 2 \(the MoVQ scale factor\)"):
        prepare_img2img_image(image, 37, 38, scale_factor=2)
    with pytest.raises(ImageInputError, match="width: expected a positive multiple of 8 .*found 36"):
        prepare_img2img_image(image, 64, 36)  # Kandinsky 2.1's factor by default, as diffusers'


def test_text2img(artifacts, diffusers_pipes, request):
    import torch

    prompts, steps = ["a red cat", "ein blaues Haus"], 3
    emb, neg = embeds(2, E, 1), embeds(2, E, 2)
    (latents,) = torch_draws([(2, 4, LATENT, LATENT)])
    # 46x45 rounds up to 48x48 in diffusers' get_new_h_w(46, 45, 2) and here
    ref = diffusers_pipes["text2img"](prompts, torch.from_numpy(emb), torch.from_numpy(neg), height=46, width=45,
                                      negative_prompt=["ugly", "dark"], num_inference_steps=steps, guidance_scale=4.0,
                                      latents=torch.from_numpy(latents), output_type="np").images
    ours = KandinskyPipeline(artifacts)(prompts, emb, neg, height=46, width=45, negative_prompt=["ugly", "dark"],
                                        num_inference_steps=steps, guidance_scale=4.0, latents=latents,
                                        output_type="np").images
    assert ours.shape == ref.shape == (2, SIZE, SIZE, 3)
    check_close(request.node.name, max_diff(ref, ours), TOL)


def test_img2img(artifacts, diffusers_pipes, request):
    import torch

    emb, neg, n, steps, strength = embeds(1, E, 3), embeds(1, E, 4), 2, 5, 0.6
    ref = diffusers_pipes["img2img"]("a frog", _picture(5), torch.from_numpy(emb), torch.from_numpy(neg),
                                     height=SIZE, width=SIZE, num_inference_steps=steps, strength=strength,
                                     num_images_per_prompt=n, generator=generator(), output_type="np").images
    (noise,) = torch_draws([(n, 4, LATENT, LATENT)])
    ours = KandinskyImg2ImgPipeline(artifacts)("a frog", _picture(5), emb, neg, height=SIZE, width=SIZE,
                                               num_inference_steps=steps, strength=strength, num_images_per_prompt=n,
                                               noise=noise, output_type="np").images
    assert ours.shape == ref.shape == (n, SIZE, SIZE, 3)
    check_close(request.node.name, max_diff(ref, ours), TOL)


def test_inpaint(artifacts, diffusers_pipes, request):
    import torch

    emb, neg, steps = embeds(1, E, 6), embeds(1, E, 7), 3
    mask = np.zeros((SIZE, SIZE), np.float32)
    mask[:24, 12:36] = 1  # repaint the top middle
    (latents,) = torch_draws([(1, 4, LATENT, LATENT)])
    ref = diffusers_pipes["inpaint"]("a hat", _picture(8), mask, torch.from_numpy(emb), torch.from_numpy(neg),
                                     height=SIZE, width=SIZE, num_inference_steps=steps, guidance_scale=4.0,
                                     latents=torch.from_numpy(latents), output_type="np").images
    ours = KandinskyInpaintPipeline(artifacts)("a hat", _picture(8), mask, emb, neg, height=SIZE, width=SIZE,
                                               num_inference_steps=steps, guidance_scale=4.0, latents=latents,
                                               output_type="np").images
    assert ours.shape == ref.shape == (1, SIZE, SIZE, 3)
    check_close(request.node.name, max_diff(ref, ours), TOL)
