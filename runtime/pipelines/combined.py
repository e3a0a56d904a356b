"""Combined pipelines: prior + decoder in one call, sharing one set of loaded components.

Fixed diffusers bugs (README "Divergences from diffusers"):
- the decoder also gets ``negative_prompt`` (diffusers drops it);
- prompts are paired with their own image embeddings for several prompts x several images
  (diffusers tiles the prompts [p1, p2, p1, p2] against embeddings [p1, p1, p2, p2]);
- a bare PIL image works with several images per prompt (diffusers checks ``prompt`` instead of
  ``image`` and fails).
As in diffusers, ``latents`` seeds the prior; ``decoder_latents`` / ``noise`` seed the decoder.

A ``__call__`` checks its arguments into a :class:`~.requests.CombinedRequest`
(``requests.combined_request``: the decoder's half first, so no network runs before every argument
is checked) and runs it (``run``: the prior, then the decoder on its embeddings).
"""

from __future__ import annotations

import os

import numpy as np

from kandinsky_trt.runtime.backends.base import DeviceRows
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.decoder import (
    ChunkEmbeds, ImagePipelineOutput, KandinskyImg2ImgPipeline, KandinskyInpaintPipeline, KandinskyPipeline)
from kandinsky_trt.runtime.pipelines.prior import KandinskyPriorPipeline
from kandinsky_trt.runtime.pipelines.resident import ResidentChain
from kandinsky_trt.runtime.pipelines.requests import (CombinedRequest, DecoderSettings, Img2ImgInputs, InpaintInputs,
                                                      PriorSettings, Text2ImgInputs, combined_request,
                                                      images_per_row, with_embeddings)

__all__ = ["KandinskyCombinedPipeline", "KandinskyImg2ImgCombinedPipeline", "KandinskyInpaintCombinedPipeline"]


class _Combined:
    decoder_class = KandinskyPipeline

    def __init__(self, artifacts: str | os.PathLike | None = None, backend: str = "ort", device: str = "cpu",
                 components: Components | None = None) -> None:
        self.components = components or Components(artifacts, backend, device)
        self.prior_pipe = KandinskyPriorPipeline(components=self.components)
        self.decoder_pipe = self.decoder_class(components=self.components)

    def run(self, request: CombinedRequest) -> ImagePipelineOutput | tuple:
        """Run the prior, then the decoder on the prior's embeddings (one per decoder row).

        On a resident chain (TensorRT) whose artifacts have the ``prior_embeds`` bridge graph, and
        without a step callback, the embeddings never leave the device: the decoder gathers each
        chunk's rows from the prior's kept chunks (one download per image chunk in all)."""
        c = self.components
        with c.resident_chain() as chain:
            if chain is not None and c.loaded.has("prior_embeds") and request.decoder.callback is None:
                kept = self.prior_pipe.sample_on_device(request.prior, chain)
                embeds = _device_embeds(c, chain, kept, request.prior.sample_negatives)
                return self.decoder_pipe.run(request.decoder, embeds)
        out = self.prior_pipe.run(request.prior)
        decoder = with_embeddings(self.components.loaded, request.decoder, out.image_embeds, out.negative_image_embeds)
        return self.decoder_pipe.run(decoder)

    def _call(self, prompts: args.Prompts, rng, prior: PriorSettings, decoder: DecoderSettings):
        return self.run(combined_request(self.components.loaded, prompts, prior, decoder, rng))


def _device_embeds(c: Components, chain: ResidentChain, kept: list[DeviceRows],
                   sample_negatives: bool) -> ChunkEmbeds:
    """The decoder's ``image_embeds`` per chunk from the prior's rows kept on the device (``kept``: one
    piece per prior chunk, rows in order): decoder row ``r`` takes prior row ``r``, its negative the
    prior's row ``positives + r`` when it sampled the negatives, else the zero-image embedding (host
    upload); rows padded as ``inputs.take`` pads. Mirrors ``prior_output`` + ``with_embeddings``."""
    where = [(i, j) for i, piece in enumerate(kept) for j in range(len(piece))]  # prior row -> (piece, row)
    positives = len(where) // 2 if sample_negatives else len(where)
    zero, cfg = c.loaded.constant("zero_image_embeds"), c.profile.cfg

    def select(prior_rows: list[int]) -> list[DeviceRows]:
        runs: list[tuple[int, list[int]]] = []  # consecutive rows of one piece: one device copy each
        for row in prior_rows:
            piece, j = where[row]
            if runs and runs[-1][0] == piece:
                runs[-1][1].append(j)
            else:
                runs.append((piece, [j]))
        return [kept[piece][rows] for piece, rows in runs]

    def embeds(rows: slice, batch: int) -> DeviceRows:
        real = list(range(rows.start, rows.stop))
        padded = real + real[-1:] * (batch - len(real))
        pieces = select(padded)
        if cfg:
            negatives = (select([positives + r for r in padded]) if sample_negatives
                         else [np.repeat(zero, batch, axis=0)])
            pieces = negatives + pieces
        return chain.gather("image_embeds", pieces)

    return embeds


