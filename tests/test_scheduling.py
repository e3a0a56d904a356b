"""The step-level scheduler (runtime/scheduling) on a stand-in executor and a simulated clock: no
networks, no timing; every time below is the stand-in's simulated seconds."""

import pytest
from fakes.scheduling import CountingExecutor

from kandinsky_trt.runtime.scheduling.admission import RequestLevel, StepLevel, fcfs_backfill
from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.scheduler import Scheduler
from kandinsky_trt.runtime.scheduling.work import (DECODER, Job, QueueFull, Request, RequestTooLarge,
                                                   SchedulingError)


def make(slots=2, queue_limit=16, policy=None, **costs):
    clock = SimulatedClock()
    executor = CountingExecutor(clock, slots=slots, **costs)
    finished = []
    scheduler = Scheduler(executor, clock, policy, queue_limit=queue_limit, on_finish=finished.append)
    return scheduler, executor, clock, finished


def req(request_id, decoder_steps=10, prior_steps=2, **kw):
    return Request(request_id, decoder_steps=decoder_steps, prior_steps=prior_steps, **kw)


def events(scheduler, kind, stage=None):
    return [e[3] for e in scheduler.trace if e[1] == kind and (stage is None or e[2] == stage)]


def run_rounds(scheduler, n):
    for _ in range(n):
        scheduler.run_round()


def test_a_short_request_admitted_while_a_long_one_runs_finishes_first():
    scheduler, _, clock, finished = make()
    scheduler.submit(req("long", decoder_steps=100))
    run_rounds(scheduler, 5)  # the long one is in its decoder slot by now
    assert "long" in events(scheduler, "admit", DECODER)
    scheduler.submit(req("short", decoder_steps=10))
    scheduler.run_until_idle()
    assert [f.request.request_id for f in finished] == ["short", "long"]
    assert all(f.status == "done" for f in finished)
    short = finished[0]
    assert short.latency_s < 20 and short.queue_s == 0  # 1 entry call, 2 prior and 10 decoder steps, 1 decode


def test_rows_with_different_step_counts_schedulers_and_tasks_share_step_calls():
    scheduler, executor, _, _ = make(slots=4)
    scheduler.submit(req("a", decoder_steps=10))
    scheduler.submit(req("b", decoder_steps=25, guidance_scale=7.0))
    scheduler.submit(req("c", decoder_steps=50, task="img2img", strength=0.5))
    scheduler.run_until_idle()
    decoder_steps = [ids for kind, stage, ids in executor.log if kind == "step" and stage == DECODER]
    assert decoder_steps[0] == ("a", "b", "c")  # one step call for the three
    assert len(decoder_steps) == 25  # the longest: b's 25 (c runs 50 * 0.5)
    entry = [ids for kind, stage, ids in executor.log if kind == "call" and stage == "encode"]
    assert entry == [("a", "b", "c")]


def test_inpaint_runs_in_its_own_decoder_slots():
    scheduler, executor, _, _ = make(slots=1)
    scheduler.submit(req("t", decoder_steps=5))
    scheduler.submit(req("i", decoder_steps=5, task="inpaint"))
    scheduler.run_until_idle()
    assert set(executor.left) == {("prior",), ("unet", 512, 512), ("unet_inpaint", 512, 512)}
    steps = [ids for kind, stage, ids in executor.log if kind == "step" and stage == DECODER]
    assert steps.count(("t",)) == 5 and steps.count(("i",)) == 5


def test_a_full_queue_refuses_at_once_with_the_queue_full_error():
    scheduler, _, _, _ = make(queue_limit=2)
    scheduler.submit(req("a"))
    scheduler.submit(req("b"))
    with pytest.raises(QueueFull, match="queue full"):
        scheduler.submit(req("c"))
    assert scheduler.metrics.refused == 1 and events(scheduler, "refuse") == ["c"]
    scheduler.run_round()  # a and b leave the queue for the entry call and the prior slots
    scheduler.submit(req("c"))


def test_requests_that_can_never_fit_or_repeat_an_id_are_refused():
    scheduler, _, _, _ = make(slots=2)
    with pytest.raises(RequestTooLarge, match="rows: expected at most 2"):
        scheduler.submit(req("big", rows=3))
    scheduler.submit(req("a"))
    with pytest.raises(SchedulingError, match="already queued"):
        scheduler.submit(req("a"))
    with pytest.raises(SchedulingError, match="task"):
        Request("x", task="upscale")


