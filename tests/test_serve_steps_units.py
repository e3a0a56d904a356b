"""The step-scheduled model's service without Triton (runtime/serve/stepped.py), its worker turned by
hand: every request's outputs equal the Python API's for it alone whatever shares its steps, a full
queue refuses the whole request at once, and gone clients, deadlines, bad items and shutdown free
their slots and get their own answers. The same service behind a real tritonserver:
tests/test_serve_steps.py."""

import time

import numpy as np
import pytest

from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.serve.client import item_arrays
from kandinsky_trt.runtime.serve.stepped import StepService
from serve_helpers import assert_same, python_api, task_fields

H, W = 64, 128  # artifacts_fp32_b2_wide: batch 2, two slots per loop


@pytest.fixture(scope="module")
def components(artifacts_fp32_b2_wide):
    with Components(artifacts_fp32_b2_wide[0]) as c:
        yield c


class Replies:
    """Each submitted request's one reply, by name."""

    def __init__(self) -> None:
        self.got: dict[str, object] = {}
        self.order: list[str] = []

    def __call__(self, name: str):
        def reply(response) -> None:
            assert name not in self.got, f"{name} answered twice"
            self.got[name] = response
            self.order.append(name)
        return reply


def fields(task: str, seed: int, steps: int, **extra) -> dict:
    return {**task_fields(task, seed, H, W), "num_inference_steps": steps, **extra}


def batched(*items: dict) -> dict[str, np.ndarray]:
    """One request of several items (the rows of its tensors)."""
    arrays = [item_arrays(f) for f in items]
    return {name: np.concatenate([a[name] for a in arrays]) for name in arrays[0]}


def turn_until(service: StepService, done, rounds: int = 2000) -> None:
    for _ in range(rounds):
        if done():
            return
        service.run_once()
    pytest.fail("the service did not finish in time")


def test_every_request_equals_the_python_api_alone_whatever_shares_its_steps(components):
    service = StepService(components, max_images=4, queue_limit=16, start=False)
    replies = Replies()
    requests = {"long": fields("text2img", 1, 12), "img": fields("img2img", 2, 6, guidance_scale=7.0),
                "short": fields("text2img", 3, 2), "prior": task_fields("prior", 4, H, W),
                "inpaint": fields("inpaint", 8, 3), "negative": fields("text2img", 9, 3, negative_prompt="blurry"),
                "two": fields("img2img", 10, 4, num_images=2, guidance_scale=1.0)}
    service.submit(item_arrays(requests["long"]), lambda: False, replies("long"))
    for _ in range(4):  # long is in a decoder slot before the others arrive
        service.run_once()
    service.submit(item_arrays(requests["short"]), lambda: False, replies("short"))
    pair = (fields("text2img", 5, 3), fields("text2img", 6, 4, prompt="a boat"))
    service.submit(batched(*pair), lambda: False, replies("pair"))
    for name in ("img", "prior", "inpaint", "negative", "two"):
        service.submit(item_arrays(requests[name]), lambda: False, replies(name))
    turn_until(service, lambda: len(replies.got) == 8)
    service.stop()
    for name, request in requests.items():
        assert replies.got[name].error is None, replies.got[name].error
        assert_same(replies.got[name].outputs, python_api(components, request))
    expected = {"images": np.concatenate([python_api(components, f)["images"] for f in pair])}
    assert_same(replies.got["pair"].outputs, expected)
    assert replies.order.index("short") < replies.order.index("long")  # came later, left first
    decoder = service.scheduler.metrics.stages["decoder"]
    assert decoder.rows_run > decoder.calls  # rows of different requests shared steps
    scheduled = {e[3] for e in service.scheduler.trace if e[1] == "submit"}
    assert len(scheduled) == 8  # every item but the prior task's ran in the loops' slots


def test_a_full_queue_refuses_the_whole_request_at_once_and_keeps_the_others(components):
    service = StepService(components, max_images=4, queue_limit=2, start=False)
    replies = Replies()
    service.submit(item_arrays(fields("text2img", 1, 2)), lambda: False, replies("first"))
    service.submit(batched(fields("text2img", 2, 2), fields("text2img", 3, 2)), lambda: False, replies("pair"))
    assert replies.order == ["pair"]  # refused at submit: answered before any work
    refused = replies.got["pair"]
    assert refused.kind == "unavailable" and "queue full" in refused.error and "2 requests" in refused.error
    assert service.scheduler.metrics.refused == 1
    turn_until(service, lambda: "first" in replies.got)
    assert replies.got["first"].error is None and not service.scheduler.has_work  # the pair left nothing behind
    service.stop()


def test_a_gone_client_leaves_at_the_next_step_and_frees_its_slot(components):
    service = StepService(components, max_images=4, queue_limit=4, start=False)
    replies, gone = Replies(), {"v": False}
    service.submit(item_arrays(fields("text2img", 1, 500)), lambda: gone["v"], replies("long"))
    turn_until(service, lambda: service.scheduler.occupancy()["decoder"][0] == 1)
    gone["v"] = True
    service._next_poll = 0.0  # the next turn polls (they are CANCEL_POLL_S apart)
    service.run_once()
    assert replies.got["long"].kind == "cancelled" and service.scheduler.occupancy()["decoder"][0] == 0
    assert service.scheduler.metrics.cancelled == 1 and not service.scheduler.has_work
    service.stop()


