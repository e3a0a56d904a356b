"""The step scheduler on the tiny CPU export (runtime/serve/step_executor.py): requests admitted at
different step boundaries, sharing the loops' slots, each give the pipeline's image for the same call
run alone, bit for bit (text2img, img2img, inpaint; negative prompts; several images per prompt).
Each scheduled request carries the typed request the pipeline's own ``__call__`` builds for that
call (captured before it runs)."""

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.pipelines.combined import (KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline,
                                                      KandinskyInpaintCombinedPipeline)
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.scheduler import Scheduler
from kandinsky_trt.runtime.scheduling.work import DECODER, PRIOR, Request, RequestTooLarge
from kandinsky_trt.runtime.serve.step_executor import ComponentsExecutor, scheduled_request

PICTURE = Image.new("RGB", (128, 64), (120, 30, 200))
SIZE = dict(height=64, width=128)  # artifacts_fp32_b2_wide: batch 2, 64x128: two slots per loop
CALLS = {
    "long": ("text2img", dict(prompt="a red fox", num_inference_steps=6, prior_num_inference_steps=3, generator=1)),
    "short": ("text2img", dict(prompt="a boat", num_inference_steps=2, prior_num_inference_steps=2,
                               guidance_scale=7.0, generator=2)),
    "img": ("img2img", dict(prompt="a house", image=PICTURE, num_inference_steps=8, strength=0.5,
                            prior_num_inference_steps=2, generator=3)),
}


PIPELINES = {"text2img": KandinskyCombinedPipeline, "img2img": KandinskyImg2ImgCombinedPipeline,
             "inpaint": KandinskyInpaintCombinedPipeline}


def built_request(components, task: str, kwargs: dict):
    """The ``CombinedRequest`` the pipeline's ``__call__`` builds for ``kwargs`` (its ``run`` captured)."""
    capturing = type("Capturing", (PIPELINES[task],), {"run": lambda self, request: request})
    return capturing(components=components)(**kwargs)


def scheduled(components, request_id: str) -> Request:
    task, kw = CALLS[request_id]
    payload = built_request(components, task, {**kw, **SIZE, "output_type": "np"})
    return Request(request_id, task=task, prior_steps=kw["prior_num_inference_steps"],
                   decoder_steps=kw["num_inference_steps"], guidance_scale=kw.get("guidance_scale", 4.0),
                   strength=kw.get("strength"), payload=payload, **SIZE)


@pytest.fixture(scope="module")
def components(artifacts_fp32_b2_wide):
    with Components(artifacts_fp32_b2_wide[0]) as c:
        yield c


def drive(executor, clock, components) -> tuple[Scheduler, list]:
    """long first; short and img three rounds later (the order of rounds is what matters, not time)."""
    finished = []
    scheduler = Scheduler(executor, clock, on_finish=finished.append)
    scheduler.submit(scheduled(components, "long"))
    for _ in range(3):
        scheduler.run_round()
    scheduler.submit(scheduled(components, "short"))
    scheduler.submit(scheduled(components, "img"))
    scheduler.run_until_idle()
    return scheduler, finished


def test_each_scheduled_image_equals_the_pipeline_alone(components, monkeypatch):
    calls = []
    run = components.run
    monkeypatch.setattr(components, "run", lambda network, feeds: calls.append(network) or run(network, feeds))
    executor = ComponentsExecutor(components)
    scheduler, finished = drive(executor, SimulatedClock(), components)
    executor.close()
    monkeypatch.undo()
    # merged one-shot calls: short and img share one text-encoder call (batch 2 holds both)
    entry = [e[3] for e in scheduler.trace if e[1] == "admit" and e[2] == "encode"]
    assert entry == ["long", "short", "img"] and calls.count("text_encoder") == calls.count("prior_text_encoder") == 2
    assert calls.count("movq_decoder") == scheduler.metrics.stages["decode"].calls
    assert {f.request.request_id: f.status for f in finished} == dict.fromkeys(CALLS, "done")
    assert [f.request.request_id for f in finished][0] == "short"  # admitted later, done first
    admitted = [e[3] for e in scheduler.trace if e[1] == "admit" and e[2] == DECODER]
    assert admitted == ["long", "short", "img"]  # img waited for a free slot (two slots)
    assert [e[3] for e in scheduler.trace if e[1] == "admit" and e[2] == PRIOR] == ["long", "short", "img"]
    results = executor.results
    for request_id, (task, kw) in CALLS.items():
        alone = PIPELINES[task](components=components)(**kw, **SIZE, output_type="np").images
        assert np.array_equal(results[request_id], alone), request_id


