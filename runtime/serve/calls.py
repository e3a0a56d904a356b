"""One item -> the pipelines' typed requests, run: the served result *is* the Python API's result.

Each task builds the requests a Python user's call with the same arguments builds
(``generator=seed``; ``requests.combined_request`` / ``prior_request`` / ``interpolate_request``)
and runs them on the pipeline of that task. Fields a request leaves out take the defaults of the
settings dataclasses, which are the pipelines' own (tests/test_serve_units.py pins them to the
signatures); height and width default to the artifacts' size, as in the CLI. The uint8 image and
mask a request carries become the PIL images the client read them from (``processing.images``: the
one decoder of the CLI, the client and the server), so an image of another size is resized exactly
as ``kandinsky-trt generate`` resizes the file. Images come back as the pipelines' PIL images turned
into uint8 arrays, so they match the Python API exactly.

The functions take a list of items so that ``batching`` can run several compatible items as one
call, with their random draws passed explicitly (:class:`Draws`); a single item runs alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.contract.spec import Profile
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.combined import (
    KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline, KandinskyInpaintCombinedPipeline)
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.decoder import KandinskyPipeline
from kandinsky_trt.runtime.pipelines.prior import KandinskyPriorPipeline
from kandinsky_trt.runtime.pipelines.requests import (
    CombinedRequest, DecoderInputs, DecoderSettings, Img2ImgInputs, InpaintInputs, InterpolateSettings, PriorSettings,
    Text2ImgInputs, combined_request, decoder_request, images_per_row, interpolate_request, prior_request,
    with_embeddings)
from kandinsky_trt.runtime.processing.images import image_from_array, mask_from_array
from kandinsky_trt.runtime.serve.requests import Item

INTERPOLATE_IMAGE_WEIGHT = 0.5  # interpolate: the image's weight when ``strength`` is not sent
IMAGES_PER_PROMPT = 1  # num_images when not sent (every pipeline's num_images_per_prompt default)


def served_image(image: np.ndarray):
    """The contract's uint8 HxWx3 image as the RGB PIL image the client read from its file."""
    return image_from_array(image)


def mask_array(mask: np.ndarray):
    """The contract's uint8 mask (255 = repaint) as the L PIL image the client read from its file
    (resized LANCZOS by the pipelines, as the CLI's mask file is)."""
    return mask_from_array(mask)


@dataclass
class Pipelines:
    """Every pipeline, built once on one shared :class:`Components`."""

    components: Components

    def __post_init__(self) -> None:
        c = self.components
        self.prior = KandinskyPriorPipeline(components=c)
        self.decoder = KandinskyPipeline(components=c)
        self.combined = {"text2img": KandinskyCombinedPipeline(components=c),
                         "img2img": KandinskyImg2ImgCombinedPipeline(components=c),
                         "inpaint": KandinskyInpaintCombinedPipeline(components=c)}


@dataclass(frozen=True)
class Draws:
    """Random draws passed explicitly (a merged call's, rows in its layout); None: drawn from the generator."""

    prior_latents: np.ndarray | None = None  # (rows, E)
    prior_noise: np.ndarray | None = None  # (stochastic prior steps, rows, E)
    decoder: np.ndarray | None = None  # (rows, 4, h, w): latents (text2img, inpaint) or noise (img2img)


def _given(**values) -> dict:
    """The values that were sent: the others keep the settings' defaults."""
    return {name: value for name, value in values.items() if value is not None}


def images_per_prompt(item: Item) -> int:
    return IMAGES_PER_PROMPT if item.num_images is None else item.num_images


def prior_settings(item: Item, draws: Draws = Draws()) -> PriorSettings:
    """The prior's settings: the prior task's guidance is the item's; a combined task's prior keeps its default."""
    guidance = item.guidance_scale if item.task == "prior" else None
    return PriorSettings(**_given(num_inference_steps=item.prior_steps, guidance_scale=guidance,
                                  latents=draws.prior_latents, step_noise=draws.prior_noise))


def decoder_settings(item: Item, profile: Profile, inputs: DecoderInputs = Text2ImgInputs()) -> DecoderSettings:
    """The decoder's settings (PIL images out); height and width default to the artifacts' size."""
    return DecoderSettings(**_given(num_inference_steps=item.num_inference_steps, guidance_scale=item.guidance_scale),
                           height=profile.height if item.height is None else item.height,
                           width=profile.width if item.width is None else item.width, output_type="pil", inputs=inputs)


