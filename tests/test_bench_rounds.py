"""Side-by-side benchmarks alternate their contenders round by round (issue 18 §4).

Timed sequentially (all torch calls, then all ONNX Runtime calls) a change of machine load between
the two moves the ratio. These tests use fake contenders and a fake clock: cheap, and exact about
the order in which calls happen.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from types import SimpleNamespace

import pytest

from kandinsky_trt.benchmarks import harness
from kandinsky_trt.benchmarks.report import StageMeasurement, render_markdown, new_result, stage_result, \
    with_baseline_ratios
from kandinsky_trt.benchmarks.rounds import interleave


def _recorder(calls: list, name: str):
    return lambda: calls.append(name)


def test_interleave_alternates_the_contenders_after_a_warmup_of_each():
    calls: list[str] = []
    contenders = {name: _recorder(calls, name) for name in ("torch", "ort", "trt")}
    timed = interleave(contenders, rounds=3, warmup=2)
    assert calls == ["torch", "ort", "trt"] * 2 + ["torch", "ort", "trt"] * 3
    assert {name: len(t.samples_ms) for name, t in timed.items()} == {"torch": 3, "ort": 3, "trt": 3}


def test_samples_are_in_round_order_and_a_load_drift_hits_both_sides():
    """A clock whose every call gets slower (machine load rising): each round's ratio stays close
    to the true one (2x), where a sequential run would have reported the drift as a ratio."""
    ticks = itertools.count()
    elapsed = {"torch": 2.0, "ort": 1.0}
    state = {"now": 0.0}
    drift = lambda: 1.05 ** next(ticks)  # noqa: E731  (load grows 5 % with every call)

    def contender(name):
        def call():
            state["now"] += elapsed[name] * drift()
        return call

    timed = interleave({"torch": contender("torch"), "ort": contender("ort")}, rounds=4, warmup=0,
                       clock=lambda: state["now"])
    torch_ms, ort_ms = timed["torch"].samples_ms, timed["ort"].samples_ms
    assert torch_ms == tuple(sorted(torch_ms)) and ort_ms == tuple(sorted(ort_ms))  # in round order
    rows = with_baseline_ratios([stage_result(StageMeasurement("unet", b, t.samples_ms, t.peak_host_rss_mb))
                                 for b, t in timed.items()], interleaved=True)
    ort_row = next(r for r in rows if r.backend == "ort")
    assert len(ort_row.round_ratios) == 4
    assert ort_row.round_ratios == pytest.approx([2 / 1.05] * 4)  # only the drift within a round remains
    markdown = render_markdown(new_result({"batch": 1, "height": 64, "width": 64, "cfg": True}, "fp32", rows))
    assert f"{min(ort_row.round_ratios):.2f}–{max(ort_row.round_ratios):.2f}×" in markdown
    assert "min–max ms" in markdown


def test_round_ratios_only_for_interleaved_runs():
    rows = [stage_result(StageMeasurement("unet", b, s, 1.0)) for b, s in (("torch", (4.0, 6.0)), ("ort", (2.0, 2.0)))]
    assert all(r.round_ratios is None for r in with_baseline_ratios(rows))
    ort = with_baseline_ratios(rows, interleaved=True)[1]
    assert ort.round_ratios == (2.0, 3.0) and ort.ratio_to_baseline == pytest.approx(2.5)


def test_harness_stages_and_pipelines_take_turns(monkeypatch):
    """``kandinsky-trt bench``: each stage, and each end-to-end pipeline, alternates the backends."""
    calls: list[tuple[str, str]] = []
    monkeypatch.setattr(harness, "sample_inputs", lambda network: {})
    components = {b: SimpleNamespace(session=lambda name, b=b: SimpleNamespace(run=lambda feeds, name=name, b=b:
                                                                              calls.append((name, b))))
                  for b in ("torch", "ort")}
    manifest = SimpleNamespace(networks=("prior", "unet"), network=lambda n: SimpleNamespace(resolved=lambda: None),
                               profile=SimpleNamespace(height=64, width=64))
    config = harness.BenchConfig(artifacts=Path("unused"), repeat=2, warmup=1, pipelines=("text2img",))
    stages = list(harness._stage_measurements(config, manifest, components))
    turns = [("prior", "torch"), ("prior", "ort")] * 3 + [("unet", "torch"), ("unet", "ort")] * 3
    assert calls == turns and [(s.stage, s.backend) for s in stages] == [("prior", "torch"), ("prior", "ort"),
                                                                          ("unet", "torch"), ("unet", "ort")]
    calls.clear()
    monkeypatch.setattr(harness, "_diffusers", lambda manifest, device: "torch")
    monkeypatch.setattr(harness, "_ours", lambda comp: "ort")
    monkeypatch.setattr(harness, "_pipeline_call", lambda kind, factory, config, size:
                        (lambda: calls.append((kind, factory))))
    list(harness._pipeline_measurements(config, manifest, components))
    assert calls == [("text2img", "torch"), ("text2img", "ort")] * 3


def test_no_benchmark_times_its_contenders_one_after_the_other():
    """The sequential timer is gone: every side-by-side benchmark goes through ``rounds.interleave``."""
    import kandinsky_trt.benchmarks as pkg

    sources = {p.name: p.read_text() for p in Path(pkg.__file__).parent.glob("*.py")}
    assert not [name for name, text in sources.items() if "time_calls" in text]
    assert "interleave(" in sources["harness.py"] and "interleave(" in sources["full_size_stages.py"]


def test_bench_writes_outside_the_committed_results_by_default():
    from kandinsky_trt.runtime.cli.main import build_parser

    out = build_parser().parse_args(["bench", "--artifacts", "A"]).out
    assert out == "bench-results" and "benchmarks" not in Path(out).parts
