"""Dynamic batching that changes nothing but speed: compatible items in one pipeline call.

Items of one Triton batch with the same task, size, step counts, guidance, strength, images per
prompt and negative-prompt presence run as one call of their pipeline with a list of prompts. Each
item keeps its own seed: its random draws are made from ``default_rng(seed)`` in the order the
pipeline would make them for that item alone (prior latents, prior step noise, then the decoder's
latents or img2img noise), passed explicitly, and its rows come back where a serial call would
have put them. Rows are independent at a fixed profile batch, so the images are the serial ones
bit for bit (tests/test_serve_batching.py). Where a draw cannot be passed explicitly (a stochastic
decoder scheduler, interpolate) the items run one at a time.
"""

from __future__ import annotations

import logging

import numpy as np

from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.requests import DEFAULT_STRENGTH
from kandinsky_trt.runtime.serve.calls import (Draws, Pipelines, decoder_settings, images_per_prompt, prior_settings,
                                               run_combined, run_prior)
from kandinsky_trt.runtime.serve.requests import Item

log = logging.getLogger(__name__)
BATCHED_TASKS = ("text2img", "img2img", "inpaint", "prior")


class BatchDrewRandomness(RuntimeError):
    """A merged call drew from its generator: some draw was not passed explicitly."""


def group_key(pipelines: Pipelines, item: Item) -> tuple | None:
    """Items with equal keys can share a call; ``None``: this item runs alone.

    The key: task, negative-prompt presence, size, step counts, guidance, strength, images per prompt
    (the settings' defaults filled in, so a value sent equal to the default matches one left out).
    """
    if item.task not in BATCHED_TASKS:
        return None
    prior = prior_settings(item)
    if item.task == "prior":
        return (item.task, item.negative_prompt is not None, None, None, prior.num_inference_steps, None,
                prior.guidance_scale, None, images_per_prompt(item))
    decoder = decoder_settings(item, pipelines.components.profile)
    strength = None
    if item.task == "img2img":
        strength = DEFAULT_STRENGTH if item.strength is None else item.strength
    return (item.task, item.negative_prompt is not None, decoder.height, decoder.width, decoder.num_inference_steps,
            prior.num_inference_steps, decoder.guidance_scale, strength, images_per_prompt(item))


def draw(pipelines: Pipelines, item: Item) -> Draws:
    """One item's random draws, in the order its serial call would make them: prior latents (n prompt
    rows, then n negative rows if any), prior step noise, then the decoder's latents or img2img noise."""
    c = pipelines.components.loaded
    n = args.check_positive_int(images_per_prompt(item), "num_images_per_prompt")
    rows = n * (2 if item.negative_prompt is not None else 1)
    dim = c.embedding_width
    prior = prior_settings(item)
    rng = args.rng(item.seed)
    latents = rng.standard_normal((rows, dim), dtype=np.float32)
    prior_steps = args.check_positive_int(prior.num_inference_steps, "prior_steps")
    stochastic = int(c.scheduler("prior", prior_steps).stochastic.sum())
    noise = rng.standard_normal((stochastic, rows, dim), dtype=np.float32)
    if item.task == "prior":
        return Draws(latents, noise, None)
    decoder = decoder_settings(item, pipelines.components.profile)
    steps = args.check_positive_int(decoder.num_inference_steps, "num_inference_steps")
    if c.scheduler("decoder", steps).stochastic.any():
        raise BatchDrewRandomness("the decoder scheduler is stochastic; its step noise cannot be passed")
    height, width = args.check_size(decoder.height, decoder.width, c.sizes, c.latent_scale)
    return Draws(latents, noise, rng.standard_normal(c.latent_shape(n, height, width), dtype=np.float32))


def _prior_rows(parts: list[np.ndarray], n: int, negative: bool, axis: int) -> np.ndarray:
    """Per-item prior rows in the merged call's layout: all prompts' rows, then all negatives'."""
    if not negative:
        return np.concatenate(parts, axis=axis)
    first = [np.take(p, range(n), axis=axis) for p in parts]
    second = [np.take(p, range(n, 2 * n), axis=axis) for p in parts]
    return np.concatenate(first + second, axis=axis)


def run_batched(pipelines: Pipelines, items: list[Item]) -> list[dict[str, np.ndarray]]:
    """One pipeline call for compatible ``items``; returns each item's outputs, in order."""
    draws = [draw(pipelines, item) for item in items]
    n, negative = images_per_prompt(items[0]), items[0].negative_prompt is not None
    merged = Draws(_prior_rows([d.prior_latents for d in draws], n, negative, 0),
                   _prior_rows([d.prior_noise for d in draws], n, negative, 1),
                   None if items[0].task == "prior" else np.concatenate([d.decoder for d in draws]))
    guard = np.random.default_rng(0)
    before = guard.bit_generator.state
    run = run_prior if items[0].task == "prior" else run_combined
    outputs = run(pipelines, items, guard, merged)
    if guard.bit_generator.state != before:
        raise BatchDrewRandomness(f"the merged {items[0].task} call drew random numbers of its own")
    return outputs
