"""The step scheduler's executor on loaded artifacts: the stages of a combined pipeline call, split.

:class:`ComponentsExecutor` implements :class:`kandinsky_trt.runtime.scheduling.executor.Executor`
over one :class:`~kandinsky_trt.runtime.pipelines.components.Components`: a request's ``payload`` is
a :class:`StepCall` (the keyword arguments of ``KandinskyCombinedPipeline`` or
``KandinskyImg2ImgCombinedPipeline``, with an int ``generator`` seed). The stages reuse the
pipelines' own code, so an image equals the pipeline's for the same call run alone, bit for bit:

* ``encode``: the call is checked into the pipeline's ``CombinedRequest`` (the pipeline's
  ``__call__`` itself, with ``run`` captured), then the draws come in the pipeline's order (prior
  latents, prior step noise, decoder start: text2img latents or img2img's MoVQ-encoded, noised image)
  and the prior text conditioning is encoded;
* ``prior`` / ``decoder``: one :class:`~kandinsky_trt.runtime.loops.slots.SlotLoop` per loop and
  size, at the size's largest profile batch (its slots); a row is built with the pipelines' chunk
  inputs (the decoder's text encoding runs at its admission) and admitted into a free slot;
* ``decode``: the MoVQ decoder and post-processing.

Not yet: merging the one-shot calls of several requests into one network call (each runs at its own
padded batch here, as the pipeline alone does), inpaint, negative prompts (two prior rows), several
images per prompt. Not wired into the Triton model (``model.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Hashable, Sequence

import numpy as np

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.loop_specs import PRIOR_LOOP, UNET_LOOP
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.slots import SlotLoop
from kandinsky_trt.runtime.loops.template import LoopInputs, chunk_rows
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.combined import KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.decoder import _Rows
from kandinsky_trt.runtime.pipelines.requests import CombinedRequest, with_embeddings
from kandinsky_trt.runtime.processing.images import postprocess
from kandinsky_trt.runtime.scheduling.work import DECODE, DECODER, ENCODE, PRIOR, Request

PIPELINES = {"text2img": KandinskyCombinedPipeline, "img2img": KandinskyImg2ImgCombinedPipeline}


@dataclass(frozen=True)
class StepCall:
    """A request's pipeline arguments (``prompt``, ``image``, ``strength``, ...; ``generator``: an int seed)."""

    kwargs: dict[str, Any] = field(default_factory=dict)


def _capturing(cls):
    """``cls`` whose ``run`` returns the checked ``CombinedRequest`` instead of running it."""
    return type(f"Capturing{cls.__name__}", (cls,), {"run": lambda self, request: request})


@dataclass
class _Kept:
    """What a request carries between stages."""

    request: CombinedRequest
    prior_row: Any = None
    decoder_start: tuple | None = None  # (latents, None) from the pipeline's _start
    latents: np.ndarray | None = None  # the last loop's final latents
    images: Any = None  # the result, once decoded


class ComponentsExecutor:
    """Runs the scheduler's stages on ``components`` (see the module docstring); ``results[request_id]``
    holds each finished request's images until :meth:`discard`."""

    def __init__(self, components: Components) -> None:
        self.components = components
        self._capture = {task: _capturing(cls)(components=components) for task, cls in PIPELINES.items()}
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
        for request in requests:
            (self._encode if stage == ENCODE else self._decode)(request)

    def _encode(self, request: Request) -> None:
        call = request.payload
        if request.task not in PIPELINES or not isinstance(call, StepCall):
            raise PipelineInputError(f"task: expected one of {sorted(PIPELINES)} with a StepCall payload, found "
                                     f"{request.task!r} with {type(call).__name__}")
        combined = self._capture[request.task](**call.kwargs)
        prior = combined.prior
        if len(prior.cond) != 1:
            raise PipelineInputError(f"prior rows: expected 1 (one prompt, no negative prompt), found {len(prior.cond)}")
        loaded, pipe = self.components.loaded, self._capture[request.task]
        table = loaded.scheduler("prior", prior.steps)
        latents = args.draw_or_check(prior.latents, (1, loaded.embedding_width), "latents", prior.rng)
        noise_shape = (int(table.stochastic.sum()), 1, loaded.embedding_width)
        noise = args.draw_or_check(prior.step_noise, noise_shape, "step_noise", prior.rng)
        self._kept[request.request_id] = kept = _Kept(combined)
        kept.prior_row = self._prior_row(pipe, prior, table, latents, noise)
        kept.decoder_start = self._decoder_start(pipe, combined.decoder)

    def _prior_row(self, pipe, prior, table, latents, noise):
        """The prior's chunk inputs for this one row, as ``KandinskyPriorPipeline._sample`` builds them."""
        (chunk, batch), = self.components.chunks(1)
        inputs = LoopInputs(args.take(latents, chunk, batch) * np.float32(table.init_noise_sigma),
                            pipe.prior_pipe._encode(args.take_list(prior.cond, chunk, batch),
                                                    args.take_list(prior.uncond, chunk, batch)),
                            {}, args.take(noise.swapaxes(0, 1), chunk, batch).swapaxes(0, 1), prior.guidance_scale)
        return chunk_rows(inputs, table)[0]

    def _decoder_start(self, pipe, decoder) -> tuple:
        """The decoder's start latents (drawn now: after the prior's draws, as the pipeline draws them)."""
        latents, conditioning = pipe.decoder_pipe._start(decoder)
        if decoder.step_noise is None and decoder.table.stochastic.any():
            shape = (int(decoder.table.stochastic.sum()), *decoder.latent_shape)
            decoder = replace(decoder, step_noise=decoder.rng.standard_normal(shape, dtype=np.float32))
        return latents, conditioning, decoder

    def _decode(self, request: Request) -> None:
        kept = self._kept[request.request_id]
        decoder = kept.decoder_start[2]
        pixels = self._capture[request.task].decoder_pipe._decode_latents(kept.latents[None], decoder.size)
        kept.images = postprocess(pixels, decoder.output_type)

    # -- loops ---------------------------------------------------------------------------------

    def admit(self, stage: str, pool: Hashable, request: Request) -> None:
        kept = self._kept[request.request_id]
        row = kept.prior_row if stage == PRIOR else self._decoder_row(request, kept)
        slot = self._loop(stage, pool).admit(row)
        self._slot_owner[pool][slot] = request.request_id

    def _decoder_row(self, request: Request, kept: _Kept):
        """The decoder's chunk inputs for this row, with the prior's embeddings (``_chunk_inputs``)."""
        latents, conditioning, decoder = kept.decoder_start
        loaded, pipe = self.components.loaded, self._capture[request.task].decoder_pipe
        negative = np.repeat(loaded.constant("zero_image_embeds"), 1, axis=0)  # the prior pipeline's negatives
        decoder = with_embeddings(loaded, decoder, kept.latents[None], negative)
        (chunk, batch), = self.components.chunks(1, decoder.size)
        inputs = pipe._chunk_inputs(decoder, _Rows(latents, conditioning, chunk, batch))
        return chunk_rows(inputs, decoder.table)[0]

    def step(self, stage: str, pool: Hashable) -> list[str]:
        done = []
        for retired in self._loop(stage, pool).step():
            request_id = self._slot_owner[pool].pop(retired.slot)
            latents = retired.latents
            if stage == PRIOR:  # the prior's post-processing (``_sample``)
                loaded = self.components.loaded
                latents = (latents[None] * loaded.constant("clip_std") + loaded.constant("clip_mean"))[0]
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
