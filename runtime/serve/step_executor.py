"""The step scheduler's executor on loaded artifacts: the stages of a combined pipeline call, split.

:class:`ComponentsExecutor` implements :class:`kandinsky_trt.runtime.scheduling.executor.Executor`
over one :class:`~kandinsky_trt.runtime.pipelines.components.Components`: a request's ``payload`` is
the typed :class:`~kandinsky_trt.runtime.pipelines.requests.CombinedRequest` of a text2img, img2img
or inpaint call (``requests.combined_request``, as the combined pipelines' ``__call__`` and the
server build it: checked, nothing drawn yet), with any prompts, negative prompts and images per
prompt; ``step_rows.scheduled_request`` makes the scheduler's request of it (its rows per stage).
The stages reuse the pipelines' own code, so an image equals the pipeline's for the same request
run alone, bit for bit:

* ``encode`` (pool ``("encode",)``): the MoVQ encoder once over every img2img/inpaint request's
  images, then each request's draws in the pipeline's order (prior latents, prior step noise,
  decoder start: text2img/inpaint latents or img2img's noised image latents, decoder step noise);
  then both text encoders once over every request's rows (chunks of the profile batches, padded as
  the pipelines pad);
* ``prior`` (pool ``("prior",)``) / ``decoder`` (pools ``("decoder", h, w)`` for text2img and
  img2img, ``("decoder", "inpaint", h, w)`` for the inpaint UNet): slots as many as the size's
  largest profile batch, each step run at the smallest exported batch that holds the occupied
  ones (:class:`~kandinsky_trt.runtime.loops.sized.SizedSlots`: rows move between the loops of
  the exported batches with their state); a request's rows (``step_rows``) are admitted together;
  admission runs no network. The prior's rows are the images' and, with a negative prompt, the
  negatives' (``Request.prior_rows``); the decoder's one per image;
* ``decode`` (pool ``("decode", h, w)``): the MoVQ decoder once over every finished request's rows,
  then post-processing (inpainting has no other: the pipeline blends nothing after decoding).

Rows are independent, so merged calls change no row's maths; an image equals the pipeline's alone
bit for bit where the backend gives a row the same bits at every batch size (ONNX Runtime CPU on
the tiny export, tests/test_step_executor.py; on TensorRT within the fp16 tolerances).
Not served (:meth:`ComponentsExecutor.refusal`): other tasks, a step callback, more rows than a
pool holds (the scheduler refuses those with ``RequestTooLarge``). Not yet: the device-resident
stage chain (the stages hop through the host, as on ONNX Runtime). Served by ``stepped.py``.
"""

from __future__ import annotations

from typing import Any, Hashable, Sequence

import numpy as np

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, PRIOR_LOOP, UNET_LOOP, LoopSpec
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.sized import SizedSlots
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.pipelines.decoder import KandinskyPipeline
from kandinsky_trt.runtime.pipelines.prior import KandinskyPriorPipeline
from kandinsky_trt.runtime.pipelines.requests import Img2ImgStart, InpaintStart
from kandinsky_trt.runtime.processing.images import postprocess
from kandinsky_trt.runtime.scheduling.work import DECODER, ENCODE, PRIOR, STAGES, Request
from kandinsky_trt.runtime.serve.step_rows import Kept, mismatch, scheduled_request, unservable

__all__ = ["ComponentsExecutor", "scheduled_request"]
INPAINT = "inpaint"  # the decoder pools of the inpaint UNet: ("decoder", "inpaint", h, w)


