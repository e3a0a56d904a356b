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

import inspect
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

    def _call(self, call: dict, **decoder_inputs):
        """Validate the decoder's arguments (no network runs), run the prior, then the decoder.

        The decoder gets the prompts repeated per image (``num_images_per_prompt`` 1) and one
        ``decoder_inputs`` entry (images, masks) per row; one generator serves both halves, so the
        draws come in diffusers' order: prior latents and noise, then the decoder's.
        """
        prompts = args.as_prompt_list(call["prompt"])
        n = args.check_images_per_prompt(call["num_images_per_prompt"], len(prompts))
        rng = args.rng(call["generator"])
        repeat = lambda xs: None if xs is None else [x for x in xs for _ in range(n)]  # noqa: E731
        negatives = args.negative_prompts(call["negative_prompt"], len(prompts))
        decoder_call = dict(
            prompt=repeat(prompts), negative_prompt=repeat(negatives), height=call["height"], width=call["width"],
            num_inference_steps=call["num_inference_steps"], guidance_scale=call["guidance_scale"],
            generator=rng, output_type=call["output_type"], callback=call["callback"],
            callback_steps=call["callback_steps"], return_dict=call["return_dict"], scheduler=call["scheduler"],
            **decoder_inputs)
        bound = inspect.signature(self.decoder_pipe.__call__).bind(image_embeds=None, negative_image_embeds=None,
                                                                   **decoder_call)
        bound.apply_defaults()
        with args.renamed({"latents": "decoder_latents"}):
            prepared = self.decoder_pipe._prepare(bound.arguments)
        with args.renamed(_PRIOR_NAMES):
            out = self.prior_pipe(prompts, call["negative_prompt"], n, call["prior_num_inference_steps"], rng,
                                  call["latents"], call["prior_guidance_scale"], step_noise=call["prior_step_noise"])
        return self.decoder_pipe._generate(prepared, out.image_embeds, out.negative_image_embeds)


class KandinskyCombinedPipeline(_Combined):
    """Text-to-image, prior and decoder together (diffusers ``KandinskyCombinedPipeline``)."""

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, height: args.Size = None, width: args.Size = None,
                 prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, output_type: str = "pil", callback=None,
                 callback_steps: int = 1, return_dict: bool = True, scheduler: str | None = None,
                 prior_step_noise=None, decoder_latents=None):
        return self._call(dict(locals()), latents=decoder_latents)


def _images_per_row(image, prompts: int, n: int) -> list:
    """One image per decoder row: a bare image or a list of one or one per prompt, repeated per image."""
    images = image if isinstance(image, (list, tuple)) else [image]
    if len(images) == 1:
        images = images * prompts
    return [img for img in images for _ in range(n)]


class KandinskyImg2ImgCombinedPipeline(_Combined):
    """Image-to-image, prior and decoder together (diffusers ``KandinskyImg2ImgCombinedPipeline``)."""

    decoder_class = KandinskyImg2ImgPipeline

    def __call__(self, prompt, image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, strength: float = 0.3,
                 height: args.Size = None, width: args.Size = None, prior_guidance_scale: float = 4.0,
                 prior_num_inference_steps: int = 25, generator: args.Generator = None, latents=None,
                 output_type: str = "pil", callback=None, callback_steps: int = 1, return_dict: bool = True,
                 scheduler: str | None = None, prior_step_noise=None, noise=None):
        count, n = len(args.as_prompt_list(prompt)), args.check_images_per_prompt(num_images_per_prompt, 1)
        return self._call(dict(locals()), image=_images_per_row(image, count, n), strength=strength, noise=noise)


class KandinskyInpaintCombinedPipeline(_Combined):
    """Inpainting, prior and decoder together (diffusers ``KandinskyInpaintCombinedPipeline``)."""

    decoder_class = KandinskyInpaintPipeline

    def __call__(self, prompt, image, mask_image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, height: args.Size = None,
                 width: args.Size = None, prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, output_type: str = "pil", callback=None,
                 callback_steps: int = 1, return_dict: bool = True, scheduler: str | None = None,
                 prior_step_noise=None, decoder_latents=None):
        count, n = len(args.as_prompt_list(prompt)), args.check_images_per_prompt(num_images_per_prompt, 1)
        return self._call(dict(locals()), image=_images_per_row(image, count, n),
                          mask_image=_images_per_row(mask_image, count, n), latents=decoder_latents)
