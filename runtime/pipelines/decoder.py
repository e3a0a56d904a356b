"""The decoder pipelines: text2img, img2img and inpaint on exported artifacts, without torch.

All three share one path (kandinsky_map §1.3-1.5): M-CLIP text encoding, the UNet loop with
classifier-free guidance, MoVQ decoding, post-processing. Rows are processed in chunks of the
batches the artifacts hold at the request's size (``Components.chunks``); each row is independent,
so chunking does not change results.

Fixed diffusers bugs (README "Divergences from diffusers"): image embeddings are repeated per image
also without guidance (diffusers crashes for ``guidance_scale <= 1`` with several images per prompt),
and img2img no longer swaps height and width.

``height``/``width`` default to the artifacts' default size, their first (diffusers defaults to 512,
the size its model was trained at; static-shape artifacts serve only the sizes they hold). Other
sizes are rounded up as in diffusers (to a multiple of the MoVQ scale factor squared, 64 for
Kandinsky 2.1) and refused, before any network runs, if the artifacts do not hold them.

On TensorRT the stages chain on the device (``Components.resident_chain``): text encoder
outputs, the loop's retired latents and the MoVQ input never leave it; one download per chunk (its
image). img2img's and inpainting's start runs there too (MoVQ encoding per chunk, then the
``img2img_start`` / ``inpaint_start`` bridge graph) where the artifacts have the bridge graphs, else
in host numpy (one download per encoder chunk); any call with a step ``callback`` keeps the host path
(it downloads the latents every step anyway).

A ``__call__`` checks its arguments into a :class:`~.requests.DecoderRequest`
(``requests.decoder_request``, then ``with_embeddings``: no network runs, nothing is drawn) and runs
it (``run``, the same for the three pipelines: the request's ``image`` start says which task it is);
the combined pipelines, the CLI and the server build and run requests the same way.
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, UNET_LOOP, LoopSpec
from kandinsky_trt.runtime.contract.schedulers import (img2img_add_noise, img2img_noise_coefficients,
                                                        img2img_timesteps)
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.resident import ResidentChain
from kandinsky_trt.runtime.pipelines.requests import (DecoderRequest, DecoderSettings, Img2ImgInputs, Img2ImgStart,
                                                      InpaintInputs, InpaintStart, Text2ImgInputs, decoder_request,
                                                      with_embeddings)
from kandinsky_trt.runtime.processing.images import postprocess

if TYPE_CHECKING:
    from kandinsky_trt.runtime.backends.base import DeviceRows

__all__ = ["ImagePipelineOutput", "KandinskyImg2ImgPipeline", "KandinskyInpaintPipeline", "KandinskyPipeline",
           "DecoderRequest", "img2img_steps"]


def loop_spec_of(request: DecoderRequest) -> LoopSpec:
    """The loop a decoder request runs: the inpaint UNet's for an inpainting start, else the UNet's."""
    return INPAINT_LOOP if isinstance(request.image, InpaintStart) else UNET_LOOP


@dataclass
class ImagePipelineOutput:
    images: list | np.ndarray


class _DecoderPipeline:
    """Shared machinery of the three decoder pipelines."""

    def __init__(self, artifacts: str | os.PathLike | None = None, backend: str = "ort", device: str = "cpu",
                 components: Components | None = None) -> None:
        self.components = components or Components(artifacts, backend, device)

    def _call(self, prompts: args.Prompts, settings: DecoderSettings, generator: args.Generator,
              image_embeds, negative_image_embeds):
        """The public ``__call__``s: build the request (checked), attach the embeddings, run it."""
        loaded = self.components.loaded
        request = decoder_request(loaded, prompts, settings, args.rng(generator))
        return self.run(with_embeddings(loaded, request, image_embeds, negative_image_embeds))

    def run(self, request: DecoderRequest, embeds: "ChunkEmbeds | None" = None):
        """Draw what was not given (diffusers' order: start latents, then step noise), run the networks.

        Any decoder request runs here: its ``image`` start (None, img2img's, inpainting's) picks the loop.
        ``embeds``: each chunk's ``image_embeds`` conditioning from elsewhere (a combined pipeline's
        prior on the device); by default the embeddings attached to the request (``with_embeddings``).
        """
        if embeds is None and (request.image_embeds is None or request.negative_image_embeds is None):
            raise PipelineInputError("image_embeds: expected embeddings attached to the request (with_embeddings), "
                                     "found none")
        drawn, request = self._drawn(request)
        images = postprocess(self._denoise_and_decode(request, drawn, embeds), request.output_type)
        return ImagePipelineOutput(images) if request.return_dict else (images,)

    def _draw(self, request: DecoderRequest,
              encoded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, DecoderRequest]:
        """:meth:`_drawn`, then :meth:`_start` on the host: the start latents, inpainting's
        conditioning, and the request with its step noise."""
        drawn, request = self._drawn(request)
        return *self._start(request, drawn, encoded), request

    def _drawn(self, request: DecoderRequest) -> tuple[np.ndarray, DecoderRequest]:
        """The start draw (img2img: the noise its image latents get; else the initial latents), each
        checked if given, then the step noise unless given (diffusers' order); the request with it."""
        start = request.image
        if isinstance(start, Img2ImgStart):
            drawn = args.draw_or_check(start.noise, request.latent_shape, "noise", request.rng)
        else:
            drawn = args.draw_or_check(request.latents, request.latent_shape, "latents", request.rng)
        table, step_noise = request.table, request.step_noise
        if step_noise is None and table.stochastic.any():
            step_noise = request.rng.standard_normal((int(table.stochastic.sum()), *request.latent_shape),
                                                     dtype=np.float32)
        return drawn, replace(request, step_noise=step_noise)

    def _start(self, request: DecoderRequest, drawn: np.ndarray,
               encoded: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The loop's initial latents (``drawn`` scaled; img2img: the image latents noised with
        ``drawn``) and inpainting's conditioning (masked image latents + mask, per row; None otherwise).
        ``encoded``: the image's MoVQ latents when already encoded (:meth:`_movq_encode`; the step
        executor merges several requests' encoder calls), else they are encoded here."""
        start, sigma = request.image, np.float32(request.table.init_noise_sigma)
        if isinstance(start, Img2ImgStart):
            encoded = self._encode_images(start.pixels, request.count, encoded)
            latents = np.repeat(encoded, request.per_prompt, axis=0) * sigma
            return img2img_add_noise(latents, drawn, start.strength, start.train_timesteps), None
        conditioning = None
        if isinstance(start, InpaintStart):
            image_latents = self._encode_images(start.pixels, request.count, encoded)
            conditioning = np.concatenate([image_latents * start.keep, start.keep], axis=1)
            conditioning = np.repeat(conditioning, request.per_prompt, axis=0)
        return drawn * sigma, conditioning

    def _starts_on_device(self, request: DecoderRequest) -> bool:
        """Whether a resident chain computes this request's start (img2img, inpaint) with its bridge graph."""
        bridge = {Img2ImgStart: "img2img_start", InpaintStart: "inpaint_start"}.get(type(request.image))
        return bridge is not None and self.components.loaded.has(bridge)

    def _denoise_and_decode(self, request: DecoderRequest, drawn: np.ndarray,
                            embeds: "ChunkEmbeds | None" = None) -> np.ndarray:
        """Denoise each chunk, then decode it with MoVQ. On a resident chain (TensorRT; not with a step
        callback, which downloads every step) it stays on the device: one download per chunk, its image;
        img2img's and inpainting's start too where the artifacts have their bridge graph
        (:meth:`_device_start`)."""
        c = self.components
        loop = loop_spec_of(request)
        with c.resident_chain() if request.callback is None else nullcontext() as chain:
            on_device = chain is not None and self._starts_on_device(request)
            latents, conditioning = (drawn, None) if on_device else self._start(request, drawn)
            results = []
            for rows, batch in c.chunks(len(request.prompts), request.size):
                chunk = ChunkRows(latents, conditioning, rows, batch)
                inputs = self._chunk_inputs(request, chunk, chain, embeds)
                if chain is None:
                    results.append(c.denoise(loop, request.table, inputs, request.callback)[: rows.stop - rows.start])
                    continue
                if on_device:
                    inputs = self._device_start(request, chunk, inputs, chain)
                into = chain.stage_input("movq_decoder", "latents", inputs.latents)  # retired straight into MoVQ
                latents_in = chain.denoise(loop, request.table, inputs, into)
                image = chain.run("movq_decoder", {"latents": latents_in})["image"]
                results.append(chain.download(image, "movq_decoder.image")[: rows.stop - rows.start])
        if chain is not None:
            return np.concatenate(results)
        # The host path decodes in the same chunks (same rows, same batches) as it denoised.
        return self._decode_latents(np.concatenate(results), request.size)

    def _device_start(self, request: DecoderRequest, chunk: "ChunkRows", inputs: LoopInputs,
                      chain: ResidentChain) -> LoopInputs:
        """The chunk's start on the device (``chunk.latents`` holds the request's draw): MoVQ-encode the
        distinct images its rows use (one call at the chunk's batch), gather each row's latents, and
        run the task's bridge graph; the loop admits its outputs (device rows) as the start latents
        (img2img) or as the step-graph conditioning and first network input (inpaint)."""
        start, batch = request.image, chunk.batch
        real = list(range(chunk.rows.start, chunk.rows.stop))
        padded = real + real[-1:] * (batch - len(real))  # as ``inputs.take`` pads
        prompt = [row // request.per_prompt for row in padded]
        image = [0 if len(start.pixels) == 1 else p for p in prompt]
        distinct = sorted(set(image))
        pixels = start.pixels[distinct + distinct[-1:] * (batch - len(distinct))]
        encoded = chain.run("movq_encoder", {"image": pixels})["latents"]
        image_latents = encoded[[distinct.index(i) for i in image]]
        sigma = np.float32(request.table.init_noise_sigma)
        if isinstance(start, Img2ImgStart):
            signal, spread = img2img_noise_coefficients(start.strength, start.train_timesteps)
            coefficients = np.tile(np.array([[sigma, signal, spread]], np.float32), (batch, 1))
            feeds = {"image_latents": image_latents, "noise": args.take(chunk.latents, chunk.rows, batch),
                     "coefficients": coefficients}
            return replace(inputs, latents=chain.run("img2img_start", feeds)["latents"])
        feeds = {"image_latents": image_latents, "keep": start.keep[prompt], "latents": inputs.latents * sigma}
        out = chain.run("inpaint_start", feeds)
        groups = 2 if self.components.profile.cfg else 1  # the step graph's conditioning: [cond; cond] with guidance
        return replace(inputs, latents=feeds["latents"], first_input=out["model_input"],
                       step_extras={"conditioning": out["conditioning"][list(range(batch)) * groups]})

    def _chunk_inputs(self, request: DecoderRequest, chunk: "ChunkRows", chain: ResidentChain | None,
                      embeds: "ChunkEmbeds | None" = None) -> LoopInputs:
        text = self._text(args.take_list(request.prompts, chunk.rows, chunk.batch),
                          args.take_list(request.negatives, chunk.rows, chunk.batch), self.components.profile.cfg,
                          chain)
        return self._loop_inputs(request, chunk, text, embeds)

    def _loop_inputs(self, request: DecoderRequest, chunk: "ChunkRows", text: dict,
                     embeds: "ChunkEmbeds | None" = None) -> LoopInputs:
        """A chunk's loop inputs around its text conditioning ``text`` (:meth:`_text` of its rows):
        the image embeddings (``embeds`` of the chunk, else the request's), inpainting's conditioning,
        the start latents and step noise of its rows."""
        cfg = self.components.profile.cfg
        pick = lambda a: args.take(a, chunk.rows, chunk.batch)  # noqa: E731
        conditioning = dict(text)
        if embeds is not None:
            conditioning["image_embeds"] = embeds(chunk.rows, chunk.batch)
        else:
            image = pick(request.image_embeds)
            conditioning["image_embeds"] = (np.concatenate([pick(request.negative_image_embeds), image]) if cfg
                                            else image)
        extras = {}
        if chunk.conditioning is not None:
            cond = pick(chunk.conditioning)
            extras["conditioning"] = np.concatenate([cond, cond]) if cfg else cond
        noise = request.step_noise
        noise = None if noise is None else args.take(noise.swapaxes(0, 1), chunk.rows, chunk.batch).swapaxes(0, 1)
        return LoopInputs(pick(chunk.latents), conditioning, extras, noise, request.guidance_scale)

    def _text(self, prompts: list[str], negatives: list[str], cfg: bool, chain: ResidentChain | None) -> dict:
        """The UNet's text conditioning (host arrays, or device rows on a resident chain)."""
        ids, mask = self.components.loaded.decoder_tokenizer.encode(negatives + prompts if cfg else prompts)
        run = self.components.run if chain is None else chain.run
        out = run("text_encoder", {"input_ids": ids, "attention_mask": mask})
        # The UNet attends to all 77 tokens: diffusers discards the text mask (kandinsky_map §1.3).
        return {"encoder_hidden_states": out["last_hidden_state"], "text_embeds": out["text_embeds"]}

    def _decode_latents(self, latents: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        c, images = self.components, []
        for rows, batch in c.chunks(len(latents), size):
            feeds = {"latents": args.take(latents, rows, batch)}
            images.append(c.run("movq_decoder", feeds)["image"][: rows.stop - rows.start])
        return np.concatenate(images)

    def _encode_images(self, pixels: np.ndarray, count: int, encoded: np.ndarray | None = None) -> np.ndarray:
        """MoVQ-encode ``pixels`` (unless ``encoded`` holds their latents) and broadcast one image to every prompt."""
        latents = self._movq_encode(pixels) if encoded is None else encoded
        return np.repeat(latents, count, axis=0) if len(latents) == 1 else latents

    def _movq_encode(self, pixels: np.ndarray) -> np.ndarray:
        """The MoVQ latents of ``pixels`` (n, 3, H, W), in chunks of the profile batches of their size."""
        c, out = self.components, []
        for rows, batch in c.chunks(len(pixels), pixels.shape[-2:]):
            feeds = {"image": args.take(pixels, rows, batch)}
            out.append(c.run("movq_encoder", feeds)["latents"][: rows.stop - rows.start])
        return np.concatenate(out)


# A chunk's ``image_embeds`` conditioning, (rows, profile batch) -> [negatives; positives] padded to
# the batch (positives alone without guidance), as host arrays or device rows.
ChunkEmbeds = Callable[[slice, int], "np.ndarray | DeviceRows"]


@dataclass(frozen=True)
class ChunkRows:
    """One chunk of a decoder run: the run's start latents and inpaint conditioning, the chunk's rows
    and the profile batch they are padded to."""

    latents: np.ndarray
    conditioning: np.ndarray | None
    rows: slice
    batch: int


class KandinskyPipeline(_DecoderPipeline):
    """Text-to-image decoder (diffusers ``KandinskyPipeline``): same arguments and defaults, plus
    ``scheduler`` ("ddim" default, "ddpm", "dpmpp2m") and ``step_noise`` (stochastic schedulers)."""

    def __call__(self, prompt, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, generator: args.Generator = None,
                 latents=None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, step_noise=None):
        prompts = args.check_prompts(prompt, negative_prompt, num_images_per_prompt)
        settings = DecoderSettings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            output_type=output_type, callback=callback, callback_steps=callback_steps, return_dict=return_dict,
            scheduler=scheduler, step_noise=step_noise, inputs=Text2ImgInputs(latents))
        return self._call(prompts, settings, generator, image_embeds, negative_image_embeds)


def img2img_steps(num_inference_steps: int, strength: float) -> int:
    """How many of ``num_inference_steps`` img2img runs at ``strength`` (diffusers' ``get_timesteps``)."""
    return img2img_timesteps(np.arange(num_inference_steps), num_inference_steps, strength)[1]


class KandinskyImg2ImgPipeline(_DecoderPipeline):
    """Image-to-image decoder (diffusers ``KandinskyImg2ImgPipeline``; default guidance 7.0 as there).

    ``noise`` is the draw mixed into the encoded image (Kandinsky's own linear 1e-4..0.02 schedule at
    ``t = int(1000 * strength) - 2``). ``image``: one image (used for every prompt) or one per prompt.
    A ``strength`` so small that no step would run raises (diffusers silently runs none).
    """

    def __call__(self, prompt, image, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 strength: float = 0.3, guidance_scale: float = 7.0, num_images_per_prompt: int = 1,
                 generator: args.Generator = None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, noise=None, step_noise=None):
        prompts = args.check_prompts(prompt, negative_prompt, num_images_per_prompt)
        settings = DecoderSettings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            output_type=output_type, callback=callback, callback_steps=callback_steps, return_dict=return_dict,
            scheduler=scheduler, step_noise=step_noise, inputs=Img2ImgInputs(image, strength, noise))
        return self._call(prompts, settings, generator, image_embeds, negative_image_embeds)


class KandinskyInpaintPipeline(_DecoderPipeline):
    """Inpainting decoder (diffusers ``KandinskyInpaintPipeline``): white / 1 in ``mask_image`` marks
    the region to repaint; the keep-region is eroded in latent space as diffusers does."""

    def __call__(self, prompt, image, mask_image, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, generator: args.Generator = None,
                 latents=None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, step_noise=None):
        prompts = args.check_prompts(prompt, negative_prompt, num_images_per_prompt)
        settings = DecoderSettings(
            num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height, width=width,
            output_type=output_type, callback=callback, callback_steps=callback_steps, return_dict=return_dict,
            scheduler=scheduler, step_noise=step_noise, inputs=InpaintInputs(image, mask_image, latents))
        return self._call(prompts, settings, generator, image_embeds, negative_image_embeds)