def test_the_simulated_executor_admits_and_retires_as_the_real_one(components):
    """The simulator's slot bookkeeping (steps left per row) against the loops of slots themselves."""
    from kandinsky_trt.benchmarks.sched_sim import ConstantCost, SimulatedExecutor

    def order(scheduler):
        return [e[1:] for e in scheduler.trace if e[1] in ("admit", "retire", "done")]

    executor = ComponentsExecutor(components)
    real, _ = drive(executor, SimulatedClock(), components)
    executor.close()
    clock = SimulatedClock()
    simulated, _ = drive(SimulatedExecutor(clock, ConstantCost(), slots=2), clock, components)
    assert order(simulated) == order(real) and len(order(real)) == 3 * 9


MASK = Image.new("L", (128, 64), 0)
MASK.paste(255, (32, 16, 96, 48))  # repaint the middle
# Submitted in three waves, a few rounds apart; each request's rows in the comments: (prior, decoder),
# two slots per loop.
WAVES = [
    {"t2-two": ("text2img", dict(prompt="a red fox", num_images_per_prompt=2, num_inference_steps=6,
                                 prior_num_inference_steps=3, generator=1)),  # (2, 2)
     "inp-neg": ("inpaint", dict(prompt="a cat", image=PICTURE, mask_image=MASK, negative_prompt="blurry",
                                 num_inference_steps=4, prior_num_inference_steps=2, guidance_scale=5.0,
                                 generator=2))},  # (2, 1), the inpaint UNet
    {"img": ("img2img", dict(prompt="a house", image=PICTURE, num_inference_steps=8, strength=0.5,
                             prior_num_inference_steps=2, generator=3)),  # (1, 1)
     "inp": ("inpaint", dict(prompt="a tree", image=PICTURE, mask_image=MASK, num_inference_steps=3,
                             prior_num_inference_steps=2, guidance_scale=1.0, generator=4))},  # (1, 1)
    {"img-neg": ("img2img", dict(prompt="a lake", image=PICTURE, negative_prompt="dark", num_inference_steps=5,
                                 strength=0.7, guidance_scale=6.0, prior_guidance_scale=3.0,
                                 prior_num_inference_steps=3, generator=5)),  # (2, 1)
     "inp-two": ("inpaint", dict(prompt="a dog", image=PICTURE, mask_image=MASK, num_images_per_prompt=2,
                                 num_inference_steps=2, prior_num_inference_steps=2, generator=6)),  # (2, 2)
     "t2-neg": ("text2img", dict(prompt="a boat", negative_prompt="fog", num_inference_steps=2, guidance_scale=7.0,
                                 prior_num_inference_steps=2, generator=7))},  # (2, 1)
]


def from_call(components, request_id: str, task: str, kwargs: dict) -> Request:
    return scheduled_request(request_id, task, built_request(components, task, {**kwargs, **SIZE, "output_type": "np"}))


def most_in_flight(trace, stage: str) -> int:
    """The most requests in ``stage``'s slots at once (admitted, not yet retired or ended)."""
    now, most = set(), 0
    for _, event, at, request_id in trace:
        if at == stage and event == "admit":
            now.add(request_id)
        elif at == stage:
            now.discard(request_id)
        most = max(most, len(now))
    return most


