"""The loop of slots: every batch row at its own step, and rows independent of each other (issue 19).

The proof of independence: requests of every kind are run through the public pipelines and their
loop rows captured at ``Components.denoise`` (the chunked call: the loop with every row admitted at
once). The rows are then mixed in one batch of the 2-row profile — different step counts,
schedulers, guidance scales (above and at most 1), strengths, seeds and tasks, admitted whenever a
slot frees, so rows run side by side at different positions of different tables — and each row's
final latents must equal, bit for bit on ONNX Runtime's CPU, the same row run alone in that profile.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime import (Components, KandinskyImg2ImgPipeline, KandinskyInpaintPipeline,
                                   KandinskyPipeline, KandinskyPriorPipeline)
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.contract.loop_specs import INPAINT_LOOP, PRIOR_LOOP, UNET_LOOP
from kandinsky_trt.runtime.loops.factory import make_loop
from kandinsky_trt.runtime.loops.slots import LoopRow, SlotLoop
from kandinsky_trt.runtime.loops.template import chunk_rows


@pytest.fixture(scope="module")
def components(artifacts_fp32_multi):
    with Components(artifacts_fp32_multi[0]) as c:
        yield c


@pytest.fixture(scope="module")
def rows(components) -> dict:
    return _rows(components)


def _capture(c: Components):
    """Replace ``c.denoise`` by a spy; returns the list it fills with (spec, the call's real rows)."""
    captured, denoise = [], c.denoise

    def spy(spec, table, inputs, callback=None):
        out = denoise(spec, table, inputs, callback)
        captured.append((spec, chunk_rows(inputs, table)))
        return out

    c.denoise = spy
    return captured


def _image(seed: int, size=(64, 64)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def _rows(c: Components) -> dict:
    """Loop rows of many requests, by loop: one row per request (single prompt, one image)."""
    captured = _capture(c)
    try:
        prior = KandinskyPriorPipeline(components=c)
        emb = prior("a cat", num_inference_steps=3, generator=1)
        prior("a dog", negative_prompt="dark", num_inference_steps=5, guidance_scale=1.0, generator=2)
        prior("a cow", num_inference_steps=2, guidance_scale=9.0, generator=3)
        e, n = emb.image_embeds, emb.negative_image_embeds
        text2img, img2img = KandinskyPipeline(components=c), KandinskyImg2ImgPipeline(components=c)
        inpaint = KandinskyInpaintPipeline(components=c)
        text2img("a", e, n, num_inference_steps=4, generator=4, output_type="np")
        text2img("b", e * 0.5, n, num_inference_steps=6, scheduler="ddpm", guidance_scale=1.0, generator=5,
                 output_type="np")
        text2img("c", e, n * 2, num_inference_steps=3, scheduler="dpmpp2m", guidance_scale=7.5, generator=6,
                 output_type="np")
        img2img("d", _image(7), e, n, num_inference_steps=10, strength=0.5, generator=7, output_type="np")
        img2img("e", _image(8), e, n, num_inference_steps=7, strength=0.9, scheduler="ddpm", guidance_scale=0.5,
                generator=8, output_type="np")
        mask = np.zeros((64, 64), np.float32)
        mask[16:48, 20:] = 1.0
        inpaint("f", _image(9), mask, e, n, num_inference_steps=3, generator=9, output_type="np")
        inpaint("g", _image(10), 1.0 - mask, e, n, num_inference_steps=5, scheduler="ddpm", guidance_scale=1.0,
                generator=10, output_type="np")
        inpaint("h", _image(11), mask, e, n, num_inference_steps=2, scheduler="dpmpp2m", generator=11,
                output_type="np")
    finally:
        del c.denoise
    rows = {}
    for spec, call_rows in captured:
        rows.setdefault(spec, []).append(call_rows[0])  # one real row per call (batch-1 profile)
    return rows


def _loop(c: Components, spec, batch: int = 2) -> SlotLoop:
    return make_loop(c.backend, spec, c.manifest.profile_index(batch, (64, 64)))


def _alone(c: Components, spec, row: LoopRow) -> np.ndarray:
    with _loop(c, spec) as loop:
        return loop.run([row])[0]


def _mixed(loop: SlotLoop, rows: list[LoopRow]) -> tuple[dict[int, np.ndarray], set]:
    """Admit ``rows`` first come first served whenever a slot is free; step until every row is done.
    Returns the final latents by row index and the set of (position, position) pairs seen side by side."""
    waiting, slot_of, done, side_by_side = list(range(len(rows))), {}, {}, set()
    positions = {}
    while waiting or slot_of:
        while waiting and loop.free:
            index = waiting.pop(0)
            slot_of[loop.admit(rows[index])] = index
            positions[index] = 0
        if len(slot_of) == 2:
            a, b = slot_of.values()
            side_by_side.add((len(rows[a].table), positions[a], len(rows[b].table), positions[b]))
        for index in slot_of.values():
            positions[index] += 1
        for retired in loop.step():
            done[slot_of.pop(retired.slot)] = retired.latents
    return done, side_by_side


@pytest.mark.parametrize("spec", [PRIOR_LOOP, UNET_LOOP, INPAINT_LOOP], ids=lambda s: s.network)
def test_rows_mixed_in_one_batch_equal_each_row_alone_bit_for_bit(components, rows, spec):
    rows = rows[spec]
    assert len(rows) >= 3 and len({len(r.table) for r in rows}) >= 3  # step counts differ
    alone = [_alone(components, spec, row) for row in rows]
    with _loop(components, spec) as loop:
        mixed, side_by_side = _mixed(loop, rows)
    # Rows really ran at different positions of different tables in one network call.
    assert any(pa != pb or la != lb for la, pa, lb, pb in side_by_side)
    for i, row in enumerate(rows):
        assert mixed[i].tobytes() == alone[i].tobytes(), f"{spec.network} row {i}: differs from the row run alone"


def test_reversed_admission_order_gives_the_same_rows(components, rows):
    rows = rows[UNET_LOOP]
    with _loop(components, UNET_LOOP) as loop:
        forward, _ = _mixed(loop, rows)
        backward, _ = _mixed(loop, rows[::-1])
    for i in range(len(rows)):
        assert forward[i].tobytes() == backward[len(rows) - 1 - i].tobytes()


def test_an_empty_slot_stays_zero_and_finite_and_a_released_slot_is_reusable(components, rows):
    row = rows[UNET_LOOP][0]
    with _loop(components, UNET_LOOP) as loop:
        slot = loop.admit(row, slot=1)
        assert loop.free == [0] and loop.occupied == [1]
        loop.step()
        latents = loop.storage.read_latents()
        assert np.isfinite(latents).all() and not latents[0].any()  # slot 0 empty: zeros
        loop.release(slot)  # a cancelled row: its slot frees at the step boundary
        assert loop.free == [0, 1] and not loop.storage.read_latents().any()
        again = loop.run([row])[0]
    assert again.tobytes() == _alone(components, UNET_LOOP, row).tobytes()


def test_admission_is_refused_with_a_readable_error(components, rows):
    rows = rows[UNET_LOOP]
    with _loop(components, UNET_LOOP) as loop:
        loop.admit(rows[0])
        loop.admit(rows[1])
        with pytest.raises(BackendError, match="expected a free slot, found all 2 occupied"):
            loop.admit(rows[2])
        bad = LoopRow(rows[0].latents[:, :4], rows[0].conditioning, rows[0].table, 4.0)
        loop.release(0)
        with pytest.raises(BackendError, match=r"latents: expected float32\[4, 8, 8\], found float32\[4, 4, 8\]"):
            loop.admit(bad)
        missing = LoopRow(rows[0].latents, {}, rows[0].table, 4.0)
        with pytest.raises(BackendError, match="row conditioning: expected"):
            loop.admit(missing)
        assert loop.free == [0]  # a refused row takes no slot


@pytest.mark.parametrize("spec", [PRIOR_LOOP, UNET_LOOP, INPAINT_LOOP], ids=lambda s: s.network)
def test_sized_slots_step_at_the_smallest_batch_holding_the_rows_and_moved_rows_keep_their_bits(
        components, rows, spec):
    """Rows admitted at different steps move between the batch-1 and batch-2 loops with their whole
    state (mid-table, noise taken); each row's latents equal the row run alone in the batch-2 loop, bit
    for bit (ONNX Runtime CPU gives a row the same bits at batch 1 and 2 on this export)."""
    from kandinsky_trt.runtime.loops.sized import SizedSlots

    rows = rows[spec]
    alone = [_alone(components, spec, row) for row in rows]
    slots = SizedSlots([1, 2], lambda batch: _loop(components, spec, batch))
    batches, done, key_of = [], {}, {}
    waiting = list(range(len(rows)))
    try:
        while waiting or key_of:
            if waiting and len(key_of) < 2 and (not key_of or len(batches) % 2):  # admit every other step
                index = waiting.pop(0)
                key_of[slots.admit(rows[index])] = index
            occupied = len(key_of)
            for retired in slots.step():
                done[key_of.pop(retired.slot)] = retired.latents
            batches.append((occupied, slots.batch))  # the batch that step ran at
    finally:
        slots.close()
    assert all(rows_in <= batch and (rows_in == 2 or batch == 1) for rows_in, batch in batches), batches
    assert slots.moves >= 2  # rows grew into batch 2 and shrank back into batch 1 mid-table
    for i in range(len(rows)):
        assert done[i].tobytes() == alone[i].tobytes(), f"{spec.network} row {i}: differs from the row run alone"


def test_a_move_needs_a_running_row_and_the_same_networks(components, rows):
    with _loop(components, UNET_LOOP, 2) as unet, _loop(components, PRIOR_LOOP, 1) as prior:
        with pytest.raises(BackendError, match="expected a running row to move"):
            unet.move(0, prior)
        slot = unet.admit(rows[UNET_LOOP][0])
        with pytest.raises(BackendError, match="found prior"):
            unet.move(slot, prior)
