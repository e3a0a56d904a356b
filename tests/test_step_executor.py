"""The step scheduler on the tiny CPU export (runtime/serve/step_executor.py): requests admitted at
different step boundaries, sharing the loops' slots, each give the pipeline's image for the same call
run alone, bit for bit. Each scheduled request carries the typed request the pipeline's own
``__call__`` builds for that call (captured before it runs)."""

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime.pipelines.combined import KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.scheduler import Scheduler
from kandinsky_trt.runtime.scheduling.work import DECODER, PRIOR, Request
from kandinsky_trt.runtime.serve.step_executor import ComponentsExecutor

PICTURE = Image.new("RGB", (128, 64), (120, 30, 200))
SIZE = dict(height=64, width=128)  # artifacts_fp32_b2_wide: batch 2, 64x128: two slots per loop
CALLS = {
    "long": ("text2img", dict(prompt="a red fox", num_inference_steps=6, prior_num_inference_steps=3, generator=1)),
    "short": ("text2img", dict(prompt="a boat", num_inference_steps=2, prior_num_inference_steps=2,
                               guidance_scale=7.0, generator=2)),
    "img": ("img2img", dict(prompt="a house", image=PICTURE, num_inference_steps=8, strength=0.5,
                            prior_num_inference_steps=2, generator=3)),
}


PIPELINES = {"text2img": KandinskyCombinedPipeline, "img2img": KandinskyImg2ImgCombinedPipeline}


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
