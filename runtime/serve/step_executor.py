"""The step scheduler's executor on loaded artifacts: the stages of a combined pipeline call, split.

:class:`ComponentsExecutor` implements :class:`kandinsky_trt.runtime.scheduling.executor.Executor`
over one :class:`~kandinsky_trt.runtime.pipelines.components.Components`: a request's ``payload`` is
the typed :class:`~kandinsky_trt.runtime.pipelines.requests.CombinedRequest` of a text2img or
img2img call (``requests.combined_request``, as the combined pipelines' ``__call__`` and the server
build it: checked, nothing drawn yet). The stages reuse the pipelines' own code, so an image equals
the pipeline's for the same request run alone, bit for bit:

* ``encode``: each request's draws are made in the pipeline's order (prior
  latents, prior step noise, decoder start: text2img latents or img2img's MoVQ-encoded, noised
  image); then both text encoders run once over every request's prompt (chunks of the profile
  batches, padded as the pipelines pad);
* ``prior`` / ``decoder``: one :class:`~kandinsky_trt.runtime.loops.slots.SlotLoop` per loop and
  size, at the size's largest profile batch (its slots); a row (its conditioning rows, as the
  pipelines' chunk inputs hold them) is admitted into a free slot; admission runs no network;
* ``decode``: the MoVQ decoder once over every finished request's latents, then post-processing.

Rows are independent at a fixed profile batch, so merged calls change no row's bits; an image
equals the pipeline's alone where both run at the same profile batch (tests/test_step_executor.py).
Not yet: inpaint, negative prompts (two prior rows), several images per prompt, merging the img2img
MoVQ encoder calls, the device-resident stage chain (the stages hop through the host, as on ONNX
Runtime). Not wired into the Triton model (``model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.loop_specs import PRIOR_LOOP, UNET_LOOP
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.slots import LoopRow, SlotLoop
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.combined import KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.prior import image_embeds_of
from kandinsky_trt.runtime.pipelines.requests import CombinedRequest
from kandinsky_trt.runtime.processing.images import postprocess
from kandinsky_trt.runtime.scheduling.work import ENCODE, PRIOR, Request

PIPELINES = {"text2img": KandinskyCombinedPipeline, "img2img": KandinskyImg2ImgCombinedPipeline}


@dataclass
class _Kept:
    """What a request carries between stages."""

    request: CombinedRequest
    prior_draws: tuple  # (latents (1, E), step noise (steps, 1, E), table, guidance)
    start: tuple | None = None  # the decoder's (start latents, inpaint conditioning, request with step noise)
    prior_row: LoopRow | None = None
    decoder_text: dict[str, np.ndarray] | None = None  # this row's text conditioning, [uncond, cond]
    latents: np.ndarray | None = None  # the last loop's final latents (the prior's post-processed)
    images: Any = None  # the result, once decoded


class ComponentsExecutor:
    """Runs the scheduler's stages on ``components`` (see the module docstring); ``results[request_id]``
    holds each finished request's images until :meth:`discard`."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self._pipes = {task: cls(components=components) for task, cls in PIPELINES.items()}
        self._prior_pipe = self._pipes["text2img"].prior_pipe  # the stage code is the same in every pipeline
        self._decoder_pipe = self._pipes["text2img"].decoder_pipe
        self._kept: dict[str, _Kept] = {}
        self._loops: dict[Hashable, SlotLoop] = {}
        self._slot_owner: dict[Hashable, dict[int, str]] = {}

    @property
    def results(self) -> dict[str, Any]:
        return {r: k.images for r, k in self._kept.items() if k.images is not None}

    # -- pools ---------------------------------------------------------------------------------

    def pool(self, stage: str, request: Request) -> Hashable:
        size = (request.height, request.width)
        return (stage,) if stage in (ENCODE, PRIOR) else (stage, *size)

    def capacity(self, stage: str, pool: Hashable) -> int:
        size = None if stage == PRIOR else pool[1:] or None
        return max(self.components.manifest.batches(size))

    def _loop(self, stage: str, pool: Hashable) -> SlotLoop:
        if pool not in self._loops:
            size = None if stage == PRIOR else pool[1:]
            batch = self.capacity(stage, pool)
            index = self.components.manifest.profile_index(batch, size)
            self._loops[pool] = make_loop(self.components.backend, PRIOR_LOOP if stage == PRIOR else UNET_LOOP, index,
                                          cuda_graph=self.components.cuda_graph)
            self._slot_owner[pool] = {}
        return self._loops[pool]

    # -- one-shot stages -----------------------------------------------------------------------

    def call(self, stage: str, pool: Hashable, requests: Sequence[Request]) -> None:
        """One batched call: the text encoders (prior's and decoder's) over every request's prompt, or
        the MoVQ decoder over every request's latents, in chunks of the profiles' batches."""
        if stage == ENCODE:
            self._encode(requests)
        else:
            self._decode(requests, pool[1:])

    def _encode(self, requests: Sequence[Request]) -> None:
        kept = [self._check_and_draw(r) for r in requests]
        prompts = [(k.request.prior.cond, k.request.prior.uncond) for k in kept]
        prior_text = self._merged(lambda c, u: self._prior_pipe._encode(c, u, None), prompts, None)
        prompts = [(k.start[2].prompts, k.start[2].negatives) for k in kept]
        cfg = self.components.profile.cfg
        size = kept[0].start[2].size
        decoder_text = self._merged(lambda c, u: self._decoder_pipe._text(c, u, cfg, None), prompts, size)
        for k, prior_cond, text in zip(kept, prior_text, decoder_text):
            latents, noise, table, guidance = k.prior_draws
            k.prior_row = LoopRow(latents[0] * np.float32(table.init_noise_sigma), prior_cond, table, guidance,
                                  noise[:, 0])
            k.decoder_text = text

    @staticmethod
    def refusal(task: str, combined: object) -> str | None:
        """Why these stages cannot run ``combined`` (the server then runs it as one pipeline call), or None."""
        if task not in PIPELINES or not isinstance(combined, CombinedRequest):
            return (f"task: expected one of {sorted(PIPELINES)} with a CombinedRequest payload, "
                    f"found {task!r} with {type(combined).__name__}")
        if len(combined.prior.cond) != 1:
            return f"prior rows: expected 1 (one prompt, no negative prompt), found {len(combined.prior.cond)}"
        return None

    def _check_and_draw(self, request: Request) -> _Kept:
        """The request's draws in the pipeline's order: prior latents, prior step noise, then the
        decoder's start (img2img: its MoVQ-encoded, noised image)."""
        combined = request.payload
        reason = self.refusal(request.task, combined)
        if reason is not None:
            raise PipelineInputError(reason)
        prior = combined.prior
        table = self.components.loaded.scheduler("prior", prior.steps)
        latents, noise = self._prior_pipe._draw(prior)
        self._kept[request.request_id] = kept = _Kept(combined, (latents, noise, table, prior.guidance_scale))
        # the decoder's start latents, inpaint conditioning and step noise: drawn after the prior's, as
        # the pipeline draws them
        kept.start = self._pipes[request.task].decoder_pipe._draw(combined.decoder)
        return kept

    def _merged(self, encode, texts: list[tuple[list[str], list[str]]], size) -> list[dict[str, np.ndarray]]:
        """``encode(cond, uncond)`` over one row per request, in chunks padded as the pipelines pad them;
        each row's conditioning, one entry per group of the network batch ([uncond, cond] with guidance)."""
        rows = []
        for chunk, batch in self.components.chunks(len(texts), size):
            cond = args.take_list([t[0][0] for t in texts], chunk, batch)
            uncond = args.take_list([t[1][0] for t in texts], chunk, batch)
            conditioning = encode(cond, uncond)
            rows += [{n: a[j::batch] for n, a in conditioning.items()} for j in range(chunk.stop - chunk.start)]
        return rows

    def _decode(self, requests: Sequence[Request], size: tuple[int, int]) -> None:
        kept = [self._kept[r.request_id] for r in requests]
        pixels = self._decoder_pipe._decode_latents(np.stack([k.latents for k in kept]), size)
        for i, k in enumerate(kept):
            k.images = postprocess(pixels[i:i + 1], k.start[2].output_type)

    # -- loops ---------------------------------------------------------------------------------

    def admit(self, stage: str, pool: Hashable, request: Request) -> None:
        kept = self._kept[request.request_id]
        row = kept.prior_row if stage == PRIOR else self._decoder_row(kept)
        slot = self._loop(stage, pool).admit(row)
        self._slot_owner[pool][slot] = request.request_id

    def _decoder_row(self, kept: _Kept) -> LoopRow:
        """The decoder row with the prior's embedding: what the pipeline's ``_chunk_inputs`` gives it."""
        latents, _, decoder = kept.start
        image = kept.latents[None]
        negative = self.components.loaded.constant("zero_image_embeds")  # the prior pipeline's negatives
        embeds = np.concatenate([negative, image]) if self.components.profile.cfg else image
        noise = None if decoder.step_noise is None else decoder.step_noise[:, 0]
        return LoopRow(latents[0], {**kept.decoder_text, "image_embeds": embeds}, decoder.table,
                       decoder.guidance_scale, noise)

    def step(self, stage: str, pool: Hashable) -> list[str]:
        done = []
        for retired in self._loop(stage, pool).step():
            request_id = self._slot_owner[pool].pop(retired.slot)
            latents = retired.latents
            if stage == PRIOR:
                latents = image_embeds_of(self.components.loaded, latents[None])[0]
            self._kept[request_id].latents = latents
            done.append(request_id)
        return done

    def release(self, stage: str, pool: Hashable, request_id: str) -> None:
        owners = self._slot_owner[pool]
        slot = next(s for s, r in owners.items() if r == request_id)
        self._loops[pool].release(slot)
        del owners[slot]

    def discard(self, request_id: str) -> None:
        self._kept.pop(request_id, None)

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()
