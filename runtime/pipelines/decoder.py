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
sizes are rounded up to a multiple of 64 as in diffusers and refused, before any network runs, if
the artifacts do not hold them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.processing.images import (
    latent_keep_mask, postprocess, prepare_img2img_image, prepare_inpaint_inputs)
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable, img2img_add_noise, img2img_timesteps
from kandinsky_trt.runtime.contract.spec import INPAINT_LOOP, LATENT_CHANNELS, LATENT_SCALE, UNET_LOOP


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
    size: tuple[int, int] | None = None  # (height, width): picks the profiles the rows run at


class _DecoderPipeline:
    """Shared machinery of the three decoder pipelines."""

    loop = UNET_LOOP

    def __init__(self, artifacts: str | os.PathLike | None = None, backend: str = "ort", device: str = "cpu",
                 components: Components | None = None) -> None:
        self.components = components or Components(artifacts, backend, device)

    def _text(self, prompts: list[str], negatives: list[str], cfg: bool) -> dict[str, np.ndarray]:
        ids, mask = self.components.decoder_tokenizer.encode(negatives + prompts if cfg else prompts)
        out = self.components.run("text_encoder", {"input_ids": ids, "attention_mask": mask})
        # The UNet attends to all 77 tokens: diffusers discards the text mask (kandinsky_map §1.3).
        return {"encoder_hidden_states": out["last_hidden_state"], "text_embeds": out["text_embeds"]}

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

    def _decode_latents(self, latents: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        c, images = self.components, []
        for rows, batch in c.chunks(len(latents), size):
            feeds = {"latents": args.take(latents, rows, batch)}
            images.append(c.run("movq_decoder", feeds)["image"][: rows.stop - rows.start])
        return np.concatenate(images)

    def _run(self, job: DecoderJob) -> np.ndarray:
        c = self.components
        results = []
        for rows, batch in c.chunks(len(job.prompts), job.size):
            latents = c.denoise(self.loop, job.table, self._chunk_inputs(job, rows, batch), job.callback)
            results.append(latents[: rows.stop - rows.start])
        return self._decode_latents(np.concatenate(results), job.size)

    def _prepare(self, call: dict) -> dict:
        """Validate every argument but the image embeddings and preprocess the images on the host.

        Runs no network and draws nothing, so the combined pipelines call it before their prior.
        """
        c = self.components
        prompts = args.as_prompt_list(call["prompt"])
        n = args.check_images_per_prompt(call["num_images_per_prompt"], len(prompts))
        steps = args.check_positive_int(call["num_inference_steps"], "num_inference_steps")
        args.check_output_type(call["output_type"])
        guidance = args.check_guidance(call["guidance_scale"], "guidance_scale", c.profile)
        callback = args.step_callback(call["callback"], call["callback_steps"])
        height, width = args.check_size(call["height"], call["width"], c.sizes)
        negatives = args.negative_prompts(call["negative_prompt"], len(prompts)) or [""] * len(prompts)
        repeat = lambda xs: [x for x in xs for _ in range(n)]  # noqa: E731 (repeat_interleave)
        rows = len(prompts) * n
        d = dict(n=n, steps=steps, prompts=repeat(prompts), negatives=repeat(negatives), count=len(prompts),
                 rows=rows, guidance=guidance, callback=callback, height=height, width=width,
                 latent_shape=(rows, LATENT_CHANNELS, height // LATENT_SCALE, width // LATENT_SCALE),
                 table=c.scheduler("decoder", steps, call["scheduler"]), rng=args.rng(call["generator"]),
                 output_type=call["output_type"], return_dict=call["return_dict"])
        self._prepare_inputs(call, d)  # may replace d["table"] by the part img2img runs
        stochastic = int(d["table"].stochastic.sum())
        d["step_noise"] = args.check_array(call["step_noise"], (stochastic, *d["latent_shape"]), "step_noise")
        return d

    def _prepare_inputs(self, call: dict, d: dict) -> None:
        """Pipeline-specific arguments: the explicit initial ``latents``."""
        d["latents"] = args.check_array(call["latents"], d["latent_shape"], "latents")

    def _start(self, d: dict) -> tuple[np.ndarray, dict]:
        """Initial latents (drawn unless given) and extra job fields."""
        latents = args.draw_or_check(d["latents"], d["latent_shape"], "latents", d["rng"])
        return latents * np.float32(d["table"].init_noise_sigma), {}

    def _generate(self, d: dict, image_embeds, negative_image_embeds):
        """Check the embeddings, draw what was not given (diffusers' order), run the networks."""
        width = self.components.manifest.model_dims.clip_dim
        embeds = [np.repeat(args.embeddings(value, name, d["count"], width), d["n"], axis=0)
                  for value, name in ((image_embeds, "image_embeds"), (negative_image_embeds, "negative_image_embeds"))]
        latents, extra = self._start(d)
        table, step_noise = d["table"], d["step_noise"]
        if step_noise is None and table.stochastic.any():
            step_noise = d["rng"].standard_normal((int(table.stochastic.sum()), *d["latent_shape"]), dtype=np.float32)
        job = DecoderJob(d["prompts"], d["negatives"], *embeds, latents, table, d["guidance"], step_noise,
                         callback=d["callback"], size=(d["height"], d["width"]), **extra)
        images = postprocess(self._run(job), d["output_type"])
        return ImagePipelineOutput(images) if d["return_dict"] else (images,)

    def _call(self, call: dict):
        call.pop("self", None)
        return self._generate(self._prepare(call), call["image_embeds"], call["negative_image_embeds"])


class KandinskyPipeline(_DecoderPipeline):
    """Text-to-image decoder (diffusers ``KandinskyPipeline``): same arguments and defaults, plus
    ``scheduler`` ("ddim" default, "ddpm", "dpmpp2m") and ``step_noise`` (stochastic schedulers)."""

    def __call__(self, prompt, image_embeds, negative_image_embeds, negative_prompt=None,
                 height: args.Size = None, width: args.Size = None, num_inference_steps: int = 100,
                 guidance_scale: float = 4.0, num_images_per_prompt: int = 1, generator: args.Generator = None,
                 latents=None, output_type: str = "pil", callback=None, callback_steps: int = 1,
                 return_dict: bool = True, scheduler: str | None = None, step_noise=None):
        return self._call(dict(locals()))


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
        return self._call(dict(locals()))

    def _prepare_inputs(self, call: dict, d: dict) -> None:
        train = d["table"].config.get("num_train_timesteps", 1000)
        d["strength"] = args.check_strength(call["strength"], d["steps"], train)
        images = call["image"] if isinstance(call["image"], (list, tuple)) else [call["image"]]
        d["pixels"] = self._pixels([prepare_img2img_image(i, d["height"], d["width"]) for i in images], d, "image")
        d["train_timesteps"], d["table"] = train, img2img_timesteps(d["table"], d["steps"], d["strength"])[0]
        d["noise"] = args.check_array(call["noise"], d["latent_shape"], "noise")

    @staticmethod
    def _pixels(pixels: list[np.ndarray], d: dict, name: str) -> np.ndarray:
        if len(pixels) not in (1, d["count"]):
            raise PipelineInputError(f"{name}: expected 1 image or one per prompt ({d['count']}), found {len(pixels)}")
        return np.concatenate(pixels)

    def _start(self, d: dict) -> tuple[np.ndarray, dict]:
        encoded = self._encode_images(d["pixels"], d["count"])
        noise = args.draw_or_check(d["noise"], d["latent_shape"], "noise", d["rng"])
        start = np.repeat(encoded, d["n"], axis=0) * np.float32(d["table"].init_noise_sigma)
        return img2img_add_noise(start, noise, d["strength"], d["train_timesteps"]), {}

    def _encode_images(self, pixels: np.ndarray, count: int) -> np.ndarray:
        """MoVQ-encode ``pixels`` and broadcast one image to every prompt."""
        c, out = self.components, []
        for rows, batch in c.chunks(len(pixels), pixels.shape[-2:]):
            feeds = {"image": args.take(pixels, rows, batch)}
            out.append(c.run("movq_encoder", feeds)["latents"][: rows.stop - rows.start])
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
        return self._call(dict(locals()))

    def _prepare_inputs(self, call: dict, d: dict) -> None:
        if not self.components.has("unet_inpaint"):
            raise PipelineInputError("artifacts: expected an inpaint UNet (export with --inpaint DIR), found none")
        with args.renamed({"mask": "mask_image"}):  # image_processing's name for it
            pixels, keep = prepare_inpaint_inputs(call["image"], call["mask_image"], d["height"], d["width"])
        d["pixels"] = self._pixels(list(pixels[:, None]), d, "image")
        keep = latent_keep_mask(keep, d["latent_shape"][-2:])
        if len(keep) not in (1, d["count"]):
            raise PipelineInputError(f"mask_image: expected 1 mask or one per prompt ({d['count']}), found {len(keep)}")
        d["keep"] = np.repeat(keep, d["count"] // len(keep), axis=0)
        d["latents"] = args.check_array(call["latents"], d["latent_shape"], "latents")

    def _start(self, d: dict) -> tuple[np.ndarray, dict]:
        image_latents = self._encode_images(d["pixels"], d["count"])
        conditioning = np.repeat(np.concatenate([image_latents * d["keep"], d["keep"]], axis=1), d["n"], axis=0)
        latents, _ = _DecoderPipeline._start(self, d)
        return latents, {"inpaint_conditioning": conditioning}
