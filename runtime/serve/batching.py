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
from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.serve.calls import Pipelines, image_outputs, mask_array, resolved
from kandinsky_trt.runtime.serve.requests import Item

log = logging.getLogger(__name__)
BATCHED_TASKS = ("text2img", "img2img", "inpaint", "prior")
_KEY_ARGS = ("height", "width", "num_inference_steps", "prior_num_inference_steps", "guidance_scale",
             "strength", "num_images_per_prompt")


class BatchDrewRandomness(RuntimeError):
    """A merged call drew from its generator: some draw was not passed explicitly."""


def group_key(pipelines: Pipelines, item: Item) -> tuple | None:
    """Items with equal keys can share a call; ``None``: this item runs alone."""
    if item.task not in BATCHED_TASKS:
        return None
    kwargs = resolved(pipelines, item)
    return (item.task, item.negative_prompt is not None, *(kwargs.get(k) for k in _KEY_ARGS))


@dataclass(frozen=True)
class Draws:
    """One item's random draws, in the order its serial call would make them."""

    prior_latents: np.ndarray  # (rows, E): n prompt rows, then n negative rows if any
    prior_noise: np.ndarray  # (stochastic prior steps, rows, E)
    decoder: np.ndarray | None  # (n, 4, h, w): latents (text2img, inpaint) or noise (img2img)


def draw(pipelines: Pipelines, item: Item, kwargs: dict) -> Draws:
    c = pipelines.components
    n = args.check_positive_int(kwargs["num_images_per_prompt"], "num_images_per_prompt")
    rows = n * (2 if item.negative_prompt is not None else 1)
    dim = c.manifest.model_dims.clip_dim
    prior_steps = kwargs["num_inference_steps" if item.task == "prior" else "prior_num_inference_steps"]
    rng = args.rng(item.seed)
    latents = rng.standard_normal((rows, dim), dtype=np.float32)
    stochastic = int(c.scheduler("prior", args.check_positive_int(prior_steps, "prior_steps")).stochastic.sum())
    noise = rng.standard_normal((stochastic, rows, dim), dtype=np.float32)
    if item.task == "prior":
        return Draws(latents, noise, None)
    steps = args.check_positive_int(kwargs["num_inference_steps"], "num_inference_steps")
    if c.scheduler("decoder", steps).stochastic.any():
        raise BatchDrewRandomness("the decoder scheduler is stochastic; its step noise cannot be passed")
    height, width = args.check_size(kwargs["height"], kwargs["width"], c.sizes, c.latent_scale)
    return Draws(latents, noise, rng.standard_normal(c.latent_shape(n, height, width), dtype=np.float32))


def _prior_rows(parts: list[np.ndarray], n: int, negative: bool, axis: int) -> np.ndarray:
    """Per-item prior rows in the merged call's layout: all prompts' rows, then all negatives'."""
    if not negative:
        return np.concatenate(parts, axis=axis)
    first = [np.take(p, range(n), axis=axis) for p in parts]
    second = [np.take(p, range(n, 2 * n), axis=axis) for p in parts]
    return np.concatenate(first + second, axis=axis)


def _split(array: np.ndarray, count: int) -> list[np.ndarray]:
    return np.split(np.asarray(array), count)


def run_batched(pipelines: Pipelines, items: list[Item]) -> list[dict[str, np.ndarray]]:
    """One pipeline call for compatible ``items``; returns each item's outputs, in order."""
    kwargs = resolved(pipelines, items[0])
    draws = [draw(pipelines, item, resolved(pipelines, item)) for item in items]
    n, negative = kwargs["num_images_per_prompt"], items[0].negative_prompt is not None
    call = {k: kwargs[k] for k in _KEY_ARGS if k in kwargs}  # what the pipeline takes of the key
    call.update(latents=_prior_rows([d.prior_latents for d in draws], n, negative, 0),
                negative_prompt=[i.negative_prompt for i in items] if negative else None)
    prior_noise = _prior_rows([d.prior_noise for d in draws], n, negative, 1)
    if items[0].task == "prior":
        call["step_noise"] = prior_noise
    else:
        call["prior_step_noise"] = prior_noise
        call["noise" if items[0].task == "img2img" else "decoder_latents"] = np.concatenate([d.decoder for d in draws])
    guard = np.random.default_rng(0)
    before = guard.bit_generator.state
    outputs = _call(pipelines, items, call, guard)
    if guard.bit_generator.state != before:
        raise BatchDrewRandomness(f"the merged {items[0].task} call drew random numbers of its own")
    return outputs


def _call(pipelines: Pipelines, items: list[Item], call: dict, guard: np.random.Generator):
    task, prompts, count = items[0].task, [i.prompt for i in items], len(items)
    if task == "prior":
        out = pipelines.prior(prompts, generator=guard, **call)
        return [{"image_embeds": e, "negative_image_embeds": ne}
                for e, ne in zip(_split(out.image_embeds, count), _split(out.negative_image_embeds, count))]
    images = []
    if task in ("img2img", "inpaint"):
        images.append([i.image for i in items])
    if task == "inpaint":
        images.append([mask_array(i.mask) for i in items])
    out = pipelines.combined[task](prompts, *images, generator=guard, output_type="pil", **call)
    per_item = len(out.images) // count
    return [image_outputs(out.images[i * per_item:(i + 1) * per_item]) for i in range(count)]
