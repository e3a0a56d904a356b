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

A ``__call__`` checks its arguments into a :class:`DecoderRequest` (``request``: no network runs,
nothing is drawn) and runs it (``run``); the combined pipelines call those two themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Callable, Mapping

import numpy as np

from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.processing.images import (
    latent_keep_mask, postprocess, prepare_img2img_image, prepare_inpaint_inputs)
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable, img2img_add_noise, img2img_timesteps
from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, UNET_LOOP


@dataclass
class ImagePipelineOutput:
    images: list | np.ndarray


@dataclass(frozen=True)
class Img2ImgStart:
    """What img2img starts from: the preprocessed images (1 or one per prompt), noised at ``strength``."""

    pixels: np.ndarray
    strength: float
    train_timesteps: int
    noise: np.ndarray | None  # (rows, 4, h, w); None: drawn


@dataclass(frozen=True)
class InpaintStart:
    """What inpainting starts from: the preprocessed images and the keep-mask in latent space, per prompt."""

    pixels: np.ndarray
    keep: np.ndarray  # (prompts, 1, h, w)


@dataclass(frozen=True)
class DecoderRequest:
    """One decoder call, checked and row-aligned (rows = prompts x images per prompt); nothing drawn yet.

    Holds every argument but the image embeddings, so the combined pipelines build it before their prior.
    """

    prompts: list[str]  # rows
    negatives: list[str]  # rows
    count: int  # prompts
    per_prompt: int
    steps: int
    height: int
    width: int
    latent_shape: tuple[int, int, int, int]
    table: SchedulerTable  # the steps that run (img2img: the tail of the schedule)
    guidance_scale: float
    callback: Callable | None
    rng: np.random.Generator
    output_type: str
    return_dict: bool
    latents: np.ndarray | None = None  # text2img, inpaint: the initial draw, if given
    image: Img2ImgStart | InpaintStart | None = None
    step_noise: np.ndarray | None = None  # (stochastic steps, rows, 4, h, w), if given


@dataclass
class DecoderJob:
    """Everything one decoder run needs, row-aligned (rows = prompts x images per prompt)."""

    prompts: list[str]
    negatives: list[str]
    image_embeds: np.ndarray  # (rows, E)
    negative_image_embeds: np.ndarray  # (rows, E)
    latents: np.ndarray  # (rows, 4, h, w), already scaled / noised
    table: SchedulerTable
    guidance_scale: float
    step_noise: np.ndarray | None = None  # (stochastic steps, rows, 4, h, w)
    inpaint_conditioning: np.ndarray | None = None  # (rows, 5, h, w): masked image latents + mask
    callback: Callable | None = None
    size: tuple[int, int] | None = None  # (height, width): picks the profiles the rows run at