def test_prior_rows_and_decoder_rows_are_counted_apart():
    """A negative prompt: the prior samples two rows per image (``prior_rows``), the decoder one."""
    negative = Request("n", rows=2, prior_rows=4)
    assert negative.rows_at("encode") == negative.rows_at("prior") == 4 and negative.rows_at(DECODER) == 2
    assert Request("n", rows=2).rows_at("prior") == 2
    scheduler, executor, _, _ = make(slots=2)
    scheduler.submit(req("neg", decoder_steps=6, prior_rows=2))
    scheduler.submit(req("a", decoder_steps=6))
    scheduler.submit(req("b", decoder_steps=6))
    scheduler.run_until_idle()
    steps = {stage: [ids for kind, s, ids in executor.log if kind == "step" and s == stage]
             for stage in ("prior", DECODER)}
    assert steps["prior"] == [("neg",), ("neg",), ("a", "b"), ("a", "b")]  # neg held both prior slots
    assert ("neg", "a") in steps[DECODER] and max(map(len, steps[DECODER])) == 2  # and one decoder slot
    with pytest.raises(RequestTooLarge, match=r"rows: expected at most 2 \(the prior pool \('prior',\)\), found 3"):
        scheduler.submit(req("big", prior_rows=3))
    with pytest.raises(SchedulingError, match="prior_rows: expected an integer >= 1, found 0"):
        req("none", prior_rows=0)


def test_cancel_frees_the_slot_at_the_next_step_boundary():
    scheduler, executor, _, finished = make(slots=1)
    scheduler.submit(req("a", decoder_steps=100))
    scheduler.submit(req("b", decoder_steps=10))
    run_rounds(scheduler, 6)
    assert events(scheduler, "admit", DECODER) == ["a"]  # b waits for the one decoder slot
    assert scheduler.cancel("a") and not scheduler.cancel("nobody")
    steps_before = sum(1 for e in executor.log if e[0] == "step" and e[2] == ("a",))
    scheduler.run_round()
    assert ("release", DECODER, ("a",)) in executor.log
    assert events(scheduler, "admit", DECODER) == ["a", "b"]  # b took the slot in the same round
    assert sum(1 for e in executor.log if e[0] == "step" and e[2] == ("a",)) == steps_before
    scheduler.run_until_idle()
    assert [(f.request.request_id, f.status) for f in finished] == [("a", "cancelled"), ("b", "done")]
    assert scheduler.metrics.cancelled == 1 and scheduler.metrics.completed == 1


def test_a_queued_request_can_be_cancelled_too():
    scheduler, _, _, finished = make(slots=1)
    scheduler.submit(req("a"))
    scheduler.submit(req("b"))
    run_rounds(scheduler, 3)
    scheduler.cancel("b")  # waiting for the prior slot a holds
    scheduler.run_until_idle()
    assert [(f.request.request_id, f.status) for f in finished] == [("b", "cancelled"), ("a", "done")]
    assert scheduler.metrics.queue_depth == 0


def test_a_request_past_its_deadline_leaves_at_the_next_boundary():
    scheduler, executor, clock, finished = make(slots=1)
    scheduler.submit(req("a", decoder_steps=100, timeout_s=20.0))
    scheduler.submit(req("b", decoder_steps=10, timeout_s=5.0))  # still queued when its time is up
    scheduler.run_until_idle()
    ended = {f.request.request_id: f for f in finished}
    assert ended["a"].status == "timed_out" and ended["b"].status == "timed_out"
    assert 20.0 <= ended["a"].finished_at <= 21.0  # the first boundary at or after its deadline
    assert 5.0 <= ended["b"].finished_at <= 6.0
    assert ("release", DECODER, ("a",)) in executor.log
    assert scheduler.metrics.timed_out == 2


def test_admission_is_first_come_first_served():
    scheduler, _, _, finished = make(slots=1)
    for name in "abcd":
        scheduler.submit(req(name, decoder_steps=3))
    scheduler.run_until_idle()
    assert events(scheduler, "admit", DECODER) == list("abcd")
    assert [f.request.request_id for f in finished] == list("abcd")


def _jobs(*rows):
    return [Job(Request(f"r{i}", rows=n), i, 0.0) for i, n in enumerate(rows)]


def test_the_starvation_rule_bounds_how_often_a_wide_request_is_passed():
    queue = _jobs(2, 1, 1, 1)
    # one free slot: the 2-row head does not fit; smaller ones behind it may pass it twice, no more
    assert [j.request.request_id for j in fcfs_backfill(queue, 1, max_overtakes=2)] == ["r1"]
    assert queue[0].overtaken == 1
    assert [j.request.request_id for j in fcfs_backfill(queue[:1] + queue[2:], 1, 2)] == ["r2"]
    assert queue[0].overtaken == 2
    assert fcfs_backfill(queue[:1] + queue[3:], 1, 2) == []  # passed twice: r3 waits behind it
    assert [j.request.request_id for j in fcfs_backfill(queue[:1] + queue[3:], 2, 2)] == ["r0"]