class KandinskyCombinedPipeline(_Combined):
    """Text-to-image, prior and decoder together (diffusers ``KandinskyCombinedPipeline``)."""

    def __call__(self, prompt, negative_prompt=None, num_inference_steps: int = 100, guidance_scale: float = 4.0,
                 num_images_per_prompt: int = 1, height: args.Size = None, width: args.Size = None,
                 prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, output_type: str = "pil", callback=None,
                 callback_steps: int = 1, return_dict: bool = True, scheduler: str | None = None,
                 prior_step_noise=None, decoder_latents=None):
        prompts = args.check_prompts(prompt, negative_prompt, num_images_per_prompt)
        rng = args.rng(generator)
        decoder = DecoderSettings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            output_type=output_type, callback=callback, callback_steps=callback_steps, return_dict=return_dict,
            scheduler=scheduler, inputs=Text2ImgInputs(decoder_latents, latents_name="decoder_latents"))
        prior = PriorSettings(num_inference_steps=prior_num_inference_steps, guidance_scale=prior_guidance_scale,
                              latents=latents, step_noise=prior_step_noise)
        return self._call(prompts, rng, prior, decoder)


class KandinskyImg2ImgCombinedPipeline(_Combined):
    """Image-to-image, prior and decoder together (diffusers ``KandinskyImg2ImgCombinedPipeline``)."""

    decoder_class = KandinskyImg2ImgPipeline

    def __call__(self, prompt, image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, strength: float = 0.3,
                 height: args.Size = None, width: args.Size = None, prior_guidance_scale: float = 4.0,
                 prior_num_inference_steps: int = 25, generator: args.Generator = None, latents=None,
                 output_type: str = "pil", callback=None, callback_steps: int = 1, return_dict: bool = True,
                 scheduler: str | None = None, prior_step_noise=None, noise=None):
        prompts = args.check_prompts(prompt, negative_prompt, num_images_per_prompt)
        rng = args.rng(generator)
        decoder = DecoderSettings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            output_type=output_type, callback=callback, callback_steps=callback_steps, return_dict=return_dict,
            scheduler=scheduler, inputs=Img2ImgInputs(images_per_row(image, prompts), strength, noise))
        prior = PriorSettings(num_inference_steps=prior_num_inference_steps, guidance_scale=prior_guidance_scale,
                              latents=latents, step_noise=prior_step_noise)
        return self._call(prompts, rng, prior, decoder)


class KandinskyInpaintCombinedPipeline(_Combined):
    """Inpainting, prior and decoder together (diffusers ``KandinskyInpaintCombinedPipeline``)."""

    decoder_class = KandinskyInpaintPipeline

    def __call__(self, prompt, image, mask_image, negative_prompt=None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, height: args.Size = None,
                 width: args.Size = None, prior_guidance_scale: float = 4.0, prior_num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, output_type: str = "pil", callback=None,
                 callback_steps: int = 1, return_dict: bool = True, scheduler: str | None = None,
                 prior_step_noise=None, decoder_latents=None):
        prompts = args.check_prompts(prompt, negative_prompt, num_images_per_prompt)
        rng = args.rng(generator)
        inputs = InpaintInputs(images_per_row(image, prompts), images_per_row(mask_image, prompts), decoder_latents,
                               latents_name="decoder_latents")
        decoder = DecoderSettings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            output_type=output_type, callback=callback, callback_steps=callback_steps, return_dict=return_dict,
            scheduler=scheduler, inputs=inputs)
        prior = PriorSettings(num_inference_steps=prior_num_inference_steps, guidance_scale=prior_guidance_scale,
                              latents=latents, step_noise=prior_step_noise)
        return self._call(prompts, rng, prior, decoder)
