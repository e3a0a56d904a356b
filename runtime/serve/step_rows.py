"""A combined request's rows in the step executor's stages (``step_executor``): how many each stage
holds, what its loops admit, and what it keeps between stages.

Rows as the combined pipeline lays them out (``requests.combined_request``): the decoder runs one row
per image (prompts x ``num_images_per_prompt``: ``len(decoder.prompts)``); the prior one per image
and, with a negative prompt, one more per image sampling the negative (the prompt rows, then the
negative rows: ``len(prior.cond)``). :func:`scheduled_request` gives the scheduler both counts
(``Request.rows``, ``Request.prior_rows``). The rows are built with the pipelines' own code
(``prior_output``, ``with_embeddings``, the decoder's ``_loop_inputs``), one row at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kandinsky_trt.runtime.contract.schedulers import SchedulerTable
from kandinsky_trt.runtime.loops.slots import LoopRow
from kandinsky_trt.runtime.loops.template import chunk_rows
from kandinsky_trt.runtime.pipelines.decoder import ChunkRows
from kandinsky_trt.runtime.pipelines.loaded import LoadedArtifacts
from kandinsky_trt.runtime.pipelines.prior import image_embeds_of, prior_output
from kandinsky_trt.runtime.pipelines.requests import (CombinedRequest, DecoderRequest, Img2ImgStart, InpaintStart,
                                                      with_embeddings)
from kandinsky_trt.runtime.scheduling.work import PRIOR, Request

STARTS = {"text2img": type(None), "img2img": Img2ImgStart, "inpaint": InpaintStart}  # task -> its decoder start
TASKS = tuple(STARTS)


def scheduled_request(request_id: str, task: str, combined: CombinedRequest, timeout_s: float | None = None) -> Request:
    """The scheduler's :class:`Request` for ``combined`` (what ``task``'s combined pipeline builds):
    its size, step counts, guidance, strength and rows per stage, all read from ``combined``."""
    prior, decoder = combined.prior, combined.decoder
    strength = decoder.image.strength if isinstance(decoder.image, Img2ImgStart) else None
    return Request(request_id, task=task, height=decoder.height, width=decoder.width, prior_steps=prior.steps,
                   decoder_steps=decoder.steps, guidance_scale=decoder.guidance_scale,
                   prior_guidance_scale=prior.guidance_scale, strength=strength, rows=len(decoder.prompts),
                   prior_rows=len(prior.cond), timeout_s=timeout_s, payload=combined)


def unservable(task: str, combined: object) -> str | None:
    """Why the stages cannot run ``combined`` whatever the slots (see ``ComponentsExecutor.refusal``), or None."""
    if task not in TASKS or not isinstance(combined, CombinedRequest):
        return (f"task: expected one of {list(TASKS)} with a CombinedRequest payload, "
                f"found {task!r} with {type(combined).__name__}")
    start = combined.decoder.image
    if not isinstance(start, STARTS[task]):
        return f"payload: expected {task}'s decoder start, found {type(start).__name__}"
    if combined.decoder.callback is not None:
        return "callback: expected none (a step callback needs the pipeline's own loop), found one"
    return None


def mismatch(request: Request) -> str | None:
    """Why ``request`` cannot run: :func:`unservable`, or rows other than its payload's, or None."""
    reason = unservable(request.task, request.payload)
    if reason is not None:
        return reason
    combined = request.payload
    expected = (len(combined.decoder.prompts), len(combined.prior.cond))
    found = (request.rows, request.rows_at(PRIOR))
    if found != expected:
        return (f"rows: expected {expected[0]} (prior_rows {expected[1]}) as the payload's rows (scheduled_request), "
                f"found {found[0]} (prior_rows {found[1]})")
    return None


@dataclass
class Kept:
    """What a request carries between stages (``ComponentsExecutor``)."""

    request: CombinedRequest
    prior_latents: np.ndarray  # (prior rows, E): drawn
    prior_noise: np.ndarray  # (stochastic prior steps, prior rows, E): drawn
    start_latents: np.ndarray  # (rows, 4, h, w): the decoder's start (img2img: the noised image latents)
    conditioning: np.ndarray | None  # (rows, 5, h, w): inpainting's masked image latents and mask
    decoder: DecoderRequest  # with its step noise; with the prior's embeddings once the prior is done
    prior_text: list[dict] = field(default_factory=list)  # per prior row: its prior network conditioning
    decoder_text: list[dict] = field(default_factory=list)  # per decoder row: its text conditioning
    retired: dict[int, np.ndarray] = field(default_factory=dict)  # row -> final latents, in the running loop
    latents: np.ndarray | None = None  # (rows, 4, h, w): the decoder loop's final latents
    images: Any = None  # the result, once decoded

    def prior_rows(self, table: SchedulerTable) -> list[LoopRow]:
        """The prior's rows: what the prior pipeline's chunk inputs give each row."""
        prior, sigma = self.request.prior, np.float32(table.init_noise_sigma)
        return [LoopRow(self.prior_latents[i] * sigma, text, table, prior.guidance_scale, self.prior_noise[:, i])
                for i, text in enumerate(self.prior_text)]

    def attach_embeddings(self, loaded: LoadedArtifacts, latents: np.ndarray) -> None:
        """The prior loop's final latents (prior rows, E) as the decoder's embeddings, as the combined
        pipeline attaches its prior's output (the negative prompt's rows: the negative embeddings)."""
        out = prior_output(loaded, self.request.prior, image_embeds_of(loaded, latents))
        self.decoder = with_embeddings(loaded, self.decoder, out.image_embeds, out.negative_image_embeds)

    def decoder_rows(self, pipe) -> list[LoopRow]:
        """The decoder's rows: each what the decoder pipeline's ``_loop_inputs`` gives a one-row chunk."""
        rows = []
        for i, text in enumerate(self.decoder_text):
            chunk = ChunkRows(self.start_latents, self.conditioning, slice(i, i + 1), 1)
            rows += chunk_rows(pipe._loop_inputs(self.decoder, chunk, text), self.decoder.table)
        return rows

    def take_retired(self, row: int, latents: np.ndarray, rows: int) -> np.ndarray | None:
        """Keep one retired row's final latents; once all ``rows`` are in, return them in row order."""
        self.retired[row] = latents
        if len(self.retired) < rows:
            return None
        done, self.retired = self.retired, {}
        return np.stack([done[i] for i in range(rows)])