def _passes(scheduler, victim):
    """Per stage: the requests that joined the stage's queue after ``victim`` but were admitted before it."""
    previous = {"encode": "submit", "prior": "encode", "decoder": "prior", "decode": "decoder"}
    out = {}
    for stage, before in previous.items():
        joined = [e[3] for e in scheduler.trace if (e[1] == "submit" if stage == "encode" else
                                                   e[1] == "retire" and e[2] == before)]
        admitted = events(scheduler, "admit", stage)
        later = set(joined[joined.index(victim) + 1:])
        out[stage] = [r for r in admitted[:admitted.index(victim)] if r in later]
    return out


def test_a_two_row_request_is_not_starved_by_a_stream_of_one_row_requests():
    scheduler, _, _, finished = make(slots=2, policy=StepLevel(max_overtakes=1), queue_limit=64)
    scheduler.submit(req("one-0", decoder_steps=4))
    scheduler.submit(req("wide", decoder_steps=4, rows=2))
    for i in range(1, 12):
        scheduler.submit(req(f"one-{i}", decoder_steps=4 + i % 3))
    scheduler.run_until_idle()
    passes = _passes(scheduler, "wide")
    assert all(len(p) <= 1 for p in passes.values()), passes  # passed at most once in each queue
    assert passes["prior"] == ["one-1"]  # one slot was free after one-0: one-1 used it, once
    assert scheduler.metrics.completed == 13


def test_request_level_batching_runs_one_group_of_equal_keys_to_the_end():
    scheduler, executor, _, finished = make(slots=4, policy=RequestLevel(4))
    scheduler.submit(req("a", decoder_steps=100))
    scheduler.submit(req("b", decoder_steps=10))
    scheduler.submit(req("c", decoder_steps=100))
    scheduler.run_until_idle()
    entry = [ids for kind, stage, ids in executor.log if kind == "call" and stage == "encode"]
    assert entry == [("a", "c"), ("b",)]  # b waits for the whole a+c group
    assert [f.request.request_id for f in finished] == ["a", "c", "b"]


def test_metrics_count_what_happened():
    scheduler, _, _, _ = make(slots=2, queue_limit=3)
    for name in "abc":
        scheduler.submit(req(name, decoder_steps=4))
    with pytest.raises(QueueFull):
        scheduler.submit(req("d"))
    scheduler.run_round()
    scheduler.cancel("c")
    scheduler.run_until_idle()
    m = scheduler.metrics
    assert (m.submitted, m.refused, m.completed, m.cancelled, m.timed_out, m.failed) == (3, 1, 2, 1, 0, 0)
    assert m.max_queue_depth >= 1 and m.queue_depth == 0
    decoder = m.stages[DECODER]
    assert decoder.admitted == decoder.retired == 2
    assert decoder.calls == 4 and decoder.occupancy == 1.0  # a and b side by side in both slots
    assert decoder.mean_call_s == 1.0
    assert m.stages["encode"].admitted == 3  # c was cancelled waiting for a prior slot
    snap = m.snapshot()
    assert snap["stages"][DECODER]["occupancy"] == 1.0 and snap["queue_s_mean"] >= 0


def test_an_executor_failure_ends_the_requests_it_touched_and_the_rest_go_on():
    scheduler, executor, _, finished = make(slots=2)
    scheduler.submit(req("a"))
    scheduler.submit(req("b"))
    run_rounds(scheduler, 4)
    executor.fail_next.add(DECODER)
    scheduler.submit(req("c"))
    scheduler.run_until_idle()
    status = {f.request.request_id: (f.status, f.error) for f in finished}
    assert status["a"][0] == status["b"][0] == "failed" and "planted" in status["a"][1]
    assert status["c"] == ("done", None)
    assert scheduler.metrics.failed == 2


def test_submit_and_cancel_from_other_threads_while_the_worker_runs():
    import threading

    scheduler, _, _, finished = make(slots=4, queue_limit=1000)
    stop = threading.Event()

    def worker():
        while not stop.is_set() or scheduler.has_work:
            scheduler.run_round()

    def client(k):
        for i in range(50):
            scheduler.submit(req(f"c{k}-{i}", decoder_steps=1 + i % 4))
            if i % 10 == 0:
                scheduler.cancel(f"c{k}-{i}")

    thread = threading.Thread(target=worker)
    thread.start()
    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    stop.set()
    thread.join(timeout=30)
    m = scheduler.metrics
    assert len(finished) == m.submitted == 200 and m.completed + m.cancelled == 200
    assert m.queue_depth == 0 and not scheduler.has_work