class ComponentsExecutor:
    """Runs the scheduler's stages on ``components`` (see the module docstring); ``results[request_id]``
    holds each finished request's images (as the pipeline's ``.images``) until :meth:`discard`."""

    def __init__(self, components: Components, sized: bool = True) -> None:
        """``sized``: each step runs at the smallest profile batch holding the pool's rows
        (:class:`~kandinsky_trt.runtime.loops.sized.SizedSlots`); False: always the largest."""
        self.sized = sized
        self.components = components
        # the stage code is every pipeline's: the decoder's _draw, _text, _loop_inputs and MoVQ calls
        # serve text2img, img2img and inpaint alike (the request's start says which)
        self._prior_pipe = KandinskyPriorPipeline(components=components)
        self._decoder_pipe = KandinskyPipeline(components=components)
        self._kept: dict[str, Kept] = {}
        self._loops: dict[Hashable, SizedSlots] = {}
        self._slot_owner: dict[Hashable, dict[int, tuple[str, int]]] = {}  # pool -> slot -> (request, row)

    @property
    def results(self) -> dict[str, Any]:
        return {r: k.images for r, k in self._kept.items() if k.images is not None}

    def refusal(self, task: str, combined: object) -> str | None:
        """Why these stages cannot run ``combined`` (the server then runs it as one pipeline call), or
        None: not a text2img/img2img/inpaint :class:`CombinedRequest`, a step callback, or more rows
        than a pool holds (the scheduler's ``RequestTooLarge``)."""
        reason = unservable(task, combined)
        if reason is not None:
            return reason
        request = scheduled_request("refusal", task, combined)
        for stage in STAGES:
            pool = self.pool(stage, request)
            if request.rows_at(stage) > self.capacity(stage, pool):
                return (f"rows: expected at most {self.capacity(stage, pool)} (the {stage} pool {pool!r}), "
                        f"found {request.rows_at(stage)}")
        return None

    # -- pools ---------------------------------------------------------------------------------

    def pool(self, stage: str, request: Request) -> Hashable:
        """The pool keys of the module docstring. The entry pool checks ``request`` first (so
        ``Scheduler.submit`` refuses what the stages cannot run, before it is queued).

        Raises:
            PipelineInputError: at ``encode``: its task or payload cannot run here, or its rows are
                not its payload's (build it with :func:`scheduled_request`).
        """
        if stage == ENCODE:
            _check(request)
            return (ENCODE,)
        if stage == PRIOR:
            return (PRIOR,)
        size = (request.height, request.width)
        return (stage, INPAINT, *size) if stage == DECODER and request.task == INPAINT else (stage, *size)

    def capacity(self, stage: str, pool: Hashable) -> int:
        return max(self.components.manifest.batches(_size(stage, pool)))

    def _loop(self, stage: str, pool: Hashable) -> SizedSlots:
        if pool not in self._loops:
            size, manifest = _size(stage, pool), self.components.manifest
            batches = manifest.batches(size) if self.sized else [self.capacity(stage, pool)]
            make = lambda batch: make_loop(self.components.backend, _spec(stage, pool),  # noqa: E731
                                           manifest.profile_index(batch, size), cuda_graph=self.components.cuda_graph)
            self._loops[pool] = SizedSlots(batches, make)
            self._slot_owner[pool] = {}
        return self._loops[pool]

    # -- one-shot stages -----------------------------------------------------------------------

    def call(self, stage: str, pool: Hashable, requests: Sequence[Request]) -> None:
        """One batched call: the MoVQ encoder over every request's images and the text encoders
        (prior's and decoder's) over every request's rows, or the MoVQ decoder over every request's
        latents; in chunks of the profiles' batches."""
        if stage == ENCODE:
            self._encode(requests)
        else:
            self._decode(requests, _size(stage, pool))

    def _encode(self, requests: Sequence[Request]) -> None:
        for request in requests:
            _check(request)  # as pool() did at submit: an executor may be driven without a scheduler
        encoded = self._movq_encoded([r.payload for r in requests])
        kept = [self._draw(r, e) for r, e in zip(requests, encoded)]
        rows = [row for k in kept for row in zip(k.request.prior.cond, k.request.prior.uncond)]
        prior_text = self._merged(lambda c, u: self._prior_pipe._encode(c, u, None), rows, None)
        cfg = self.components.profile.cfg
        rows = [row for k in kept for row in zip(k.decoder.prompts, k.decoder.negatives)]
        size = kept[0].decoder.size  # the decoder's text encoder: the profiles of the first request's size
        decoder_text = self._merged(lambda c, u: self._decoder_pipe._text(c, u, cfg, None), rows, size)
        for k in kept:
            k.prior_text, prior_text = prior_text[:len(k.request.prior.cond)], prior_text[len(k.request.prior.cond):]
            k.decoder_text, decoder_text = decoder_text[:len(k.decoder.prompts)], decoder_text[len(k.decoder.prompts):]

    def _movq_encoded(self, combined: list) -> list[np.ndarray | None]:
        """Each request's MoVQ image latents (img2img, inpaint; None for text2img): one merged encoder
        run per image size over every request's images, split back per request."""
        pixels = [c.decoder.image.pixels if isinstance(c.decoder.image, (Img2ImgStart, InpaintStart)) else None
                  for c in combined]
        out: list[np.ndarray | None] = [None] * len(combined)
        for shape in dict.fromkeys(p.shape[1:] for p in pixels if p is not None):
            mine = [i for i, p in enumerate(pixels) if p is not None and p.shape[1:] == shape]
            latents = self._decoder_pipe._movq_encode(np.concatenate([pixels[i] for i in mine]))
            for i, part in zip(mine, np.split(latents, np.cumsum([len(pixels[i]) for i in mine])[:-1])):
                out[i] = part
        return out

    def _draw(self, request: Request, encoded: np.ndarray | None) -> Kept:
        """The request's draws in the pipeline's order: prior latents, prior step noise, then the
        decoder's start (from its image's MoVQ latents ``encoded``) and step noise."""
        combined = request.payload
        latents, noise = self._prior_pipe._draw(combined.prior)
        start, conditioning, decoder = self._decoder_pipe._draw(combined.decoder, encoded)
        self._kept[request.request_id] = kept = Kept(combined, latents, noise, start, conditioning, decoder)
        return kept

    def _merged(self, encode, texts: list[tuple[str, str]], size) -> list[dict[str, np.ndarray]]:
        """``encode(cond, uncond)`` over the (cond, uncond) rows of every request, in chunks padded as
        the pipelines pad them; each row's conditioning, one entry per group of the network batch
        ([uncond, cond] with guidance)."""
        rows = []
        for chunk, batch in self.components.chunks(len(texts), size):
            cond = args.take_list([t[0] for t in texts], chunk, batch)
            uncond = args.take_list([t[1] for t in texts], chunk, batch)
            conditioning = encode(cond, uncond)
            rows += [{n: a[j::batch] for n, a in conditioning.items()} for j in range(chunk.stop - chunk.start)]
        return rows

    def _decode(self, requests: Sequence[Request], size: tuple[int, int]) -> None:
        kept = [self._kept[r.request_id] for r in requests]
        pixels = self._decoder_pipe._decode_latents(np.concatenate([k.latents for k in kept]), size)
        start = 0
        for k in kept:
            rows = len(k.latents)
            k.images, start = postprocess(pixels[start:start + rows], k.decoder.output_type), start + rows

    # -- loops ---------------------------------------------------------------------------------

    def admit(self, stage: str, pool: Hashable, request: Request) -> None:
        kept = self._kept[request.request_id]
        rows = kept.prior_rows(self._prior_table(kept)) if stage == PRIOR else kept.decoder_rows(self._decoder_pipe)
        loop, owners = self._loop(stage, pool), self._slot_owner[pool]
        kept.retired = {}
        for i, row in enumerate(rows):
            owners[loop.admit(row)] = (request.request_id, i)

    def _prior_table(self, kept: Kept):
        return self.components.loaded.scheduler("prior", kept.request.prior.steps)

    def step(self, stage: str, pool: Hashable) -> list[str]:
        done, owners = [], self._slot_owner[pool]
        for retired in self._loop(stage, pool).step():
            request_id, row = owners.pop(retired.slot)
            kept = self._kept[request_id]
            rows = len(kept.request.prior.cond) if stage == PRIOR else len(kept.decoder.prompts)
            latents = kept.take_retired(row, retired.latents, rows)
            if latents is None:
                continue
            if stage == PRIOR:
                kept.attach_embeddings(self.components.loaded, latents)
            else:
                kept.latents = latents
            done.append(request_id)
        return done

    def release(self, stage: str, pool: Hashable, request_id: str) -> None:
        owners = self._slot_owner[pool]
        for slot in [s for s, (r, _) in owners.items() if r == request_id]:
            self._loops[pool].release(slot)
            del owners[slot]
        self._kept[request_id].retired = {}

    def discard(self, request_id: str) -> None:
        self._kept.pop(request_id, None)

    def close(self) -> None:
        for loop in self._loops.values():
            loop.close()
        self._loops.clear()


def _check(request: Request) -> None:
    reason = mismatch(request)
    if reason is not None:
        raise PipelineInputError(reason)


def _size(stage: str, pool: Hashable) -> tuple[int, int] | None:
    """The image size of a pool (None for the size-independent entry and prior pools)."""
    return None if stage in (ENCODE, PRIOR) else tuple(pool[-2:])


def _spec(stage: str, pool: Hashable) -> LoopSpec:
    if stage == PRIOR:
        return PRIOR_LOOP
    return INPAINT_LOOP if pool[1] == INPAINT else UNET_LOOP