def test_a_deadline_ends_a_request_at_a_step_boundary(components):
    service = StepService(components, max_images=4, queue_limit=4, request_timeout_s=60.0, start=False)
    replies = Replies()
    service.submit(item_arrays(fields("text2img", 1, 500)), lambda: False, replies("late"), timeout_s=0.2)
    service.submit(item_arrays(fields("text2img", 2, 2)), lambda: False, replies("ok"))  # the server's 60 s
    started = time.monotonic()
    turn_until(service, lambda: len(replies.got) == 2)
    late = replies.got["late"]
    assert late.kind == "unavailable" and "timed out after 0.2 s" in late.error
    assert time.monotonic() - started < 30 and replies.got["ok"].error is None
    assert service.scheduler.metrics.timed_out == 1
    service.stop()


def test_a_bad_item_fails_its_request_with_its_own_message_and_nothing_is_left(components):
    service = StepService(components, max_images=4, queue_limit=4, start=False)
    replies = Replies()
    service.submit(batched(fields("text2img", 1, 2), fields("text2img", 2, 2, height=65)), lambda: False,
                   replies("bad"))
    bad = replies.got["bad"]
    assert bad.kind == "client" and bad.error.startswith("item 1: ") and "height" in bad.error
    assert not service.scheduler.has_work
    service.submit({"task": np.array([b"text2img"], dtype=object)}, lambda: False, replies("no prompt"))
    assert replies.got["no prompt"].kind == "client" and "prompt" in replies.got["no prompt"].error
    service.stop()


def test_stop_answers_every_held_request_unavailable(components):
    service = StepService(components, max_images=4, queue_limit=4, start=False)
    replies = Replies()
    service.submit(item_arrays(fields("text2img", 1, 500)), lambda: False, replies("held"))
    service.run_once()
    service.stop()
    assert replies.got["held"].kind == "unavailable" and "shutting down" in replies.got["held"].error
    service.submit(item_arrays(fields("text2img", 2, 2)), lambda: False, replies("after"))
    assert replies.got["after"].kind == "unavailable"


def test_the_worker_thread_serves_submissions_from_other_threads(components):
    service = StepService(components, max_images=4, queue_limit=4)
    replies = Replies()
    request = fields("text2img", 7, 3)
    service.submit(item_arrays(request), lambda: False, replies("threaded"))
    deadline = time.monotonic() + 60
    while "threaded" not in replies.got and time.monotonic() < deadline:
        time.sleep(0.01)
    service.stop()
    assert_same(replies.got["threaded"].outputs, python_api(components, request))


def test_a_failing_reply_or_cancel_check_touches_no_other_request(components):
    """A response that cannot be sent (its client's stream is gone) or a cancel check that raises must
    not end the round's other requests."""
    service = StepService(components, max_images=4, queue_limit=4, start=False)
    replies = Replies()

    def broken_reply(response) -> None:
        raise ConnectionError("stream closed")

    def broken_check() -> bool:
        raise OSError("marks directory removed")

    service.submit(item_arrays(fields("text2img", 1, 2)), lambda: False, broken_reply)
    service.submit(item_arrays(fields("text2img", 2, 3)), broken_check, replies("kept"))
    turn_until(service, lambda: "kept" in replies.got)
    service.stop()
    assert replies.got["kept"].error is None and service.scheduler.metrics.completed == 2


class _FakeMetrics:
    """Stands in for triton_python_backend_utils' metric classes: records what is published."""

    class MetricFamily:
        COUNTER, GAUGE = "counter", "gauge"
        made: dict = {}

        def __init__(self, name: str, description: str, kind: str) -> None:
            self.name, self.kind = name, kind

        def Metric(self, labels: dict):  # noqa: N802 - Triton's name
            metric = _FakeMetric(self.kind)
            _FakeMetrics.MetricFamily.made[(self.name, tuple(sorted(labels.items())))] = metric
            return metric


class _FakeMetric:
    def __init__(self, kind: str) -> None:
        self.kind, self.value = kind, 0.0

    def increment(self, delta: float) -> None:
        assert self.kind == "counter" and delta > 0
        self.value += delta

    def set(self, value: float) -> None:
        assert self.kind == "gauge"
        self.value = value


def test_published_counters_only_go_up_across_a_scheduler_reset():
    from kandinsky_trt.runtime.scheduling.metrics import Metrics
    from kandinsky_trt.runtime.serve.step_metrics import TritonStepMetrics

    published = TritonStepMetrics(_FakeMetrics, "kandinsky_0")
    made = _FakeMetrics.MetricFamily.made
    completed = made[("kandinsky_sched_requests_total", (("event", "completed"), ("instance", "kandinsky_0")))]
    occupied = made[("kandinsky_sched_slots_occupied", (("instance", "kandinsky_0"), ("stage", "decoder")))]
    metrics = Metrics(completed=5, queue_depth=3)
    published.publish(metrics.snapshot(), {"decoder": (2, 4)}, force=True)
    assert completed.value == 5 and occupied.value == 2
    published.publish(Metrics(completed=1).snapshot(), {}, force=True)  # a fresh scheduler counts from 0
    published.publish(Metrics(completed=3).snapshot(), {}, force=True)
    assert completed.value == 8 and occupied.value == 0  # 5, then 1 and 2 more since the reset
