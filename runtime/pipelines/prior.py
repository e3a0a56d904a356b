"""``KandinskyPriorPipeline``: text (and images) -> CLIP image embeddings, without torch.

Mirrors diffusers' pipeline (kandinsky_map §1.1-1.2): CLIP text encoding, the UnCLIP loop over the
prior with classifier-free guidance, post-processing with CLIP mean/std, and the zero-image
embedding as the negative. Random draws: ``latents`` (rows, E) then one ``step_noise`` row block per
stochastic step, in diffusers' order; both can be passed explicitly.

On TensorRT the text encoder's outputs stay on the device (``Components.resident_chain``), and so
do the loop's final latents and their post-processing (CLIP mean/std, the ``prior_embeds`` bridge
graph, in artifacts that have it): one download (sync) per chunk, its embeddings; a combined pipeline
downloads none (``sample_on_device``: the decoder reads them on the device).

``__call__`` checks its arguments into a :class:`~.requests.PriorRequest` (``requests.prior_request``:
no network runs, nothing is drawn) and runs it (``run``); ``interpolate``, the combined pipelines, the
CLI and the server build their requests the same way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from kandinsky_trt.runtime.backends.base import DeviceRows
from kandinsky_trt.runtime.contract.errors import require_finite
from kandinsky_trt.runtime.contract.loop_specs import PRIOR_LOOP
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
from kandinsky_trt.runtime.loops.template import LoopInputs
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.loaded import LoadedArtifacts
from kandinsky_trt.runtime.pipelines.resident import ResidentChain
from kandinsky_trt.runtime.pipelines.requests import (InterpolateRequest, InterpolateSettings, PriorRequest,
                                                      PriorSettings, clip_pixels, interpolate_request,
                                                      prior_request, prior_stochastic_steps)

__all__ = ["KandinskyPriorPipeline", "KandinskyPriorPipelineOutput", "PriorRequest"]


@dataclass
class KandinskyPriorPipelineOutput:
    image_embeds: np.ndarray
    negative_image_embeds: np.ndarray

    def to_tuple(self) -> tuple[np.ndarray, np.ndarray]:
        return self.image_embeds, self.negative_image_embeds


def _output(out: KandinskyPriorPipelineOutput, output_type: str, return_dict: bool):
    if output_type == "pt":  # drop-in convenience for torch users; the runtime itself never needs torch
        import torch

        out = KandinskyPriorPipelineOutput(torch.from_numpy(out.image_embeds), torch.from_numpy(out.negative_image_embeds))
    return out if return_dict else out.to_tuple()


def image_embeds_of(loaded: LoadedArtifacts, latents: np.ndarray) -> np.ndarray:
    """The prior loop's final latents ``(rows, E)`` as CLIP image embeddings: times the CLIP std,
    plus the mean (diffusers' ``post_process_latents``)."""
    return latents * loaded.constant("clip_std") + loaded.constant("clip_mean")


def prior_output(loaded: LoadedArtifacts, request: PriorRequest, embeds: np.ndarray) -> KandinskyPriorPipelineOutput:
    """The request's sampled embeddings ``(rows, E)`` split into the pipeline's output: with negative
    prompts the second half of the rows sampled the negatives; else the negative is the zero-image embedding."""
    if request.sample_negatives:
        return KandinskyPriorPipelineOutput(*np.split(embeds, 2))
    zero = loaded.constant("zero_image_embeds")
    return KandinskyPriorPipelineOutput(embeds, np.repeat(zero, len(embeds), axis=0))


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
        settings = PriorSettings(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                 latents=latents, step_noise=step_noise)
        request = prior_request(self.components.loaded, prompts, settings, args.rng(generator))
        return _output(self.run(request), output_type, return_dict)

    def run(self, request: PriorRequest) -> KandinskyPriorPipelineOutput:
        """Draw what was not given (latents, then step noise: diffusers' order), sample, split the rows."""
        return prior_output(self.components.loaded, request, self._sample(request, *self._draw(request)))

    def _draw(self, request: PriorRequest) -> tuple[np.ndarray, np.ndarray]:
        """The request's latents ``(rows, E)`` and step noise ``(stochastic steps, rows, E)``, each
        checked if given, else drawn (latents first: diffusers' order)."""
        loaded = self.components.loaded
        shape = (len(request.cond), loaded.embedding_width)
        latents = args.draw_or_check(request.latents, shape, "latents", request.rng)
        noise_shape = (prior_stochastic_steps(loaded, request.steps), *shape)
        return latents, args.draw_or_check(request.step_noise, noise_shape, "step_noise", request.rng)

    def _sample(self, request: PriorRequest, latents: np.ndarray, step_noise: np.ndarray) -> np.ndarray:
        """Run the prior loop on the request's rows; returns post-processed embeddings (rows, E).

        On a resident chain whose artifacts have the ``prior_embeds`` bridge graph the post-processing
        runs on the device too, and each chunk's embeddings are its one download."""
        c = self.components
        with c.resident_chain() as chain:  # TensorRT: the text encoder's outputs stay on the device
            if chain is not None and c.loaded.has("prior_embeds"):
                return np.concatenate([chain.download(rows, "prior_embeds.image_embeds")
                                       for rows in self._kept_on_device(request, latents, step_noise, chain)])
            table = c.loaded.scheduler("prior", request.steps)
            results = [c.denoise(PRIOR_LOOP, table, inputs)[:n]
                       for n, inputs in self._chunks(request, latents, step_noise, table, chain)]
        return image_embeds_of(c.loaded, np.concatenate(results))

    def sample_on_device(self, request: PriorRequest, chain: ResidentChain) -> list[DeviceRows]:
        """Draw (as :meth:`run` does), then sample the request's embeddings (rows, E) and leave them on
        the device: one kept buffer per chunk, its real rows, in row order (:meth:`_kept_on_device`).
        Needs artifacts with the ``prior_embeds`` bridge graph. Nothing is downloaded, and nothing is
        checked for NaN/Inf here: a non-finite value reaches what the caller downloads."""
        return self._kept_on_device(request, *self._draw(request), chain)

    def _kept_on_device(self, request: PriorRequest, latents: np.ndarray, step_noise: np.ndarray,
                        chain: ResidentChain) -> list[DeviceRows]:
        """Each chunk: the loop retires into scratch, the ``prior_embeds`` bridge graph post-processes,
        and :meth:`ResidentChain.keep` holds the chunk's rows (until this chain's next prior run)."""
        table = self.components.loaded.scheduler("prior", request.steps)
        kept = []
        for index, (n, inputs) in enumerate(self._chunks(request, latents, step_noise, table, chain)):
            embeds = chain.image_embeds(chain.denoise(PRIOR_LOOP, table, inputs))
            kept.append(chain.keep(embeds, ("prior_embeds", index))[:n])
        return kept

    def _chunks(self, request: PriorRequest, latents: np.ndarray, step_noise: np.ndarray, table: SchedulerTable,
                chain: ResidentChain | None) -> Iterator[tuple[int, LoopInputs]]:
        """Each chunk's real row count and loop inputs (rows padded to the profile batch)."""
        c = self.components
        for chunk, batch in c.chunks(len(request.cond)):
            yield chunk.stop - chunk.start, LoopInputs(
                latents=args.take(latents, chunk, batch) * np.float32(table.init_noise_sigma),
                conditioning=self._encode(args.take_list(request.cond, chunk, batch),
                                          args.take_list(request.uncond, chunk, batch), chain),
                step_extras={}, noise=args.take(step_noise.swapaxes(0, 1), chunk, batch).swapaxes(0, 1),
                guidance_scale=request.guidance_scale,
            )

    def _encode(self, cond: list[str], uncond: list[str], chain: ResidentChain | None) -> dict:
        """Prior network conditioning for one chunk: [uncond, cond] rows with guidance (the encoder's
        outputs as host arrays, or as device rows on a resident chain; the mask is the tokenizer's)."""
        profile = self.components.profile
        texts = uncond + cond if profile.cfg else cond
        ids, mask = self.components.loaded.prior_tokenizer.encode(texts)
        run = self.components.run if chain is None else chain.run
        encoded = run("prior_text_encoder", {"input_ids": ids})
        return {"proj_embedding": encoded["text_embeds"], "encoder_hidden_states": encoded["last_hidden_state"],
                "attention_mask": mask.astype(bool)}

    def encode_image(self, image) -> np.ndarray:
        """CLIP image embedding (1, E) of a PIL image, preprocessed like diffusers' CLIPImageProcessor."""
        pixels = clip_pixels(self.components.loaded, image)
        return self.components.run("image_encoder", {"pixel_values": pixels})["image_embeds"]

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
        settings = InterpolateSettings(
            num_images_per_prompt=num_images_per_prompt, num_inference_steps=num_inference_steps, latents=latents,
            negative_prior_prompt=negative_prior_prompt, negative_prompt=negative_prompt,
            guidance_scale=guidance_scale, step_noise=step_noise)
        rng = args.rng(generator)  # one generator for every run
        request = interpolate_request(self.components.loaded, images_and_prompts, weights, settings, rng)
        return self.run_interpolate(request)

    def run_interpolate(self, request: InterpolateRequest) -> KandinskyPriorPipelineOutput:
        """Run each text condition's prior, encode each image, mix by weight; then the negative's prior."""
        runs, mixed, n = iter(request.runs), 0.0, request.per_prompt
        for cond, weight in zip(request.conditions, request.weights):
            if isinstance(cond, str):
                emb = self.run(next(runs)).image_embeds
            else:  # CLIP pixels of an image condition
                emb = np.repeat(self.components.run("image_encoder", {"pixel_values": cond})["image_embeds"], n, 0)
            with np.errstate(over="ignore"):  # an overflow is reported below, naming the weights
                mixed = mixed + emb * np.float32(weight)
        out = self.run(next(runs))
        negative = out.image_embeds if request.negative_is_prompt else out.negative_image_embeds
        mixed = require_finite(np.asarray(mixed, np.float32), "interpolate (weighted sum of the conditions)",
                               cause="weights too large for float32?")
        return KandinskyPriorPipelineOutput(mixed, negative)
