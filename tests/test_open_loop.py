"""The open-loop benchmark's pure parts (benchmarks/open_loop.py, open_loop_report.py): the seeded Poisson
schedule and workload mix, the point summary and percentile maths, metrics parsing, the goals read off a
made-up run, and the Markdown. No server, no timing."""

import json
from collections import Counter
from dataclasses import replace

import pytest

from kandinsky_trt.benchmarks import open_loop as ol
from kandinsky_trt.benchmarks import open_loop_report as rep
from kandinsky_trt.benchmarks.sched_sim import Workload

MIX = Workload(rate_per_s=2.0, requests=4000, seed=3, strength=0.5, size=(64, 128))


def schedule(workload, window_s, max_requests=4000, min_arrivals=1):
    return ol.plan_point(workload, ol.LoadConfig(window_s=window_s, max_requests=max_requests,
                                                 min_arrivals=min_arrivals))


def test_the_schedule_is_reproducible_and_scales_with_the_rate():
    (first, _), (again, _) = schedule(MIX, 1e9), schedule(MIX, 1e9)
    assert first == again and len(first) == 4000
    faster, _ = schedule(replace(MIX, rate_per_s=4.0), 1e9)
    assert [r for _, r in faster] == [r for _, r in first]  # the same requests at every rate...
    assert all(abs(2 * tf - t) < 1e-9 for (tf, _), (t, _) in zip(faster, first))  # ...in time scaled by it


def test_the_schedule_has_the_mean_rate_and_stops_at_the_window():
    plan, _ = schedule(MIX, 1e9)
    assert len(plan) / plan[-1][0] == pytest.approx(2.0, rel=0.05)
    window, window_s = schedule(MIX, 30.0)
    assert window_s == 30.0 and window == plan[:len(window)] and window[-1][0] < 30.0 <= plan[len(window)][0]
    assert schedule(MIX, 30.0, max_requests=5)[0] == plan[:5]


def test_a_short_window_is_stretched_to_the_fewest_arrivals():
    plan, _ = schedule(MIX, 1e9)
    few, window_s = schedule(MIX, 1.0, min_arrivals=12)
    assert few == plan[:12] and window_s == plan[12][0] > 1.0
    assert schedule(MIX, 100.0, min_arrivals=12)[1] == 100.0  # enough arrivals: the window stays


def test_the_workload_mix_and_its_fields():
    requests = [r for _, r in schedule(MIX, 1e9)[0]]
    for attribute, values in (("decoder_steps", (10, 25, 50, 100)), ("prior_steps", (5, 25)),
                              ("task", ("text2img", "img2img"))):
        counts = Counter(getattr(r, attribute) for r in requests)
        assert set(counts) == set(values)
        assert all(abs(c / len(requests) - 1 / len(values)) < 0.03 for c in counts.values()), counts
    fields = [ol.request_fields(i, r) for i, r in enumerate(requests[:50])]
    assert len({f["seed"] for f in fields}) == 50 and len({f["prompt"] for f in fields}) == 50
    for f, r in zip(fields, requests):
        assert (f["height"], f["width"], f["num_inference_steps"], f["prior_steps"]) == (64, 128, r.decoder_steps,
                                                                                        r.prior_steps)
        assert "negative_prompt" not in f
        if r.task == "img2img":
            assert f["strength"] == 0.5 and f["image"].shape == (64, 128, 3) and f["image"].dtype.name == "uint8"
        else:
            assert "image" not in f and "strength" not in f


def test_every_combination_once_and_the_rotation():
    combos = ol.combinations(MIX)
    assert len(combos) == 16 == len({(c.task, c.prior_steps, c.decoder_steps) for c in combos})
    assert [ol.rotation(i) for i in range(4)] == [
        ["step-level", "request-level", "no batching"], ["request-level", "no batching", "step-level"],
        ["no batching", "step-level", "request-level"], ["step-level", "request-level", "no batching"]]


