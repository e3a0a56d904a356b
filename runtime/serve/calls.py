"""One item -> one Python-API call: the served result *is* the Python API's result.

Each task maps onto the pipeline a Python user would call with the same arguments
(``generator=seed``); arguments a request leaves out are left out of the call, so the pipelines'
own defaults apply (height and width default to the artifacts' size, as in the CLI). The uint8
image and mask a request carries become the PIL images the client read them from
(``processing.images``: the one decoder of the CLI, the client and the server), so an image of
another size is resized exactly as ``kandinsky-trt generate`` resizes the file. Images come back
as the pipelines' PIL images turned into uint8 arrays, so they match the Python API exactly.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.pipelines.combined import (
    KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline, KandinskyInpaintCombinedPipeline)
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.decoder import KandinskyPipeline
from kandinsky_trt.runtime.pipelines.prior import KandinskyPriorPipeline
from kandinsky_trt.runtime.processing.images import image_from_array, mask_from_array
from kandinsky_trt.runtime.serve.requests import Item

INTERPOLATE_IMAGE_WEIGHT = 0.5  # interpolate: the image's weight when ``strength`` is not sent
# Request field -> the combined pipelines' argument name.
_COMBINED_ARGS = {"negative_prompt": "negative_prompt", "num_images": "num_images_per_prompt",
                  "guidance_scale": "guidance_scale", "num_inference_steps": "num_inference_steps",
                  "prior_steps": "prior_num_inference_steps", "height": "height", "width": "width"}
_PRIOR_ARGS = {"negative_prompt": "negative_prompt", "num_images": "num_images_per_prompt",
               "guidance_scale": "guidance_scale", "prior_steps": "num_inference_steps"}


def _sent(item: Item, names: dict[str, str]) -> dict:
    return {arg: getattr(item, field) for field, arg in names.items() if getattr(item, field) is not None}


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

    def call(self, task: str):
        return self.prior if task == "prior" else self.combined[task]


def call_kwargs(item: Item, profile) -> dict:
    """The keyword arguments of the item's pipeline call (without prompt, images and draws)."""
    if item.task == "prior":
        return _sent(item, _PRIOR_ARGS)
    kwargs = {"height": profile.height, "width": profile.width, **_sent(item, _COMBINED_ARGS)}
    if item.task == "img2img" and item.strength is not None:
        kwargs["strength"] = item.strength
    return kwargs


def resolved(pipelines: Pipelines, item: Item) -> dict:
    """``call_kwargs`` with every default filled in from the pipeline's own signature."""
    signature = inspect.signature(pipelines.call(item.task).__call__)
    defaults = {name: p.default for name, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}
    return {**defaults, **call_kwargs(item, pipelines.components.profile)}


def image_outputs(images: list) -> dict[str, np.ndarray]:
    return {"images": np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])}


def run_item(pipelines: Pipelines, item: Item) -> dict[str, np.ndarray]:
    """Serve one item exactly as the Python API call with ``generator=item.seed``."""
    kwargs = call_kwargs(item, pipelines.components.profile)
    if item.task == "prior":
        out = pipelines.prior(item.prompt, generator=item.seed, **kwargs)
        return {"image_embeds": out.image_embeds, "negative_image_embeds": out.negative_image_embeds}
    if item.task == "interpolate":
        return run_interpolate(pipelines, item)
    pipe = pipelines.combined[item.task]
    images = () if item.task == "text2img" else (served_image(item.image),)
    if item.task == "inpaint":
        images = (served_image(item.image), mask_array(item.mask))
    out = pipe(item.prompt, *images, generator=item.seed, output_type="pil", **kwargs)
    return image_outputs(out.images)


def run_interpolate(pipelines: Pipelines, item: Item) -> dict[str, np.ndarray]:
    """``kandinsky-trt interpolate`` with one text and one image condition: the prior's
    ``interpolate`` (weights 1 - strength and strength), then the text-to-image decoder on ``""``."""
    weight = INTERPOLATE_IMAGE_WEIGHT if item.strength is None else item.strength
    prior_args = _sent(item, {"num_images": "num_images_per_prompt", "prior_steps": "num_inference_steps",
                              "negative_prompt": "negative_prior_prompt"})
    mix = pipelines.prior.interpolate([item.prompt, served_image(item.image)], [1.0 - weight, weight],
                                      generator=item.seed, **prior_args)
    profile = pipelines.components.profile
    decoder_args = {"height": profile.height, "width": profile.width,
                    **_sent(item, {"height": "height", "width": "width", "guidance_scale": "guidance_scale",
                                   "num_inference_steps": "num_inference_steps"})}
    prompts = [""] * len(mix.image_embeds)  # one decoder row per mixed embedding
    out = pipelines.decoder(prompts, mix.image_embeds, mix.negative_image_embeds, generator=item.seed,
                            output_type="pil", **decoder_args)
    return image_outputs(out.images)