def test_every_task_negative_prompts_and_images_per_prompt_equal_the_pipeline_alone(components, monkeypatch):
    calls = []
    run = components.run
    monkeypatch.setattr(components, "run", lambda network, feeds: calls.append(network) or run(network, feeds))
    executor = ComponentsExecutor(components)
    finished = []
    scheduler = Scheduler(executor, SimulatedClock(), on_finish=finished.append)
    for wave, rounds in zip(WAVES, (3, 2, None)):
        for request_id, (task, kw) in wave.items():
            assert executor.refusal(task, built_request(components, task, {**kw, **SIZE})) is None
            scheduler.submit(from_call(components, request_id, task, kw))
        for _ in range(rounds or 0):
            scheduler.run_round()
    scheduler.run_until_idle()
    executor.close()
    monkeypatch.undo()
    assert {f.request.request_id: f.status for f in finished} == {r: "done" for w in WAVES for r in w}
    request = {f.request.request_id: f.request for f in finished}
    assert executor.pool(DECODER, request["inp"]) == ("decoder", "inpaint", 64, 128)
    assert executor.pool(DECODER, request["img"]) == ("decoder", 64, 128)
    assert (request["inp-neg"].rows_at(PRIOR), request["inp-neg"].rows_at(DECODER)) == (2, 1)
    # the inpaint UNet's slots are its own: three requests in decoder slots at once (two slots per loop)
    assert most_in_flight(scheduler.trace, DECODER) == 3
    # img and inp entered together: one MoVQ encoder call for both images; img-neg's one image and
    # inp-two's two each their own (the entry call holds two prior rows)
    assert calls.count("movq_encoder") == 4
    results = executor.results
    for request_id, (task, kw) in ((r, c) for w in WAVES for r, c in w.items()):
        alone = PIPELINES[task](components=components)(**kw, **SIZE, output_type="np").images
        assert results[request_id].shape == alone.shape == (kw.get("num_images_per_prompt", 1), 64, 128, 3)
        assert np.array_equal(results[request_id], alone), request_id


def test_a_cancelled_request_frees_every_slot_it_held(components):
    executor = ComponentsExecutor(components)
    finished = []
    scheduler = Scheduler(executor, SimulatedClock(), on_finish=finished.append)
    two = dict(prompt="a fox", num_images_per_prompt=2, prior_num_inference_steps=2)
    scheduler.submit(from_call(components, "victim", "text2img", {**two, "num_inference_steps": 8, "generator": 1}))
    after = {**two, "prompt": "a boat", "num_inference_steps": 3, "generator": 2}
    scheduler.submit(from_call(components, "after", "text2img", after))
    for _ in range(4):
        scheduler.run_round()
    decoder_admits = [e[3] for e in scheduler.trace if e[1] == "admit" and e[2] == DECODER]
    assert decoder_admits == ["victim"]  # after waits: victim's two rows hold both decoder slots
    scheduler.cancel("victim")
    scheduler.run_until_idle()
    executor.close()
    assert [(f.request.request_id, f.status) for f in finished] == [("victim", "cancelled"), ("after", "done")]
    assert list(executor.results) == ["after"]
    alone = KandinskyCombinedPipeline(components=components)(**after, **SIZE, output_type="np").images
    assert np.array_equal(executor.results["after"], alone)


def test_what_the_stages_cannot_run_is_refused_before_it_is_queued(components):
    executor = ComponentsExecutor(components)
    scheduler = Scheduler(executor, SimulatedClock())
    call = dict(prompt="a fox", num_inference_steps=2, prior_num_inference_steps=2, generator=1, **SIZE)
    big = built_request(components, "text2img", {**call, "negative_prompt": "fog", "num_images_per_prompt": 2})
    too_large = "rows: expected at most 2 (the encode pool ('encode',)), found 4"  # 2 images + 2 negatives
    assert executor.refusal("text2img", big) == too_large
    with pytest.raises(RequestTooLarge, match=too_large.replace("(", r"\(").replace(")", r"\)")):
        scheduler.submit(scheduled_request("big", "text2img", big))
    two = built_request(components, "text2img", {**call, "num_images_per_prompt": 2})
    with pytest.raises(PipelineInputError, match=r"rows: expected 2 \(prior_rows 2\) .*found 1 \(prior_rows 1\)"):
        scheduler.submit(Request("hand-built", task="text2img", payload=two, **SIZE))  # rows left at 1
    assert not scheduler.has_work and scheduler.metrics.submitted == 0
    assert executor.refusal("img2img", two) == "payload: expected img2img's decoder start, found NoneType"
    assert executor.refusal("prior", two) == ("task: expected one of ['text2img', 'img2img', 'inpaint'] with a "
                                              "CombinedRequest payload, found 'prior' with CombinedRequest")
    watched = built_request(components, "text2img", {**call, "callback": lambda *step: None})
    assert executor.refusal("text2img", watched) == ("callback: expected none (a step callback needs the "
                                                     "pipeline's own loop), found one")
    executor.close()


