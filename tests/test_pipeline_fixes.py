"""diffusers' Kandinsky 2.1 bugs, fixed: each test states the diffusers behaviour and checks ours
against a reference built from diffusers calls that do not hit the bug."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kandinsky_trt.runtime import (
    KandinskyCombinedPipeline, KandinskyImg2ImgPipeline, KandinskyPipeline)
from pipeline_helpers import check_close, embeds, generator, max_diff, torch_draws
from test_pipelines import TOLERANCE

E = 32
TOL = TOLERANCE["artifacts_fp32"]


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    from diffusers import KandinskyPipeline as Decoder, KandinskyPriorPipeline as Prior

    return Prior.from_pretrained(tiny_checkpoint.prior), Decoder.from_pretrained(tiny_checkpoint.decoder)


def test_no_guidance_with_several_images_per_prompt(artifacts_fp32, reference):
    """diffusers: guidance_scale <= 1 and num_images_per_prompt > 1 crash (embeds not repeated).
    Reference: the same rows as separate prompts with N = 1."""
    out, _ = artifacts_fp32
    emb, neg = embeds(1, E, 21), embeds(1, E, 22)
    (latents,) = torch_draws([(2, 4, 8, 8)])
    ref = reference[1](["a boat", "a boat"], torch.from_numpy(np.repeat(emb, 2, 0)),
                       torch.from_numpy(np.repeat(neg, 2, 0)), height=64, width=64, num_inference_steps=3,
                       guidance_scale=1.0, latents=torch.from_numpy(latents), output_type="np").images
    ours = KandinskyPipeline(out)("a boat", emb, neg, height=64, width=64, num_inference_steps=3,
                                  guidance_scale=1.0, num_images_per_prompt=2, latents=latents,
                                  output_type="np").images
    check_close("no-guidance N=2", max_diff(ref, ours), TOL[1])


def test_combined_pairs_prompts_with_their_embeddings_and_passes_the_negative_prompt(artifacts_fp32, reference):
    """diffusers' combined pipeline tiles prompts [p1, p2, p1, p2] against embeddings [p1, p1, p2, p2]
    and drops negative_prompt for the decoder. Reference: diffusers prior, then diffusers decoder
    with the prompts repeated per image and the negative prompt."""
    out, _ = artifacts_fp32
    prior, decoder = reference
    prompts, negative, n, steps = ["a red cat", "a blue house"], ["ugly", "dark"], 2, 2
    rows = len(prompts) * n
    prior_latents, *prior_noise, dec_latents = torch_draws([(2 * rows, E)] * steps + [(rows, 4, 8, 8)])
    ref_prior = prior(prompts, negative_prompt=negative, num_images_per_prompt=n, num_inference_steps=steps,
                      generator=generator(), output_type="pt")  # draws prior_latents, then prior_noise
    repeated = [p for p in prompts for _ in range(n)]
    ref = decoder(repeated, ref_prior.image_embeds, ref_prior.negative_image_embeds,
                  negative_prompt=[x for x in negative for _ in range(n)], height=64, width=64,
                  num_inference_steps=steps, latents=torch.from_numpy(dec_latents), output_type="np").images
    ours = KandinskyCombinedPipeline(out)(prompts, negative_prompt=negative, num_images_per_prompt=n,
                                          num_inference_steps=steps, prior_num_inference_steps=steps, height=64,
                                          width=64, latents=prior_latents, prior_step_noise=np.stack(prior_noise),
                                          decoder_latents=dec_latents, output_type="np").images
    check_close("combined pairing + negative", max_diff(ref, ours), TOL[1])


def test_img2img_non_square_keeps_height_and_width(artifacts_fp32_b2_wide, tiny_checkpoint):
    """diffusers swaps height and width in img2img preprocessing (``preprocess(i, width, height)``), so
    non-square sizes raise. Reference: diffusers with that one call put right, same noise."""
    from diffusers import KandinskyImg2ImgPipeline as Reference
    from PIL import Image

    out, _ = artifacts_fp32_b2_wide
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 128, 3), dtype=np.uint8))
    emb, neg = embeds(1, E, 1), embeds(1, E, 2)
    ref_pipe = Reference.from_pretrained(tiny_checkpoint.decoder)
    swapped = ref_pipe.image_processor.preprocess
    ref_pipe.image_processor.preprocess = lambda image, height, width: swapped(image, width, height)
    ref = ref_pipe("a frog", picture, torch.from_numpy(emb), torch.from_numpy(neg), height=64, width=128,
                   num_inference_steps=4, strength=0.5, generator=generator(), output_type="np").images
    (noise,) = torch_draws([(1, 4, 8, 16)])
    images = KandinskyImg2ImgPipeline(out)("a frog", picture, emb, neg, height=64, width=128,
                                           num_inference_steps=4, strength=0.5, noise=noise, output_type="np").images
    assert images.shape == ref.shape == (1, 64, 128, 3)
    check_close("img2img 64x128", max_diff(ref, images), TOL[1])