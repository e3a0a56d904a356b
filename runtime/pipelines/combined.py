"""Combined pipelines: prior + decoder in one call, sharing one set of loaded components.

Fixed diffusers bugs (README "Divergences from diffusers"):
- the decoder also gets ``negative_prompt`` (diffusers drops it);
- prompts are paired with their own image embeddings for several prompts x several images
  (diffusers tiles the prompts [p1, p2, p1, p2] against embeddings [p1, p1, p2, p2]);
- a bare PIL image works with several images per prompt (diffusers checks ``prompt`` instead of
  ``image`` and fails).
As in diffusers, ``latents`` seeds the prior; ``decoder_latents`` / ``noise`` seed the decoder.
"""

from __future__ import annotations

import os

from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.decoder import (
    KandinskyImg2ImgPipeline, KandinskyInpaintPipeline, KandinskyPipeline)
from kandinsky_trt.runtime.pipelines.prior import KandinskyPriorPipeline


# The prior's arguments as the combined pipelines name them (error messages use these).
_PRIOR_NAMES = {"guidance_scale": "prior_guidance_scale", "num_inference_steps": "prior_num_inference_steps",
                "step_noise": "prior_step_noise"}


class _Combined:
    decoder_class = KandinskyPipeline

    def __init__(self, artifacts: str | os.PathLike | None = None, backend: str = "ort", device: str = "cpu",
                 components: Components | None = None) -> None:
        self.components = components or Components(artifacts, backend, device)
        self.prior_pipe = KandinskyPriorPipeline(components=self.components)
        self.decoder_pipe = self.decoder_class(components=self.components)

    def _call(self, call: dict):
        """Check the decoder's arguments (no network runs), run the prior, then the decoder.

        The decoder gets the prompts repeated per image (one image each) and one entry of its own
        inputs (images, masks) per row; one generator serves both halves, so the draws come in
        diffusers' order: prior latents and noise, then the decoder's.
        """
        prompts = args.check_prompts(call["prompt"], call["negative_prompt"], call["num_images_per_prompt"])
        call = call | {"generator": args.rng(call["generator"])}
        with args.renamed({"latents": "decoder_latents"}):
            decoder = self.decoder_pipe.request(prompts.one_per_row(), call, **self._decoder_inputs(call, prompts))
        with args.renamed(_PRIOR_NAMES):
            prior = self.prior_pipe.request(prompts, call["prior_num_inference_steps"], call["generator"],
                                            call["latents"], call["prior_guidance_scale"], call["prior_step_noise"])
        out = self.prior_pipe.run(prior)
        return self.decoder_pipe.run(decoder, out.image_embeds, out.negative_image_embeds)

    @staticmethod
    def _decoder_inputs(call: dict, prompts: args.Prompts) -> dict:
        """The decoder's own arguments, one per row."""
        return {"latents": call["decoder_latents"]}


class KandinskyCombinedPipeline(_Combined):
    """Text-to-image, prior and decoder together (diffusers ``KandinskyCombinedPipeline``)."""

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, height: args.Size = None, width: args.Size = None,
                 prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, output_type: str = "pil", callback=None,
                 callback_steps: int = 1, return_dict: bool = True, scheduler: str | None = None,
                 prior_step_noise=None, decoder_latents=None):
        return self._call(dict(locals()))


def _images_per_row(image, prompts: args.Prompts) -> list:
    """One image per decoder row: a bare image or a list of one or one per prompt, repeated per image."""
    images = image if isinstance(image, (list, tuple)) else [image]
    if len(images) == 1:
        images = images * len(prompts.texts)
    return args.repeat_rows(images, prompts.per_prompt)


class KandinskyImg2ImgCombinedPipeline(_Combined):
    """Image-to-image, prior and decoder together (diffusers ``KandinskyImg2ImgCombinedPipeline``)."""

    decoder_class = KandinskyImg2ImgPipeline

    def __call__(self, prompt, image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, strength: float = 0.3,
                 height: args.Size = None, width: args.Size = None, prior_guidance_scale: float = 4.0,
                 prior_num_inference_steps: int = 25, generator: args.Generator = None, latents=None,
                 output_type: str = "pil", callback=None, callback_steps: int = 1, return_dict: bool = True,
                 scheduler: str | None = None, prior_step_noise=None, noise=None):
        return self._call(dict(locals()))

    @staticmethod
    def _decoder_inputs(call: dict, prompts: args.Prompts) -> dict:
        return {"image": _images_per_row(call["image"], prompts), "strength": call["strength"], "noise": call["noise"]}


class KandinskyInpaintCombinedPipeline(_Combined):
    """Inpainting, prior and decoder together (diffusers ``KandinskyInpaintCombinedPipeline``)."""

    decoder_class = KandinskyInpaintPipeline

    def __call__(self, prompt, image, mask_image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, height: args.Size = None,
                 width: args.Size = None, prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, output_type: str = "pil", callback=None,
                 callback_steps: int = 1, return_dict: bool = True, scheduler: str | None = None,
                 prior_step_noise=None, decoder_latents=None):
        return self._call(dict(locals()))

    @staticmethod
    def _decoder_inputs(call: dict, prompts: args.Prompts) -> dict:
        return {"image": _images_per_row(call["image"], prompts),
                "mask_image": _images_per_row(call["mask_image"], prompts), "latents": call["decoder_latents"]}