@pytest.fixture(scope="module")
def multi(artifacts_fp32_multi):
    with Components(artifacts_fp32_multi[0]) as c:
        yield c


def test_each_size_has_its_own_pools_on_artifacts_of_several_profiles(multi):
    """Batches 1 and 2 at 64x64 and 64x128: two slots per pool; two-row requests run at batch 2 alone
    too, so their images are bit for bit the pipeline's."""
    calls = {
        "wide": ("text2img", dict(prompt="a fox", num_images_per_prompt=2, num_inference_steps=3,
                                  height=64, width=128)),
        "square-inp": ("inpaint", dict(prompt="a cat", image=PICTURE, mask_image=MASK, num_images_per_prompt=2,
                                       num_inference_steps=2, height=64, width=64)),
        "square-img": ("img2img", dict(prompt="a hut", image=PICTURE, num_images_per_prompt=2, strength=0.6,
                                       num_inference_steps=4, height=64, width=64)),
    }
    executor = ComponentsExecutor(multi)
    scheduler = Scheduler(executor, SimulatedClock())
    requests = []
    for seed, (request_id, (task, kw)) in enumerate(calls.items()):
        kw.update(prior_num_inference_steps=2, generator=seed)  # the pipeline alone below gets the same
        requests.append(scheduled_request(request_id, task, built_request(multi, task, {**kw, "output_type": "np"})))
        scheduler.submit(requests[-1])
    scheduler.run_until_idle()
    executor.close()
    assert [executor.pool(DECODER, r) for r in requests] == [
        ("decoder", 64, 128), ("decoder", "inpaint", 64, 64), ("decoder", 64, 64)]
    assert [executor.capacity(DECODER, executor.pool(DECODER, r)) for r in requests] == [2, 2, 2]
    for request_id, (task, kw) in calls.items():
        alone = PIPELINES[task](components=multi)(**kw, output_type="np").images
        assert np.array_equal(executor.results[request_id], alone), request_id


def test_steps_run_at_the_smallest_batch_holding_the_rows_and_images_keep_their_bits(multi, monkeypatch):
    """One-row requests on batches 1 and 2: a long request steps alone at batch 1, grows into batch 2
    when a short one joins, shrinks back when it leaves; both images equal the pipeline alone (which
    runs a single prompt at batch 1), bit for bit."""
    from kandinsky_trt.runtime.loops.sized import SizedSlots

    steps, step = [], SizedSlots.step

    def recording(slots):  # (rows stepped, the batch they stepped at), decoder pools only
        rows, retired = len(slots.occupied), step(slots)
        if slots.capacity == 2 and slots._active.spec.network == "unet":
            steps.append((rows, slots.batch))
        return retired

    monkeypatch.setattr(SizedSlots, "step", recording)
    calls = {"long": ("text2img", dict(prompt="a fox", num_inference_steps=20)),
             "short": ("img2img", dict(prompt="a hut", image=PICTURE, strength=0.6, num_inference_steps=4))}
    executor = ComponentsExecutor(multi)
    scheduler = Scheduler(executor, SimulatedClock())
    requests = {}
    for seed, (request_id, (task, kw)) in enumerate(calls.items()):
        kw.update(prior_num_inference_steps=2, generator=seed, height=64, width=64)
        requests[request_id] = scheduled_request(request_id, task,
                                                 built_request(multi, task, {**kw, "output_type": "np"}))
    scheduler.submit(requests["long"])
    for _ in range(6):
        scheduler.run_round()
    scheduler.submit(requests["short"])
    scheduler.run_until_idle()
    executor.close()
    monkeypatch.undo()
    assert steps[0] == (1, 1) and (2, 2) in steps and steps[-1] == (1, 1), steps
    assert all(rows == batch for rows, batch in steps), steps
    assert executor._loops == {}  # closed
    for request_id, (task, kw) in calls.items():
        alone = PIPELINES[task](components=multi)(**kw, output_type="np").images
        assert np.array_equal(executor.results[request_id], alone), request_id