def _prompts(items: list[Item]) -> args.Prompts:
    """The items' prompts checked together (one item: as its own call would pass them)."""
    first = items[0]
    if len(items) == 1:
        return args.check_prompts(first.prompt, first.negative_prompt, images_per_prompt(first))
    negatives = None if first.negative_prompt is None else [i.negative_prompt for i in items]
    return args.check_prompts([i.prompt for i in items], negatives, images_per_prompt(first))


def _decoder_inputs(items: list[Item], prompts: args.Prompts, draw: np.ndarray | None) -> DecoderInputs:
    """The decoder's own inputs of the items' task, one image (and mask) per row."""
    task, one = items[0].task, len(items) == 1
    if task == "text2img":
        return Text2ImgInputs(draw, latents_name="decoder_latents")
    image = images_per_row(served_image(items[0].image) if one else [i.image for i in items], prompts)
    if task == "img2img":
        return Img2ImgInputs(image, noise=draw, **_given(strength=items[0].strength))
    mask = mask_array(items[0].mask) if one else [mask_array(i.mask) for i in items]
    return InpaintInputs(image, images_per_row(mask, prompts), draw, latents_name="decoder_latents")


def image_outputs(images: list) -> dict[str, np.ndarray]:
    return {"images": np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])}


def run_prior(pipelines: Pipelines, items: list[Item], rng: np.random.Generator,
              draws: Draws = Draws()) -> list[dict[str, np.ndarray]]:
    """The prior task: one prior request for the items; each item's embeddings."""
    prompts = _prompts(items)
    request = prior_request(pipelines.components.loaded, prompts, prior_settings(items[0], draws), rng)
    out = pipelines.prior.run(request)
    return [{"image_embeds": e, "negative_image_embeds": ne}
            for e, ne in zip(np.split(out.image_embeds, len(items)), np.split(out.negative_image_embeds, len(items)))]


def combined_request_of(pipelines: Pipelines, items: list[Item], rng: np.random.Generator,
                        draws: Draws = Draws()) -> CombinedRequest:
    """text2img, img2img, inpaint: the combined pipeline's request for the items (checked, nothing drawn)."""
    first, loaded = items[0], pipelines.components.loaded
    prompts = _prompts(items)
    decoder = decoder_settings(first, pipelines.components.profile, _decoder_inputs(items, prompts, draws.decoder))
    return combined_request(loaded, prompts, prior_settings(first, draws), decoder, rng)


def run_combined(pipelines: Pipelines, items: list[Item], rng: np.random.Generator,
                 draws: Draws = Draws()) -> list[dict[str, np.ndarray]]:
    """text2img, img2img, inpaint: the combined pipeline's request for the items; each item's images."""
    request = combined_request_of(pipelines, items, rng, draws)
    images = pipelines.combined[items[0].task].run(request).images
    per_item = len(images) // len(items)
    return [image_outputs(images[i * per_item:(i + 1) * per_item]) for i in range(len(items))]


def run_interpolate(pipelines: Pipelines, item: Item) -> dict[str, np.ndarray]:
    """``kandinsky-trt interpolate`` with one text and one image condition: the prior's
    ``interpolate`` (weights 1 - strength and strength), then the text-to-image decoder on ``""``."""
    loaded = pipelines.components.loaded
    weight = INTERPOLATE_IMAGE_WEIGHT if item.strength is None else item.strength
    settings = InterpolateSettings(**_given(num_images_per_prompt=item.num_images, num_inference_steps=item.prior_steps,
                                            negative_prior_prompt=item.negative_prompt))
    mix_request = interpolate_request(loaded, [item.prompt, served_image(item.image)], [1.0 - weight, weight],
                                      settings, args.rng(item.seed))
    mix = pipelines.prior.run_interpolate(mix_request)
    prompts = args.check_prompts([""] * len(mix.image_embeds), None, 1)  # one decoder row per mixed embedding
    request = decoder_request(loaded, prompts, decoder_settings(item, pipelines.components.profile), args.rng(item.seed))
    out = pipelines.decoder.run(with_embeddings(loaded, request, mix.image_embeds, mix.negative_image_embeds))
    return image_outputs(out.images)


def run_item(pipelines: Pipelines, item: Item) -> dict[str, np.ndarray]:
    """Serve one item exactly as the Python API call with ``generator=item.seed``."""
    if item.task == "interpolate":
        return run_interpolate(pipelines, item)
    run = run_prior if item.task == "prior" else run_combined
    return run(pipelines, [item], args.rng(item.seed))[0]