@pytest.mark.parametrize("message, elapsed, status", [
    ("server x (http): request: queue full (64 waiting)", 1.0, "refused"),
    ("server x (http): Exceeds maximum queue size", 1.0, "refused"),
    ("server x (http): no answer, the connection failed (timeout: timed out)", 54.9, "unfinished"),
    ("server x (http): decoder: expected finite latents, found NaN", 1.0, "failed"),
])
def test_error_answers_are_classified(message, elapsed, status):
    assert ol.classify(message, elapsed, bound_s=55.0) == status


def record(at, steps, status="done", latency=None):
    return dict(at_s=at, decoder_steps=steps, status=status, latency_s=latency)


def test_a_point_summary():
    records = [record(0.5, 10, latency=1.0), record(1.0, 10, latency=3.0), record(2.0, 10, latency=2.0),
               record(3.0, 100, latency=9.0), record(4.0, 100, "refused"), record(5.0, 50, "unfinished")]
    s = rep.summarize_point(records, window_s=10.0)
    assert (s["arrivals"], s["completed"], s["refused"], s["unfinished"], s["failed"]) == (6, 4, 1, 1, 0)
    assert s["offered_per_s"] == pytest.approx(0.6)
    assert s["throughput_per_s"] == pytest.approx(4 / 12.0)  # the last answer came at 3 + 9 s, past the window
    assert (s["p50_s"], s["p99_s"]) == (2.0, 9.0)  # nearest rank over 1, 2, 3, 9
    assert s["by_decoder_steps"]["10"] == {"n": 3, "p50_s": 2.0, "p99_s": 3.0, "min_s": 1.0, "max_s": 3.0}
    assert s["by_decoder_steps"]["50"]["n"] == 0 and s["by_decoder_steps"]["50"]["p50_s"] is None


def test_percentiles_are_nearest_rank():
    values = list(range(1, 201))
    stats = rep.class_stats(values)
    assert (stats["p50_s"], stats["p99_s"]) == (100, 198)
    assert rep.class_stats([4.0])["p99_s"] == 4.0


METRICS_TEXT = """# HELP nv_inference_queue_duration_us x
nv_inference_queue_duration_us{model="kandinsky",version="1"} %d
nv_inference_request_success{model="kandinsky",version="1"} %d
kandinsky_sched_queue_seconds_total{instance="kandinsky_0_0"} %f
kandinsky_sched_ended_total{instance="kandinsky_0_0"} %d
kandinsky_sched_rows_run_total{instance="kandinsky_0_0",stage="decoder"} %d
kandinsky_sched_rows_offered_total{instance="kandinsky_0_0",stage="decoder"} %d
kandinsky_sched_rows_offered_total{instance="kandinsky_0_1",stage="decoder"} 0
"""  # as the step server writes them: one metric per model instance (summed)


def test_queue_time_and_occupancy_from_two_scrapes():
    before = rep.parse_metrics(METRICS_TEXT % (1_000_000, 10, 1.0, 10, 100, 200))
    after = rep.parse_metrics(METRICS_TEXT % (4_000_000, 16, 4.0, 13, 250, 400))
    assert before["nv_inference_request_success"] == 10 and before["kandinsky_sched_ended_total"] == 10
    assert rep.queue_mean_s(before, after, step=True) == (pytest.approx(1.0), "step scheduler")
    assert rep.queue_mean_s(before, after, step=False) == (pytest.approx(0.5), "triton queue")
    assert rep.occupancy(before, after) == {"prior": None, "decoder": pytest.approx(0.75)}
    assert rep.queue_mean_s(before, before, step=True) == (None, "step scheduler")
    assert rep.stage_use(before, after)["decoder"] == {"calls": 0.0, "busy_s": 0.0, "rows_run": 150.0,
                                                       "rows_offered": 200.0}