class _DecoderPipeline:
    """Shared machinery of the three decoder pipelines."""

    loop = UNET_LOOP

    def __init__(self, artifacts: str | os.PathLike | None = None, backend: str = "ort", device: str = "cpu",
                 components: Components | None = None) -> None:
        self.components = components or Components(artifacts, backend, device)

    def _call(self, call: dict, **inputs):
        """The public ``__call__``s: check the prompts, build the request, run it."""
        prompts = args.check_prompts(call["prompt"], call["negative_prompt"], call["num_images_per_prompt"])
        request = self.request(prompts, call, step_noise=call["step_noise"], **inputs)
        return self.run(request, call["image_embeds"], call["negative_image_embeds"])

    def request(self, prompts: args.Prompts, call: Mapping, step_noise=None, **inputs) -> DecoderRequest:
        """Check every argument but the image embeddings and preprocess the images on the host; runs no
        network and draws nothing. ``call``: num_inference_steps, guidance_scale, height, width, generator,
        output_type, callback, callback_steps, return_dict, scheduler; ``inputs``: the pipeline's own."""
        c = self.components
        steps = args.check_positive_int(call["num_inference_steps"], "num_inference_steps")
        args.check_output_type(call["output_type"])
        guidance = args.check_guidance(call["guidance_scale"], "guidance_scale", c.profile)
        callback = args.step_callback(call["callback"], call["callback_steps"])
        height, width = args.check_size(call["height"], call["width"], c.sizes, c.latent_scale)
        n, rows = prompts.per_prompt, len(prompts.texts) * prompts.per_prompt
        request = DecoderRequest(
            args.repeat_rows(prompts.texts, n), args.repeat_rows(prompts.negatives or [""] * len(prompts.texts), n),
            count=len(prompts.texts), per_prompt=n, steps=steps, height=height, width=width,
            latent_shape=c.latent_shape(rows, height, width),
            table=c.scheduler("decoder", steps, call["scheduler"]), guidance_scale=guidance, callback=callback,
            rng=args.rng(call["generator"]), output_type=call["output_type"], return_dict=call["return_dict"])
        request = self._with_inputs(request, **inputs)  # img2img: also the part of the table that runs
        stochastic = int(request.table.stochastic.sum())
        step_noise = args.check_array(step_noise, (stochastic, *request.latent_shape), "step_noise")
        return replace(request, step_noise=step_noise)

    def _with_inputs(self, request: DecoderRequest, latents=None) -> DecoderRequest:
        """The pipeline's own arguments, checked: text2img's explicit initial ``latents``."""
        return replace(request, latents=args.check_array(latents, request.latent_shape, "latents"))

    def run(self, request: DecoderRequest, image_embeds, negative_image_embeds):
        """Check the embeddings, draw what was not given (diffusers' order), run the networks."""
        width = self.components.manifest.model_dims.clip_dim
        embeds = [np.repeat(args.embeddings(value, name, request.count, width), request.per_prompt, axis=0)
                  for value, name in ((image_embeds, "image_embeds"), (negative_image_embeds, "negative_image_embeds"))]
        latents, extra = self._start(request)
        table, step_noise = request.table, request.step_noise
        if step_noise is None and table.stochastic.any():
            step_noise = request.rng.standard_normal((int(table.stochastic.sum()), *request.latent_shape),
                                                     dtype=np.float32)
        job = DecoderJob(request.prompts, request.negatives, *embeds, latents, table, request.guidance_scale,
                         step_noise, callback=request.callback, size=(request.height, request.width), **extra)
        images = postprocess(self._denoise_and_decode(job), request.output_type)
        return ImagePipelineOutput(images) if request.return_dict else (images,)

    def _start(self, request: DecoderRequest) -> tuple[np.ndarray, dict]:
        """Initial latents (drawn unless given) and extra job fields."""
        latents = args.draw_or_check(request.latents, request.latent_shape, "latents", request.rng)
        return latents * np.float32(request.table.init_noise_sigma), {}

    def _denoise_and_decode(self, job: DecoderJob) -> np.ndarray:
        c = self.components
        results = []
        for rows, batch in c.chunks(len(job.prompts), job.size):
            latents = c.denoise(self.loop, job.table, self._chunk_inputs(job, rows, batch), job.callback)
            results.append(latents[: rows.stop - rows.start])
        return self._decode_latents(np.concatenate(results), job.size)

    def _chunk_inputs(self, job: DecoderJob, rows: slice, batch: int) -> LoopInputs:
        cfg = self.components.profile.cfg
        pick = lambda a: args.take(a, rows, batch)  # noqa: E731
        conditioning = self._text(args.take_list(job.prompts, rows, batch),
                                  args.take_list(job.negatives, rows, batch), cfg)
        image = pick(job.image_embeds)
        conditioning["image_embeds"] = np.concatenate([pick(job.negative_image_embeds), image]) if cfg else image
        extras = {}
        if job.inpaint_conditioning is not None:
            cond = pick(job.inpaint_conditioning)
            extras["conditioning"] = np.concatenate([cond, cond]) if cfg else cond
        noise = None if job.step_noise is None else args.take(job.step_noise.swapaxes(0, 1), rows, batch).swapaxes(0, 1)
        return LoopInputs(pick(job.latents), conditioning, extras, noise, job.guidance_scale)

    def _text(self, prompts: list[str], negatives: list[str], cfg: bool) -> dict[str, np.ndarray]:
        ids, mask = self.components.decoder_tokenizer.encode(negatives + prompts if cfg else prompts)
        out = self.components.run("text_encoder", {"input_ids": ids, "attention_mask": mask})
        # The UNet attends to all 77 tokens: diffusers discards the text mask (kandinsky_map §1.3).
        return {"encoder_hidden_states": out["last_hidden_state"], "text_embeds": out["text_embeds"]}

    def _decode_latents(self, latents: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        c, images = self.components, []
        for rows, batch in c.chunks(len(latents), size):
            feeds = {"latents": args.take(latents, rows, batch)}
            images.append(c.run("movq_decoder", feeds)["image"][: rows.stop - rows.start])
        return np.concatenate(images)


class KandinskyPipeline(_DecoderPipeline):
    """Text-to-image decoder (diffusers ``KandinskyPipeline``): same arguments and defaults, plus
    ``scheduler`` ("ddim" default, "ddpm", "dpmpp2m") and ``step_noise`` (stochastic schedulers)."""

    def __call__(self, prompt, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, generator: args.Generator = None,
                 latents=None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, step_noise=None):
        return self._call(dict(locals()), latents=latents)


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
        return self._call(dict(locals()), image=image, strength=strength, noise=noise)

    def _with_inputs(self, request: DecoderRequest, image, strength, noise=None) -> DecoderRequest:
        train = request.table.config.get("num_train_timesteps", 1000)
        strength = args.check_strength(strength, request.steps, train)
        images = image if isinstance(image, (list, tuple)) else [image]
        scale = self.components.latent_scale
        pixels = _pixels([prepare_img2img_image(i, request.height, request.width, scale) for i in images], request, "image")
        table = img2img_timesteps(request.table, request.steps, strength)[0]
        start = Img2ImgStart(pixels, strength, train, args.check_array(noise, request.latent_shape, "noise"))
        return replace(request, table=table, image=start)

    def _start(self, request: DecoderRequest) -> tuple[np.ndarray, dict]:
        start = request.image
        encoded = self._encode_images(start.pixels, request.count)
        noise = args.draw_or_check(start.noise, request.latent_shape, "noise", request.rng)
        latents = np.repeat(encoded, request.per_prompt, axis=0) * np.float32(request.table.init_noise_sigma)
        return img2img_add_noise(latents, noise, start.strength, start.train_timesteps), {}

    def _encode_images(self, pixels: np.ndarray, count: int) -> np.ndarray:
        """MoVQ-encode ``pixels`` and broadcast one image to every prompt."""
        c, out = self.components, []
        for rows, batch in c.chunks(len(pixels), pixels.shape[-2:]):
            feeds = {"image": args.take(pixels, rows, batch)}
            out.append(c.run("movq_encoder", feeds)["latents"][: rows.stop - rows.start])
        latents = np.concatenate(out)
        return np.repeat(latents, count, axis=0) if len(latents) == 1 else latents


def _pixels(pixels: list[np.ndarray], request: DecoderRequest, name: str) -> np.ndarray:
    if len(pixels) not in (1, request.count):
        raise PipelineInputError(f"{name}: expected 1 image or one per prompt ({request.count}), found {len(pixels)}")
    return np.concatenate(pixels)


class KandinskyInpaintPipeline(KandinskyImg2ImgPipeline):
    """Inpainting decoder (diffusers ``KandinskyInpaintPipeline``): white / 1 in ``mask_image`` marks
    the region to repaint; the keep-region is eroded in latent space as diffusers does."""

    loop = INPAINT_LOOP

    def __call__(self, prompt, image, mask_image, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, generator: args.Generator = None,
                 latents=None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, step_noise=None):
        return self._call(dict(locals()), image=image, mask_image=mask_image, latents=latents)

    def _with_inputs(self, request: DecoderRequest, image, mask_image, latents=None) -> DecoderRequest:
        if not self.components.has("unet_inpaint"):
            raise PipelineInputError("artifacts: expected an inpaint UNet (export with --inpaint DIR), found none")
        with args.renamed({"mask": "mask_image"}):  # image_processing's name for it
            pixels, keep = prepare_inpaint_inputs(image, mask_image, request.height, request.width,
                                                  self.components.latent_scale)
        pixels = _pixels(list(pixels[:, None]), request, "image")
        keep = latent_keep_mask(keep, request.latent_shape[-2:])
        if len(keep) not in (1, request.count):
            raise PipelineInputError(
                f"mask_image: expected 1 mask or one per prompt ({request.count}), found {len(keep)}")
        keep = np.repeat(keep, request.count // len(keep), axis=0)
        latents = args.check_array(latents, request.latent_shape, "latents")
        return replace(request, latents=latents, image=InpaintStart(pixels, keep))

    def _start(self, request: DecoderRequest) -> tuple[np.ndarray, dict]:
        start = request.image
        image_latents = self._encode_images(start.pixels, request.count)
        conditioning = np.concatenate([image_latents * start.keep, start.keep], axis=1)
        latents, _ = _DecoderPipeline._start(self, request)
        return latents, {"inpaint_conditioning": np.repeat(conditioning, request.per_prompt, axis=0)}
