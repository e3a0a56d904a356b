"""The step-batching simulator (benchmarks/sched_sim.py, benchmarks/step_batching_sim.py): pinned to the
scheduler on a recorded trace, and the script's logic on a tiny configuration (no torch, no timing)."""

import json
import math

import pytest
from scheduling_trace import TRACE, arrivals, events, record, request

from kandinsky_trt.benchmarks import step_batching_sim as script
from kandinsky_trt.benchmarks.gpu_specs import H200_SXM
from kandinsky_trt.benchmarks.sched_sim import (ConstantCost, NetworkFloor, RooflineCost, SimulatedExecutor, Workload,
                                                simulate, steps_run)
from kandinsky_trt.runtime.scheduling.admission import StepLevel
from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.work import DECODER, Request


@pytest.fixture(scope="module")
def recorded():
    return json.loads(TRACE.read_text())


def test_the_scheduler_still_makes_the_recorded_trace(recorded):
    assert recorded["arrivals"] == arrivals()
    assert record(recorded["arrivals"]) == recorded["events"]


def test_the_simulator_makes_the_scheduler_s_admissions_in_the_same_order(recorded):
    schedule = [(a["t"], request(a)) for a in recorded["arrivals"]]
    executor = SimulatedExecutor(SimulatedClock(), ConstantCost(recorded["step_s"], recorded["call_s"]),
                                 slots=recorded["slots"])
    run = simulate(schedule, executor, StepLevel(), queue_limit=recorded["queue_limit"])
    assert events(run.trace) == recorded["events"]  # admissions, retirements, refusals: same order, same times
    assert sorted(run.refused) == sorted(e[3] for e in recorded["events"] if e[1] == "refuse") != []


FLOORS = {n: NetworkFloor(gflop=g, weight_bytes=w, io_bytes=1000) for n, g, w in (
    ("prior_text_encoder", 30, 2e8), ("text_encoder", 90, 6e8), ("prior", 330, 2e9), ("unet", 1700, 2.5e9),
    ("unet_inpaint", 1700, 2.5e9), ("movq_decoder", 2000, 8e7), ("movq_encoder", 1000, 5e7))}


def test_the_roofline_takes_the_slower_of_compute_and_weight_reads():
    cost = RooflineCost(FLOORS, peak_flop_per_s=1e15, bytes_per_s=5e12, compute_efficiency=0.5,
                        bandwidth_efficiency=0.5, overhead_s=0.0)
    assert cost.network_s("unet", 2) == pytest.approx(2 * 1700e9 / 0.5e15)  # compute-bound
    assert cost.network_s("prior", 1) == pytest.approx((2e9 + 1000) / 2.5e12)  # weight-bound
    assert [cost.fit(n) for n in (1, 3, 5, 8, 9)] == [1, 4, 8, 8, 16]
    rising = RooflineCost(FLOORS, 1e15, 5e12, overhead_s=0.0, batch_efficiency=((1, 0.1), (4, 0.3)))
    assert [rising.efficiency(b) for b in (1, 2, 4, 8)] == [0.1, 0.1, 0.3, 0.3]


def test_steps_run_follow_the_img2img_strength():
    assert steps_run(Request("a", task="img2img", decoder_steps=100, strength=0.3), DECODER) == 30
    assert steps_run(Request("a", task="img2img", decoder_steps=10, strength=0.05), DECODER) == 1
    assert steps_run(Request("a", decoder_steps=25), DECODER) == 25


def test_a_loop_of_slots_costs_its_profile_batch_and_a_request_level_group_its_fit():
    clock = SimulatedClock()
    cost = ConstantCost()
    calls = []
    cost_spy = type("Spy", (), {"call_s": lambda s, st, r: 0.0, "fit": lambda s, n: {1: 1, 2: 2, 3: 4}[n],
                                "step_s": lambda s, st, p, rows: calls.append(rows) or 1.0})()
    for loop_batch, expected in (("slots", [8, 8]), ("fit", [4, 1])):
        calls.clear()
        executor = SimulatedExecutor(clock, cost_spy, slots=8, loop_batch=loop_batch)
        for i, steps in enumerate((1, 2, 2)):
            executor.admit(DECODER, ("unet", 512, 512), Request(f"r{i}", decoder_steps=steps))
        assert executor.step(DECODER, ("unet", 512, 512)) == ["r0"]
        executor.release(DECODER, ("unet", 512, 512), "r1")
        assert executor.step(DECODER, ("unet", 512, 512)) == ["r2"]
        assert calls == expected
    assert isinstance(cost.step_s(DECODER, None, 8), float)


def test_the_script_on_a_tiny_configuration_writes_consistent_results(tmp_path):
    config = script.SimConfig(load_fractions=(0.2, 0.9), requests=40, slots=4, p99_targets_s=(1.0, 1e6),
                              workload=Workload(rate_per_s=1.0, requests=1, decoder_steps=(10, 50)))
    result = script.build_result(FLOORS, H200_SXM, config)
    assert set(result["scenarios"]) == {"constant efficiency", "efficiency rising with batch"}
    sc = result["scenarios"]["constant efficiency"]
    assert set(sc["policies"]) == {"step-level", "request-level", "no batching", script.SIZED,
                                   "step-level, 2 slots"}
    for points in sc["policies"].values():
        assert [p["rate_per_s"] for p in points] == sc["rates_per_s"]
        for p in points:
            assert p["completed"] + p["refused"] == 40 and p["p50_s"] <= p["p99_s"]
            assert set(p["by_decoder_steps"]) <= {"10", "50"}
    loose = sc["at_equal_p99"][1]  # a target every point meets: the highest rate for every policy
    assert set(loose["sustainable_rate_per_s"].values()) == {max(sc["rates_per_s"])}
    assert loose["step_over_request"] == 1.0
    assert all(v > 0 for v in sc["idle_p50_10_steps_s"].values()) and "goal >= 2" in sc["goals"]["text"]
    assert set(sc["goals"]["by_policy"]) == {"step-level", script.SIZED, "step-level, 2 slots"}
    paths = script.write_results(result, tmp_path, stem="tiny")
    assert json.loads(paths[0].read_text())["kind"] == "simulation"
    text = paths[1].read_text()
    assert "simulated" in text and "not a measurement" in text and "| step-level |" in text


def test_the_sustainable_rate_stops_at_the_first_rate_that_misses_the_target():
    points = [{"rate_per_s": r, "p99_s": p, "refused": 0} for r, p in ((1, 1.0), (2, 3.0), (3, 1.5))]
    assert script.sustainable_rate(points, 2.0) == 1
    assert script.sustainable_rate(points, 0.5) is None
    assert script.percentile([3, 1, 2], 0.5) == 2 and script.percentile([], 0.5) is None
    assert math.isclose(script.percentile(range(100), 0.99), 98)
