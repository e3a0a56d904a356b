"""The decoder pipelines: text2img, img2img and inpaint on exported artifacts, without torch.

All three share one path (kandinsky_map §1.3-1.5): M-CLIP text encoding, the UNet loop with
classifier-free guidance, MoVQ decoding, post-processing. Rows are processed in chunks of the
artifacts' batch; each row is independent, so chunking does not change results.

Fixed diffusers bugs (README "Divergences from diffusers"): image embeddings are repeated per image
also without guidance (diffusers crashes for ``guidance_scale <= 1`` with several images per prompt),
and img2img no longer swaps height and width.

``height``/``width`` default to the size the artifacts were exported for (diffusers defaults to 512,
the size its model was trained at; static-shape artifacts serve only their own size). Other sizes
are rounded up to a multiple of 64 as in diffusers and refused, before any network runs, if the
artifacts do not hold them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kandinsky_trt.runtime import inputs as args
from kandinsky_trt.runtime.components import Components, PipelineInputError
from kandinsky_trt.runtime.image_processing import (
    latent_keep_mask, postprocess, prepare_img2img_image, prepare_inpaint_inputs)
from kandinsky_trt.runtime.loop import LoopInputs
from kandinsky_trt.runtime.schedulers import SchedulerTable, img2img_add_noise, img2img_timesteps
from kandinsky_trt.runtime.spec import INPAINT_LOOP, LATENT_CHANNELS, LATENT_SCALE, UNET_LOOP


@dataclass
class ImagePipelineOutput:
    images: list | np.ndarray


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


def _embeds(value, name: str, rows: int) -> np.ndarray:
    array = np.concatenate([np.asarray(v, np.float32).reshape(-1, np.shape(v)[-1]) for v in value]) \
        if isinstance(value, (list, tuple)) else np.asarray(value, np.float32)
    if array.ndim != 2 or array.shape[0] != rows:
        raise PipelineInputError(f"{name}: expected {rows} rows (one per prompt), found shape {array.shape}")
    return array


class _DecoderPipeline:
    """Shared machinery of the three decoder pipelines."""

    loop = UNET_LOOP

    def __init__(self, artifacts: str | os.PathLike | None = None, backend: str = "ort", device: str = "cpu",
                 components: Components | None = None) -> None:
        self.components = components or Components(artifacts, backend, device)

    def _text(self, prompts: list[str], negatives: list[str], cfg: bool) -> dict[str, np.ndarray]:
        ids, mask = self.components.decoder_tokenizer.encode(negatives + prompts if cfg else prompts)
        out = self.components.session("text_encoder").run({"input_ids": ids, "attention_mask": mask})
        # The UNet attends to all 77 tokens: diffusers discards the text mask (kandinsky_map §1.3).
        return {"encoder_hidden_states": out["last_hidden_state"], "text_embeds": out["text_embeds"]}

    def _chunk_inputs(self, job: DecoderJob, rows: slice) -> LoopInputs:
        batch, cfg = self.components.profile.batch, self.components.profile.cfg
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

    def _decode_latents(self, latents: np.ndarray) -> np.ndarray:
        batch, movq, images = self.components.profile.batch, self.components.session("movq_decoder"), []
        for rows in args.chunks(len(latents), batch):
            images.append(movq.run({"latents": args.take(latents, rows, batch)})["image"][: rows.stop - rows.start])
        return np.concatenate(images)

    def _run(self, job: DecoderJob) -> np.ndarray:
        c = self.components
        results = []
        for rows in args.chunks(len(job.prompts), c.profile.batch):
            latents = c.denoise(self.loop, job.table, self._chunk_inputs(job, rows), job.callback)
            results.append(latents[: rows.stop - rows.start])
        return self._decode_latents(np.concatenate(results))

    def _texts(self, prompt, negative_prompt, n: int, guidance_scale: float) -> tuple[list[str], list[str], int]:
        prompts = args.as_prompt_list(prompt)
        negatives = args.negative_prompts(negative_prompt, len(prompts)) or [""] * len(prompts)
        profile = self.components.profile
        if guidance_scale > 1.0 and not profile.cfg:
            raise PipelineInputError(
                f"guidance_scale: these artifacts were exported without classifier-free guidance "
                f"(profile {profile.name}), so it must be <= 1; found {guidance_scale}")
        if guidance_scale <= 1.0:
            negatives = prompts  # no guidance: both halves see the prompt, the result is the cond prediction
        repeat = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731 (repeat_interleave)
        return repeat(prompts), repeat(negatives), len(prompts)

    def _common(self, call: dict) -> dict:
        """Validate the arguments every decoder pipeline shares; returns the derived values."""
        c = self.components
        n = args.check_positive_int(call["num_images_per_prompt"], "num_images_per_prompt")
        steps = args.check_positive_int(call["num_inference_steps"], "num_inference_steps")
        args.check_output_type(call["output_type"])
        args.check_positive_int(call["callback_steps"], "callback_steps")
        height, width = args.check_size(call["height"], call["width"], c.profile)
        prompts, negatives, count = self._texts(call["prompt"], call["negative_prompt"], n, call["guidance_scale"])
        rows = len(prompts)
        image_embeds = np.repeat(_embeds(call["image_embeds"], "image_embeds", count), n, axis=0)
        negative_embeds = np.repeat(_embeds(call["negative_image_embeds"], "negative_image_embeds", count), n, axis=0)
        callback = call["callback"]
        if callback is not None:
            every = call["callback_steps"]
            user_callback = callback
            callback = lambda i, t, x: user_callback(i, t, x) if i % every == 0 else None  # noqa: E731
        latent_shape = (rows, LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE)
        return dict(n=n, steps=steps, prompts=prompts, negatives=negatives, count=count, rows=rows,
                    image_embeds=image_embeds, negative_embeds=negative_embeds, callback=callback,
                    latent_shape=latent_shape, table=c.scheduler("decoder", steps, call.get("scheduler")),
                    rng=args.rng(call["generator"]), height=height, width=width)

    def _step_noise(self, table: SchedulerTable, shape: tuple, step_noise, rng) -> np.ndarray | None:
        count = int(table.stochastic.sum())
        if count == 0 and step_noise is None:
            return None
        return args.draw_or_check(step_noise, (count, *shape), "step_noise", rng)

    def _finish(self, job: DecoderJob, output_type: str, return_dict: bool):
        images = postprocess(self._run(job), output_type)
        return ImagePipelineOutput(images) if return_dict else (images,)

    def _job(self, d: dict, latents: np.ndarray, table: SchedulerTable, call: dict, **extra) -> DecoderJob:
        return DecoderJob(d["prompts"], d["negatives"], d["image_embeds"], d["negative_embeds"], latents, table,
                          call["guidance_scale"], self._step_noise(table, d["latent_shape"], call["step_noise"], d["rng"]),
                          callback=d["callback"], **extra)


class KandinskyPipeline(_DecoderPipeline):
    """Text-to-image decoder (diffusers ``KandinskyPipeline``): same arguments and defaults, plus
    ``scheduler`` ("ddim" default, "ddpm", "dpmpp2m") and ``step_noise`` (stochastic schedulers)."""

    def __call__(self, prompt, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, generator: args.Generator = None,
                 latents=None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, step_noise=None):
        call = dict(locals())
        d = self._common(call)
        table = d["table"]
        latents = args.draw_or_check(latents, d["latent_shape"], "latents", d["rng"]) * np.float32(table.init_noise_sigma)
        return self._finish(self._job(d, latents, table, call), output_type, return_dict)


class KandinskyImg2ImgPipeline(_DecoderPipeline):
    """Image-to-image decoder (diffusers ``KandinskyImg2ImgPipeline``; default guidance 7.0 as there).

    ``noise`` is the draw mixed into the encoded image (Kandinsky's own linear 1e-4..0.02 schedule at
    ``t = int(1000 * strength) - 2``). ``image``: one image (used for every prompt) or one per prompt.
    """

    def __call__(self, prompt, image, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 strength: float = 0.3, guidance_scale: float = 7.0, num_images_per_prompt: int = 1,
                 generator: args.Generator = None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, noise=None, step_noise=None):
        call = dict(locals())
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
            raise PipelineInputError(f"strength: expected a number in (0, 1], found {strength!r}")
        d = self._common(call)
        images = image if isinstance(image, (list, tuple)) else [image]
        pixels = [prepare_img2img_image(i, d["height"], d["width"]) for i in images]
        encoded = self._encode_images(np.concatenate(pixels), d["count"], "image")
        table, _ = img2img_timesteps(d["table"], d["steps"], strength)
        noise = args.draw_or_check(noise, d["latent_shape"], "noise", d["rng"])
        start = np.repeat(encoded, d["n"], axis=0) * np.float32(table.init_noise_sigma)
        latents = img2img_add_noise(start, noise, strength, d["table"].config.get("num_train_timesteps", 1000))
        return self._finish(self._job(d, latents, table, call), output_type, return_dict)

    def _encode_images(self, pixels: np.ndarray, count: int, name: str) -> np.ndarray:
        """MoVQ-encode ``pixels`` and broadcast one image to every prompt."""
        if len(pixels) not in (1, count):
            raise PipelineInputError(f"{name}: expected 1 image or one per prompt ({count}), found {len(pixels)}")
        batch, movq, out = self.components.profile.batch, self.components.session("movq_encoder"), []
        for rows in args.chunks(len(pixels), batch):
            out.append(movq.run({"image": args.take(pixels, rows, batch)})["latents"][: rows.stop - rows.start])
        latents = np.concatenate(out)
        return np.repeat(latents, count, axis=0) if len(latents) == 1 else latents


class KandinskyInpaintPipeline(KandinskyImg2ImgPipeline):
    """Inpainting decoder (diffusers ``KandinskyInpaintPipeline``): white / 1 in ``mask_image`` marks
    the region to repaint; the keep-region is eroded in latent space as diffusers does."""

    loop = INPAINT_LOOP

    def __call__(self, prompt, image, mask_image, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, generator: args.Generator = None,
                 latents=None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, step_noise=None):
        call = dict(locals())
        if not self.components.has("unet_inpaint"):
            raise PipelineInputError("artifacts: expected an inpaint UNet (export with --inpaint DIR), found none")
        d = self._common(call)
        pixels, keep = prepare_inpaint_inputs(image, mask_image, d["height"], d["width"])
        image_latents = self._encode_images(pixels, d["count"], "image")
        keep = latent_keep_mask(keep, image_latents.shape[-2:])
        if len(keep) not in (1, d["count"]):
            raise PipelineInputError(f"mask_image: expected 1 mask or one per prompt ({d['count']}), found {len(keep)}")
        keep = np.repeat(keep, d["count"] // len(keep), axis=0)
        conditioning = np.repeat(np.concatenate([image_latents * keep, keep], axis=1), d["n"], axis=0)
        table = d["table"]
        latents = args.draw_or_check(latents, d["latent_shape"], "latents", d["rng"]) * np.float32(table.init_noise_sigma)
        job = self._job(d, latents, table, call, inpaint_conditioning=conditioning)
        return self._finish(job, output_type, return_dict)