def test_the_idle_summary():
    samples = [dict(task="text2img", prior_steps=5, decoder_steps=d, decoder_steps_run=d, latency_s=s)
               for d, s in ((10, 1.0), (10, 3.0), (100, 4.0), (100, 6.0))]
    idle = rep.idle_summary(samples)
    assert idle["mean_service_s"] == pytest.approx(2.5)  # the combinations' fastest samples 1 and 4
    assert idle["saturation_per_s"] == pytest.approx(1 / 2.5)
    assert (idle["p50_10_s"], idle["p99_s"]) == (1.0, 6.0)
    assert [c["median_s"] for c in idle["by_combo"]] == [2.0, 5.0]


def point(rate, p99, p50_10, refused=0, unfinished=0, fraction=1.0, achieved=None, arrivals=30):
    return {"fraction": fraction, "rate_per_s": rate, "offered_per_s": rate, "p50_s": p50_10, "arrivals": arrivals,
            "throughput_per_s": rate if achieved is None else achieved,
            "p99_s": p99, "completed": 10, "refused": refused, "unfinished": unfinished, "failed": 0,
            "by_decoder_steps": {"10": {"n": 3, "p50_s": p50_10, "p99_s": p99},
                                 "100": {"n": 2, "p50_s": p99, "p99_s": p99}},
            "queue_mean_s": 0.1, "occupancy": {"decoder": 0.8}, "server_cpu_s": 20.0, "load_avg": [1.0, 2.0]}


IDLE = {"p99_s": 2.0, "p50_10_s": 1.0, "mean_service_s": 1.0, "saturation_per_s": 1.0,
        "by_class_p50_s": {"10": 1.0, "100": 2.0},
        "by_combo": [{"task": "text2img", "prior_steps": 5, "decoder_steps": 10, "decoder_steps_run": 10,
                      "median_s": 1.0, "samples_s": [0.9, 1.1]}]}
MADE_UP = {
    "step-level": [point(0.5, 3.0, 1.1, fraction=0.5), point(1.0, 5.5, 1.4), point(1.5, 7.0, 2.0, fraction=1.5)],
    "request-level": [point(0.5, 4.0, 1.6, fraction=0.5), point(1.0, 7.0, 2.5), point(1.5, 5.0, 3.0, unfinished=2,
                                                                                          fraction=1.5)],
    "no batching": [point(0.5, 13.0, 3.0, fraction=0.5), point(1.0, 30.0, 9.0), point(1.5, 60.0, 20.0, refused=4,
                                                                                         fraction=1.5)],
}


def test_a_point_that_does_not_keep_up_is_not_sustainable():
    fast_but_behind = {"step-level": [point(0.5, 1.0, 1.0), point(1.0, 1.0, 1.0, achieved=0.85)],
                       "request-level": [point(0.5, 1.0, 1.0), point(1.0, 1.0, 1.0, achieved=0.95)]}
    rates = rep.goals(fast_but_behind, IDLE)["at_equal_p99"][0]["sustainable_rate_per_s"]
    assert rates == {"step-level": 0.5, "request-level": 1.0}
    few = {"step-level": [point(0.5, 1.0, 1.0), point(1.0, 1.0, 1.0, achieved=0.85, arrivals=5)]}
    assert rep.goals(few, IDLE)["at_equal_p99"][0]["sustainable_rate_per_s"] == {"step-level": 1.0}


def test_the_goals_of_a_made_up_run():
    g = rep.goals(MADE_UP, IDLE)
    by_multiple = {t["multiple_of_idle_p99"]: t for t in g["at_equal_p99"]}
    assert by_multiple[3.0]["p99_target_s"] == 6.0
    assert by_multiple[3.0]["sustainable_rate_per_s"] == {"step-level": 1.0, "request-level": 0.5, "no batching": None}
    assert by_multiple[3.0]["step_over_request"] == pytest.approx(2.0)
    # at 5x (10 s) request-level's 1.5 point meets the p99 but left requests unfinished: not sustainable
    assert by_multiple[5.0]["sustainable_rate_per_s"]["request-level"] == 1.0
    assert by_multiple[2.0]["sustainable_rate_per_s"] == {"step-level": 0.5, "request-level": 0.5, "no batching": None}
    p50 = g["p50_10_under_load_over_idle"]
    assert p50["step-level"]["within_goal_up_to_per_s"] == 1.0
    assert p50["request-level"]["within_goal_up_to_per_s"] is None
    assert p50["step-level"]["ratio_by_rate"][2] == [1.5, pytest.approx(2.0)]


