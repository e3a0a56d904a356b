"""``KandinskyPriorPipeline``: text (and images) -> CLIP image embeddings, without torch.

Mirrors diffusers' pipeline (kandinsky_map §1.1-1.2): CLIP text encoding, the UnCLIP loop over the
prior with classifier-free guidance, post-processing with CLIP mean/std, and the zero-image
embedding as the negative. Random draws: ``latents`` (rows, E) then one ``step_noise`` row block per
stochastic step, in diffusers' order; both can be passed explicitly.

``__call__`` checks its arguments into a :class:`PriorRequest` (``request``: no network runs, nothing
is drawn) and runs it (``run``); ``interpolate`` and the combined pipelines build requests the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.errors import PipelineInputError, require_finite
from kandinsky_trt.runtime.processing.images import clip_image_preprocess
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.contract.loop_specs import PRIOR_LOOP


@dataclass
class KandinskyPriorPipelineOutput:
    image_embeds: np.ndarray
    negative_image_embeds: np.ndarray

    def to_tuple(self) -> tuple[np.ndarray, np.ndarray]:
        return self.image_embeds, self.negative_image_embeds


@dataclass(frozen=True)
class PriorRequest:
    """One prior run, checked and row-aligned; ``latents`` / ``step_noise`` None: drawn from ``rng``."""

    cond: list[str]  # rows: the prompts (then the negatives) x images per prompt
    uncond: list[str]
    sample_negatives: bool  # the second half of the rows samples the negative prompts
    steps: int
    guidance_scale: float
    rng: np.random.Generator
    latents: np.ndarray | None  # (rows, E)
    step_noise: np.ndarray | None  # (stochastic steps, rows, E)


def _loop_texts(prompts: args.Prompts) -> tuple[list[str], list[str]]:
    """diffusers' row layout: with a negative prompt the prior also samples the negatives.
    (Without guidance the loop gives both halves the cond rows: ``Components.denoise``.)"""
    negatives = prompts.negatives
    texts = prompts.texts + negatives if negatives is not None else prompts.texts
    uncond = 2 * negatives if negatives is not None else [""] * len(texts)
    return args.repeat_rows(texts, prompts.per_prompt), args.repeat_rows(uncond, prompts.per_prompt)


def _output(out: KandinskyPriorPipelineOutput, output_type: str, return_dict: bool):
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

    def __call__(self, prompt, negative_prompt=None, num_images_per_prompt: int = 1, num_inference_steps: int = 25,
                 generator: args.Generator = None, latents=None, guidance_scale: float = 4.0,
                 output_type: str = "np", return_dict: bool = True, step_noise=None):
        """Same arguments and defaults as diffusers (``output_type`` "np" | "pt"), plus ``step_noise``:
        the prior's per-step variance noise, shape (stochastic steps, rows, E)."""
        args.check_output_type(output_type, ("np", "pt"))
        prompts = args.check_prompts(prompt, negative_prompt, num_images_per_prompt)
        request = self.request(prompts, num_inference_steps, generator, latents, guidance_scale, step_noise)
        return _output(self.run(request), output_type, return_dict)

    def request(self, prompts: args.Prompts, num_inference_steps, generator, latents, guidance_scale,
                step_noise) -> PriorRequest:
        """Check the remaining arguments of one prior run; runs no network and draws nothing."""
        steps = args.check_positive_int(num_inference_steps, "num_inference_steps")
        guidance_scale = args.check_guidance(guidance_scale, "guidance_scale", self.components.profile)
        rng = args.rng(generator)
        cond, uncond = _loop_texts(prompts)
        shape = (len(cond), self.components.manifest.model_dims.clip_dim)
        return PriorRequest(cond, uncond, prompts.negatives is not None, steps, guidance_scale, rng,
                            args.check_array(latents, shape, "latents"),
                            args.check_array(step_noise, (self._stochastic(steps), *shape), "step_noise"))

    def run(self, request: PriorRequest) -> KandinskyPriorPipelineOutput:
        """Draw what was not given (latents, then step noise: diffusers' order), sample, split the rows."""
        shape = (len(request.cond), self.components.manifest.model_dims.clip_dim)
        latents = args.draw_or_check(request.latents, shape, "latents", request.rng)
        noise_shape = (self._stochastic(request.steps), *shape)
        step_noise = args.draw_or_check(request.step_noise, noise_shape, "step_noise", request.rng)
        embeds = self._sample(request, latents, step_noise)
        if request.sample_negatives:
            return KandinskyPriorPipelineOutput(*np.split(embeds, 2))
        zero = self.components.constant("zero_image_embeds")
        return KandinskyPriorPipelineOutput(embeds, np.repeat(zero, len(embeds), axis=0))

    def _stochastic(self, steps: int) -> int:
        return int(self.components.scheduler("prior", steps).stochastic.sum())

    def _sample(self, request: PriorRequest, latents: np.ndarray, step_noise: np.ndarray) -> np.ndarray:
        """Run the prior loop on the request's rows; returns post-processed embeddings (rows, E)."""
        c = self.components
        table = c.scheduler("prior", request.steps)
        results = []
        for chunk, batch in c.chunks(len(request.cond)):
            chunk_noise = args.take(step_noise.swapaxes(0, 1), chunk, batch).swapaxes(0, 1)
            loop = LoopInputs(
                latents=args.take(latents, chunk, batch) * np.float32(table.init_noise_sigma),
                conditioning=self._encode(args.take_list(request.cond, chunk, batch),
                                          args.take_list(request.uncond, chunk, batch)),
                step_extras={}, noise=chunk_noise, guidance_scale=request.guidance_scale,
            )
            results.append(c.denoise(PRIOR_LOOP, table, loop)[: chunk.stop - chunk.start])
        embeds = np.concatenate(results)
        return embeds * c.constant("clip_std") + c.constant("clip_mean")

    def _encode(self, cond: list[str], uncond: list[str]) -> dict[str, np.ndarray]:
        """Prior network conditioning for one chunk: [uncond, cond] rows with guidance."""
        profile = self.components.profile
        texts = uncond + cond if profile.cfg else cond
        ids, mask = self.components.prior_tokenizer.encode(texts)
        encoded = self.components.run("prior_text_encoder", {"input_ids": ids})
        return {"proj_embedding": encoded["text_embeds"], "encoder_hidden_states": encoded["last_hidden_state"],
                "attention_mask": mask.astype(bool)}

    def _clip_pixels(self, image) -> np.ndarray:
        config = self.components.manifest.image_processor
        return clip_image_preprocess(image, size=config["size"], mean=config["mean"], std=config["std"])

    def encode_image(self, image) -> np.ndarray:
        """CLIP image embedding (1, E) of a PIL image, preprocessed like diffusers' CLIPImageProcessor."""
        return self.components.run("image_encoder", {"pixel_values": self._clip_pixels(image)})["image_embeds"]

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
        conditions, weights, n, runs = self._interpolate_requests(dict(locals()))
        runs, mixed = iter(runs), 0.0
        for cond, weight in zip(conditions, weights):
            if isinstance(cond, str):
                emb = self.run(next(runs)).image_embeds
            else:  # CLIP pixels of an image condition
                emb = np.repeat(self.components.run("image_encoder", {"pixel_values": cond})["image_embeds"], n, 0)
            with np.errstate(over="ignore"):  # an overflow is reported below, naming the weights
                mixed = mixed + emb * np.float32(weight)
        out = self.run(next(runs))
        negative = out.negative_image_embeds if negative_prompt == "" else out.image_embeds
        mixed = require_finite(np.asarray(mixed, np.float32), "interpolate (weighted sum of the conditions)",
                               cause="weights too large for float32?")
        return KandinskyPriorPipelineOutput(mixed, negative)

    def _interpolate_requests(self, call: dict) -> tuple[list, list[float], int, list[PriorRequest]]:
        """Check ``interpolate``'s arguments before any network runs: the conditions (images become CLIP
        pixels), the weights, the images per condition, and one prior request per text condition, then
        one for the negative."""
        conditions = call["images_and_prompts"]
        texts = args.check_conditions(conditions)
        weights = args.check_weights(call["weights"], len(conditions))
        n = args.check_images_per_prompt(call["num_images_per_prompt"], 1)
        with args.renamed({"negative_prompt": "negative_prior_prompt"}):
            negatives = args.negative_prompts(call["negative_prior_prompt"], 1)
        # Each prior run samples its prompt's rows and, with a negative_prior_prompt, the negative's
        # too: (2n, E) latents, as diffusers' __call__ (prompt + negative_prompt) takes them.
        rows = n * (1 if negatives is None else 2)
        args.check_array(call["latents"], (rows, self.components.manifest.model_dims.clip_dim), "latents")
        if not isinstance(call["negative_prompt"], str):
            raise PipelineInputError(f"negative_prompt: expected a str, found {type(call['negative_prompt']).__name__}")
        args.as_prompt_list(call["negative_prompt"], "negative_prompt")  # valid Unicode
        noise = call["step_noise"]
        if noise is not None and (not isinstance(noise, (list, tuple)) or len(noise) != texts + 1):
            raise PipelineInputError(f"step_noise: expected a list of {texts + 1} arrays (one per text condition, "
                                     f"then the negative), found {args.describe(noise)}")
        rng = args.rng(call["generator"])  # one generator for every run
        prompts = [c for c in conditions if isinstance(c, str)] + [call["negative_prompt"]]
        runs = [self.request(args.Prompts([text], negatives, n), call["num_inference_steps"], rng, call["latents"],
                             call["guidance_scale"], None if noise is None else noise[i])
                for i, text in enumerate(prompts)]
        return [c if isinstance(c, str) else self._clip_pixels(c) for c in conditions], weights, n, runs
