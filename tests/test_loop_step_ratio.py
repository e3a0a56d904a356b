"""benchmarks/loop_step_ratio.py's pure logic on fake timings: ABBA order, per-step statistics, the
after/before ratio and its per-round spread, the report files. Nothing here is timed."""

from __future__ import annotations

import json

import pytest

from kandinsky_trt.benchmarks import loop_step_ratio as lsr

CASE = lsr.Case("fake", "tiny", 2, steps=10, rounds=4)


def test_round_order_is_abba():
    assert lsr.round_order(("before", "after"), 4) == [
        ("before", "after"), ("after", "before"), ("before", "after"), ("after", "before")]
    assert lsr.round_order(("a", "b", "c"), 2) == [("a", "b", "c"), ("c", "b", "a")]
    assert lsr.round_order(("a", "b"), 0) == []


def test_run_rounds_calls_in_order_and_keeps_round_order():
    calls = []

    def call(name):
        calls.append(name)
        return len(calls)

    samples = lsr.run_rounds(call, ("before", "after"), 3)
    assert calls == ["before", "after", "after", "before", "before", "after"]
    assert samples == {"before": [1.0, 4.0, 5.0], "after": [2.0, 3.0, 6.0]}


def _summary(before, after):
    return lsr.summarize_case(CASE, {"before": before, "after": after})


def test_summary_per_step_medians_and_ratio():
    s = _summary([100.0, 200.0, 300.0, 400.0], [110.0, 220.0, 330.0, 440.0])  # ms per 10-step call
    assert s["step_ms"]["before"]["median"] == pytest.approx(25.0)
    assert s["step_ms"]["before"]["p25"] == pytest.approx(17.5)
    assert s["step_ms"]["before"]["p75"] == pytest.approx(32.5)
    assert (s["step_ms"]["after"]["min"], s["step_ms"]["after"]["max"]) == pytest.approx((11.0, 44.0))
    assert s["ratio"] == pytest.approx(1.1)
    assert s["round_ratios"]["min"] == pytest.approx(1.1) and s["round_ratios"]["max"] == pytest.approx(1.1)
    assert s["verdict"] == "FAIL"
    assert s["samples_step_ms"]["after"] == pytest.approx([11.0, 22.0, 33.0, 44.0])


def test_summary_ratio_at_the_limit_passes_and_round_ratios_spread():
    s = _summary([100.0, 100.0, 100.0, 100.0], [103.0, 90.0, 110.0, 103.0])
    assert s["ratio"] == pytest.approx(1.03) and s["verdict"] == "pass"
    assert (s["round_ratios"]["min"], s["round_ratios"]["max"]) == pytest.approx((0.9, 1.1))
    assert s["round_ratios"]["median"] == pytest.approx(1.03)


@pytest.mark.parametrize("before, after", [([], []), ([1.0, 2.0], [1.0]), ([0.0], [1.0])])
def test_summary_refuses_uneven_empty_or_zero_samples(before, after):
    with pytest.raises(ValueError, match="call_ms: expected"):
        _summary(before, after)


def test_write_results_json_markdown(tmp_path):
    cases = [_summary([100.0, 102.0, 98.0, 100.0], [99.0, 101.0, 97.0, 100.0]),
             _summary([100.0] * 4, [120.0] * 4)]
    result = {"cases": cases, "latents_identical": True, "load": {"before": [1.0, 1.0, 1.0], "after": [2.0, 2.0, 2.0]},
              "machine": "test VM", "versions": {"onnxruntime": "x"}, "threads": 2, "created_utc": "now",
              "before": {"commit": "bd43037"}, "after": {"commit": "abc1234"}, "sizes": "tiny: b1 64x64 px"}
    paths = lsr.write_results(result, tmp_path, stem="r")
    assert [p.name for p in paths[:2]] == ["r.json", "r.md"]
    assert json.loads(paths[0].read_text())["cases"][1]["ratio"] == pytest.approx(1.2)
    md = paths[1].read_text()
    rows = [line for line in md.splitlines() if line.startswith("| fake |")]
    assert len(rows) == 2
    assert "**0.995**" in rows[0] and rows[0].endswith("pass |")
    assert "**1.200**" in rows[1] and rows[1].endswith("FAIL |")
    assert "test VM" in md and "[1.0, 1.0, 1.0]" in md and "bd43037" in md
    assert all(p.stat().st_size > 0 for p in paths)
