"""Batch > 1 artifacts, non-square sizes, chunking, interpolate and the combined img2img / inpaint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kandinsky_trt.runtime import (
    KandinskyImg2ImgCombinedPipeline, KandinskyInpaintCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline)
from kandinsky_trt.runtime.pipelines.requests import prior_stochastic_steps
from pipeline_helpers import check_close, embeds, generator, max_diff, torch_draws
from test_pipelines import tolerance

E = 32
WIDE = ["artifacts_fp32_b2_wide", "artifacts_fp16_b2_wide"]


@pytest.mark.parametrize("fixture", WIDE)
def test_text2img_non_square_batch2_with_padding(fixture, request, tiny_checkpoint):
    """3 rows on batch-2 artifacts: two chunks, the second padded; 64x128 (latent 8x16)."""
    from diffusers import KandinskyPipeline as Reference

    out, _ = request.getfixturevalue(fixture)
    prompts = ["a red cat", "a green dog", "ein Haus"]
    emb, neg = embeds(3, E, 11), embeds(3, E, 12)
    (latents,) = torch_draws([(3, 4, 8, 16)])
    ref = Reference.from_pretrained(tiny_checkpoint.decoder)(
        prompts, torch.from_numpy(emb), torch.from_numpy(neg), height=64, width=128, num_inference_steps=3,
        latents=torch.from_numpy(latents), output_type="np").images
    ours = KandinskyPipeline(out)(prompts, emb, neg, height=64, width=128, num_inference_steps=3,
                                  latents=latents, output_type="np").images
    assert ours.shape == (3, 64, 128, 3)
    check_close(request.node.name, max_diff(ref, ours), tolerance(fixture, "text2img_b2_wide"))


@pytest.mark.parametrize("negative", [None, "low quality"], ids=["no_negative", "negative_prior_prompt"])
@pytest.mark.parametrize("fixture", ["artifacts_fp32", "artifacts_fp16"])
def test_interpolate_matches_diffusers(fixture, negative, request, tiny_checkpoint):
    """With a negative_prior_prompt every prior run samples 2 rows (prompt + negative), so latents
    are (2, E), as diffusers takes them (issue 18 §3.2: refused as "expected shape (1, 32)")."""
    from diffusers import KandinskyPriorPipeline as Reference

    out, _ = request.getfixturevalue(fixture)
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 256, (80, 60, 3), dtype=np.uint8))
    steps, rows = 3, 1 if negative is None else 2
    latents = embeds(rows, E, 4)  # explicit latents: diffusers then draws only the step noise
    noise = torch_draws([(rows, E)] * (2 * (steps - 1)))
    ref = Reference.from_pretrained(tiny_checkpoint.prior).interpolate(
        ["a cat", picture], [0.3, 0.7], num_inference_steps=steps, generator=generator(),
        latents=torch.from_numpy(latents), negative_prior_prompt=negative)
    ours = KandinskyPriorPipeline(out).interpolate(
        ["a cat", picture], [0.3, 0.7], num_inference_steps=steps, latents=latents, negative_prior_prompt=negative,
        step_noise=[np.stack(noise[: steps - 1]), np.stack(noise[steps - 1:])])
    tol = tolerance(fixture, "interpolate")
    check_close(request.node.name, max_diff(ref.image_embeds, ours.image_embeds), tol)
    check_close(request.node.name, max_diff(ref.negative_image_embeds, ours.negative_image_embeds), tol)


def test_interpolate_keeps_num_images_per_prompt(artifacts_fp32):
    """Fixed: diffusers returns one row whatever num_images_per_prompt; we return N mixed rows."""
    out, _ = artifacts_fp32
    pipe = KandinskyPriorPipeline(out)
    result = pipe.interpolate(["a cat", "a dog"], [0.5, 0.5], num_images_per_prompt=3, num_inference_steps=2,
                              generator=0)
    assert result.image_embeds.shape == (3, E) and result.negative_image_embeds.shape == (3, E)
    assert not np.allclose(result.image_embeds[0], result.image_embeds[1])  # independent samples


def _pictures():
    rng = np.random.default_rng(9)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))


def test_img2img_combined_accepts_a_bare_image_with_several_images(artifacts_fp32):
    """Fixed: diffusers fails on a bare PIL image with num_images_per_prompt > 1."""
    out, _ = artifacts_fp32
    pipe = KandinskyImg2ImgCombinedPipeline(out)
    kwargs = dict(num_images_per_prompt=2, num_inference_steps=4, prior_num_inference_steps=2, height=64,
                  width=64, strength=0.5, output_type="np")
    bare = pipe("a frog", _pictures(), generator=5, **kwargs).images
    listed = pipe("a frog", [_pictures()], generator=5, **kwargs).images
    assert bare.shape == (2, 64, 64, 3)
    np.testing.assert_array_equal(bare, listed)


def test_inpaint_combined_runs_with_several_images(artifacts_fp32):
    """2 prompts x 2 images from one bare image and mask: every row is the single-row call with that
    row's prompt and draws (batch-1 artifacts run row by row, so bit for bit)."""
    out, _ = artifacts_fp32
    mask = np.zeros((64, 64), np.float32)
    mask[10:40, 10:40] = 1
    pipe = KandinskyInpaintCombinedPipeline(out)
    prompts, n, steps = ["a hat", "a crown"], 2, 2
    rng = np.random.default_rng(21)
    rows = len(prompts) * n
    stochastic = prior_stochastic_steps(pipe.prior_pipe.components.loaded, steps)
    latents, dec_latents = rng.standard_normal((rows, E), np.float32), rng.standard_normal((rows, 4, 8, 8), np.float32)
    prior_noise = rng.standard_normal((stochastic, rows, E), np.float32)
    kwargs = dict(num_inference_steps=2, prior_num_inference_steps=steps, height=64, width=64, output_type="np")
    images = pipe(prompts, _pictures(), mask, num_images_per_prompt=n, latents=latents, prior_step_noise=prior_noise,
                  decoder_latents=dec_latents, **kwargs).images
    assert images.shape == (4, 64, 64, 3)
    for row in range(rows):  # rows are [p0, p0, p1, p1] (diffusers' repeat_interleave)
        single = pipe(prompts[row // n], _pictures(), mask, latents=latents[row:row + 1],
                      prior_step_noise=prior_noise[:, row:row + 1], decoder_latents=dec_latents[row:row + 1],
                      **kwargs).images
        np.testing.assert_array_equal(images[row], single[0])
    assert not np.array_equal(images[0], images[2])  # the prompts (and draws) matter