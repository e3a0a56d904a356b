"""``KandinskyPriorPipeline``: text (and images) -> CLIP image embeddings, without torch.

Mirrors diffusers' pipeline (kandinsky_map §1.1-1.2): CLIP text encoding, the UnCLIP loop over the
prior with classifier-free guidance, post-processing with CLIP mean/std, and the zero-image
embedding as the negative. Random draws: ``latents`` (rows, E) then one ``step_noise`` row block per
stochastic step, in diffusers' order; both can be passed explicitly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime import inputs as args
from kandinsky_trt.runtime.components import Components, PipelineInputError
from kandinsky_trt.runtime.image_processing import clip_image_preprocess
from kandinsky_trt.runtime.loop import LoopInputs
from kandinsky_trt.runtime.spec import PRIOR_LOOP


@dataclass
class KandinskyPriorPipelineOutput:
    image_embeds: np.ndarray
    negative_image_embeds: np.ndarray

    def to_tuple(self) -> tuple[np.ndarray, np.ndarray]:
        return self.image_embeds, self.negative_image_embeds


@dataclass(frozen=True)
class PriorRows:
    """One prior run, row-aligned: cond / uncond texts, initial latents, per-step noise."""

    cond: list[str]
    uncond: list[str]
    latents: np.ndarray  # (rows, E)
    step_noise: np.ndarray | None  # (stochastic steps, rows, E)


def _output(out: KandinskyPriorPipelineOutput, output_type: str, return_dict: bool):
    args.check_output_type(output_type, ("np", "pt"))
    if output_type == "pt":  # drop-in convenience for torch users; the runtime itself never needs torch
        import torch

        out = KandinskyPriorPipelineOutput(torch.from_numpy(out.image_embeds), torch.from_numpy(out.negative_image_embeds))
    return out if return_dict else out.to_tuple()


class KandinskyPriorPipeline:
    """Text -> image embedding prior on exported artifacts.

    Args:
        artifacts: an artifacts directory (from ``kandinsky-trt export``), or None with ``components``.
        backend: ``"ort"``, ``"torch"`` or ``"trt"``.
        components: share already-loaded components (the combined pipelines do).
    """

    def __init__(self, artifacts: str | os.PathLike | None = None, backend: str = "ort", device: str = "cpu",
                 components: Components | None = None) -> None:
        self.components = components or Components(artifacts, backend, device)

    def _encode(self, cond: list[str], uncond: list[str]) -> dict[str, np.ndarray]:
        """Prior network conditioning for one chunk: [uncond, cond] rows with guidance."""
        profile = self.components.profile
        texts = uncond + cond if profile.cfg else cond
        ids, mask = self.components.prior_tokenizer.encode(texts)
        encoded = self.components.session("prior_text_encoder").run({"input_ids": ids})
        return {"proj_embedding": encoded["text_embeds"], "encoder_hidden_states": encoded["last_hidden_state"],
                "attention_mask": mask.astype(bool)}

    def sample(self, rows: PriorRows, steps: int, guidance_scale: float) -> np.ndarray:
        """Run the prior loop on rows of texts; returns post-processed embeddings (rows, E)."""
        c = self.components
        table = c.scheduler("prior", steps)
        batch, results = c.profile.batch, []
        for chunk in args.chunks(len(rows.cond), batch):
            noise = rows.step_noise
            chunk_noise = None if noise is None else args.take(noise.swapaxes(0, 1), chunk, batch).swapaxes(0, 1)
            loop = LoopInputs(
                latents=args.take(rows.latents, chunk, batch) * np.float32(table.init_noise_sigma),
                conditioning=self._encode(args.take_list(rows.cond, chunk, batch),
                                          args.take_list(rows.uncond, chunk, batch)),
                step_extras={}, noise=chunk_noise, guidance_scale=guidance_scale,
            )
            results.append(c.denoise(PRIOR_LOOP, table, loop)[: chunk.stop - chunk.start])
        embeds = np.concatenate(results)
        return embeds * c.constant("clip_std") + c.constant("clip_mean")

    def _loop_texts(self, prompts: list[str], negatives: list[str] | None, guidance_scale: float):
        """diffusers' row layout: with a negative prompt the prior also samples the negatives."""
        texts = prompts + negatives if negatives is not None else prompts
        if guidance_scale <= 1.0 or not self.components.profile.cfg:
            self._check_guidance(guidance_scale)
            return texts, texts  # uncond == cond: guidance reduces to the cond prediction exactly
        uncond = 2 * negatives if negatives is not None else [""] * len(texts)
        return texts, uncond

    def _check_guidance(self, guidance_scale: float) -> None:
        if guidance_scale > 1.0 and not self.components.profile.cfg:
            raise PipelineInputError(
                f"guidance_scale: these artifacts were exported without classifier-free guidance "
                f"(profile {self.components.profile.name}), so it must be <= 1; found {guidance_scale}")

    def __call__(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, guidance_scale: float = 4.0,
                 output_type: str = "np", return_dict: bool = True, step_noise=None):
        """Same arguments and defaults as diffusers (``output_type`` "np" | "pt"), plus ``step_noise``:
        the prior's per-step variance noise, shape (stochastic steps, rows, E)."""
        prompts = args.as_prompt_list(prompt)
        negatives = args.negative_prompts(negative_prompt, len(prompts))
        n = args.check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        steps = args.check_positive_int(num_inference_steps, "num_inference_steps")
        args.check_output_type(output_type, ("np", "pt"))
        cond, uncond = self._loop_texts(prompts, negatives, guidance_scale)
        cond, uncond = [t for t in cond for _ in range(n)], [t for t in uncond for _ in range(n)]
        rng = args.rng(generator)
        dim = self.components.manifest.model_dims.clip_dim
        latents = args.draw_or_check(latents, (len(cond), dim), "latents", rng)
        stochastic = int(self.components.scheduler("prior", steps).stochastic.sum())
        step_noise = args.draw_or_check(step_noise, (stochastic, len(cond), dim), "step_noise", rng)
        embeds = self.sample(PriorRows(cond, uncond, latents, step_noise), steps, guidance_scale)
        if negatives is not None:
            image_embeds, negative_embeds = np.split(embeds, 2)
        else:
            image_embeds = embeds
            negative_embeds = np.repeat(self.components.constant("zero_image_embeds"), len(embeds), axis=0)
        return _output(KandinskyPriorPipelineOutput(image_embeds, negative_embeds), output_type, return_dict)

    def encode_image(self, image) -> np.ndarray:
        """CLIP image embedding (1, E) of a PIL image, preprocessed like diffusers' CLIPImageProcessor."""
        config = self.components.manifest.image_processor
        pixels = clip_image_preprocess(image, size=config["size"], mean=config["mean"], std=config["std"])
        return self.components.session("image_encoder").run({"pixel_values": pixels})["image_embeds"]

    def interpolate(self, images_and_prompts: list, weights: list[float], num_images_per_prompt: int = 1,
                    num_inference_steps: int = 25, generator: args.Generator = None, latents=None,
                    negative_prior_prompt=None, negative_prompt: str = "", guidance_scale: float = 4.0,
                    step_noise: list | None = None) -> KandinskyPriorPipelineOutput:
        """Weighted mix of text and image conditions (diffusers ``interpolate``).

        Fixed divergence: diffusers sums the N samples of a text condition into one row, so its
        result is (1, E) whatever ``num_images_per_prompt``; here row j mixes each condition's
        j-th sample, giving (N, E) (identical for N = 1). ``step_noise``: one array per prior run
        (each text condition in order, then the negative), as in ``__call__``.
        """
        if len(images_and_prompts) != len(weights) or not weights:
            raise PipelineInputError(
                f"weights: expected one weight per condition ({len(images_and_prompts)}), found {len(weights)}")
        n = args.check_positive_int(num_images_per_prompt, "num_images_per_prompt")
        rng = args.rng(generator)
        noises = iter(step_noise) if step_noise is not None else None
        run = dict(num_images_per_prompt=n, num_inference_steps=num_inference_steps, generator=rng, latents=latents,
                   negative_prompt=negative_prior_prompt, guidance_scale=guidance_scale)
        mixed = 0.0
        for cond, weight in zip(images_and_prompts, weights):
            if isinstance(cond, str):
                emb = self(cond, step_noise=next(noises) if noises else None, **run).image_embeds
            elif hasattr(cond, "convert"):  # a PIL image
                emb = np.repeat(self.encode_image(cond), n, axis=0)
            else:
                raise PipelineInputError(
                    f"images_and_prompts: expected str or PIL.Image items, found {type(cond).__name__}")
            mixed = mixed + emb * np.float32(weight)
        out = self(negative_prompt, step_noise=next(noises) if noises else None, **run)
        negative = out.negative_image_embeds if negative_prompt == "" else out.image_embeds
        return KandinskyPriorPipelineOutput(np.asarray(mixed, np.float32), negative)