def made_up_result():
    result = {"machine": {"hostname": "h", "cpu_model": "cpu", "cores": 2, "ram_gb": 8.0}, "machine_label": "test box",
              "created_utc": "2026-01-01T00:00:00Z", "artifacts": {"label": "tiny", "precision": "fp32",
                                                                   "profiles": ["2x64x128"]},
              "workload": {"decoder_steps": [10, 25, 50, 100]}, "config": {"fractions": [0.5, 1.0, 1.5]},
              "notes": ["a note"], "idle": IDLE, "contenders": MADE_UP, "findings": ["a finding"]}
    result["goals"] = rep.goals(MADE_UP, IDLE)
    return result


def test_the_markdown_of_a_made_up_run():
    md = rep.render_markdown(made_up_result())
    assert "| step-level | 1 | 1.000 | 1.000 | 1.000 | 10/0/0/0 | 1.4 / 5.5 (n 3) | - / - (n 0) |" in md
    assert "| 3x idle p99 = 6.00 s | 1 | 0.5 | - | 2 |" in md
    assert "step / request-level 2 (goal >= 2: met)" in md  # step-level's limit is inside the grid (1.5 fails)
    assert "- a finding" in md and "- a note" in md and "| text2img | 5 | 10 (10) | 0.900, 1.000 (1.100) |" in md


def test_the_files_and_their_rendering_again(tmp_path):
    paths = rep.write_results(made_up_result(), tmp_path, "stem")
    assert [p.name for p in paths][:2] == ["stem.json", "stem.md"]
    assert json.loads(paths[0].read_text())["goals"]["at_equal_p99"][1]["step_over_request"] == pytest.approx(2.0)
    (tmp_path / "stem.md").unlink()
    rep.main([str(paths[0])])
    assert (tmp_path / "stem.md").read_text() == rep.render_markdown(made_up_result())


@pytest.mark.parametrize("argv, message", [
    (["--fractions", "0.5", "-1"], "--fractions: expected positive numbers"),
    (["--window-s", "0"], "--window-s: expected seconds > 0"),
    (["--max-requests", "0"], "--max-requests: expected a whole number >= 1"),
    (["--min-arrivals", "-2"], "--min-arrivals: expected a whole number >= 1"),
    (["--strength", "1.5"], "--strength: expected a number in (0, 1]"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, argv, message):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(SystemExit) as exit_info:
        ol.main(["--artifacts", str(tmp_path), "--name", "x", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_missing_artifacts_are_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ol.main(["--artifacts", str(tmp_path / "nowhere"), "--name", "x"])
    assert "--artifacts: expected a directory holding manifest.json" in capsys.readouterr().err.splitlines()[-1]


def test_the_goal_text_when_the_grid_reached_no_limit():
    result = made_up_result()
    result["contenders"] = {name: [point(0.5, 1.0, 1.0), point(1.0, 1.0, 1.0)] for name in MADE_UP}
    result["goals"] = rep.goals(result["contenders"], IDLE)
    assert "step / request-level undetermined: both sustained the highest rate measured" in rep.goal_text(result)
    result["contenders"]["request-level"][1] = point(1.0, 1.0, 1.0, refused=1)
    result["goals"] = rep.goals(result["contenders"], IDLE)
    assert "step / request-level >= 2 (goal >= 2: met)" in rep.goal_text(result)
