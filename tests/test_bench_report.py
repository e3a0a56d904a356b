"""Benchmark result format, comparison, GPU table, FLOP counting and the physical lower bound.

The full-size checks count the real Kandinsky 2.1 networks on the ``meta`` device (no weights, no
memory; about a second each) and compare with kandinsky_map.md §3.6 / perf_anchors.md, which
were produced independently with the same FlopCounterMode method. Timings themselves are not
tested: they need the benchmark machine.
"""

from __future__ import annotations

import json
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch = pytest.importorskip("torch")

from kandinsky_trt.benchmarks import gpu_specs  # noqa: E402
from kandinsky_trt.benchmarks.flops import (  # noqa: E402
    CostError,
    NetworkCost,
    count_forward,
    lower_bound_ms,
    network_cost,
)
from kandinsky_trt.benchmarks.gpu_specs import GpuSpec, lookup_gpu  # noqa: E402
from kandinsky_trt.benchmarks.report import (  # noqa: E402
    ReportError,
    StageMeasurement,
    compare_results,
    current_host_rss_mb,
    load_result,
    new_result,
    peak_host_rss_mb,
    render_markdown,
    stage_result,
    summarize,
    with_baseline_ratios,
    write_result,
)
from kandinsky_trt.runtime.contract.spec import Profile  # noqa: E402

PROFILE = Profile().to_dict()


def _result(medians: dict[tuple[str, str], float], bound: dict[str, float] | None = None):
    """A result whose every (stage, backend) has samples centred on the given median."""
    bound = bound or {}
    rows = [
        stage_result(StageMeasurement(stage, backend, (0.9 * m, m, 1.1 * m), 100.0, None, bound.get(stage)))
        for (stage, backend), m in medians.items()
    ]
    return new_result(PROFILE, "fp16", with_baseline_ratios(rows), device_name="NVIDIA H100 80GB HBM3")


MEDIANS = {
    ("unet", "torch"): 100.0,
    ("unet", "ort"): 50.0,
    ("unet", "trt"): 20.0,
    ("movq_decoder", "torch"): 40.0,
    ("movq_decoder", "trt"): 10.0,
    ("text2img_total", "trt"): 3000.0,
}


# ---------------------------------------------------------------- statistics and rows


def test_summarize_known_samples():
    stats = summarize([float(i) for i in range(1, 11)])
    # numpy's linear interpolation: p10 = 1 + 0.1 * 9, p90 = 1 + 0.9 * 9
    assert stats == pytest.approx({"median": 5.5, "p10": 1.9, "p90": 9.1, "mean": 5.5, "min": 1.0, "n": 10})


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [-1.0]])
def test_summarize_rejects_bad_samples(bad):
    with pytest.raises(ReportError, match="samples_ms"):
        summarize(bad)


def test_stage_rows_ratio_and_fraction_of_bound():
    stages = {(s.stage, s.backend): s for s in _result(MEDIANS, {"unet": 10.0}).stages}
    assert stages[("unet", "ort")].ratio_to_baseline == pytest.approx(2.0)
    assert stages[("unet", "trt")].ratio_to_baseline == pytest.approx(5.0)
    assert stages[("unet", "torch")].ratio_to_baseline == pytest.approx(1.0)
    assert stages[("text2img_total", "trt")].ratio_to_baseline is None  # no torch row for that stage
    assert stages[("unet", "trt")].fraction_of_bound == pytest.approx(0.5)  # bound 10 ms / median 20 ms
    assert stages[("movq_decoder", "trt")].lower_bound_ms is None
    assert stages[("movq_decoder", "trt")].fraction_of_bound is None


def test_host_memory_helpers_report_plausible_values():
    current, peak = current_host_rss_mb(), peak_host_rss_mb()
    assert current is not None and 10 < current <= peak + 1  # this process holds torch: > 10 MiB


# ---------------------------------------------------------------- files


def test_json_round_trip_markdown_and_png(tmp_path):
    result = _result(MEDIANS, {"unet": 10.0})
    json_path, md_path, png_path = write_result(result, tmp_path)
    loaded = load_result(json_path)
    assert loaded == result
    data = json.loads(json_path.read_text())
    assert data["schema_version"] == 1
    assert set(data["stages"][0]) >= {
        "stage", "backend", "samples_ms", "median_ms", "p10_ms", "p90_ms", "peak_host_rss_mb",
        "peak_device_mb", "ratio_to_baseline", "lower_bound_ms", "fraction_of_bound",
    }
    assert data["backends"] == ["torch", "ort", "trt"]
    assert data["device"] == {"name": "NVIDIA H100 80GB HBM3"}
    assert {"python", "numpy", "onnxruntime", "torch", "kandinsky_trt"} <= set(data["versions"])
    markdown = md_path.read_text()
    assert markdown == render_markdown(result)
    for stage, backend in MEDIANS:
        assert f"| {stage} | {backend} |" in markdown
    assert "5.00×" in markdown and "50.0 %" in markdown  # trt unet: speed-up and share of the bound
    pytest.importorskip("matplotlib")
    assert png_path is not None and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_load_result_rejects_other_schema(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({**_result(MEDIANS).to_dict(), "schema_version": 99}))
    with pytest.raises(ReportError, match="schema_version: expected 1, found 99"):
        load_result(path)
    path.write_text("not json")
    with pytest.raises(ReportError, match="result JSON"):
        load_result(path)


def test_compare_flags_20_percent_slowdown_not_2_percent(tmp_path):
    a = {("unet", "trt"): 20.0, ("movq_decoder", "trt"): 10.0, ("prior", "trt"): 1.0}
    b = {("unet", "trt"): 24.0, ("movq_decoder", "trt"): 10.2, ("text_encoder", "trt"): 2.0}
    a_path, _, _ = write_result(_result(a), tmp_path, stem="a")
    b_path, _, _ = write_result(_result(b), tmp_path, stem="b")
    report = compare_results(a_path, b_path, threshold=0.05)
    changes = {(r.stage, r.backend): r.change for r in report.rows}
    assert changes == pytest.approx({("unet", "trt"): 0.20, ("movq_decoder", "trt"): 0.02})
    assert [(r.stage, r.backend) for r in report.regressions] == [("unet", "trt")]
    assert report.only_in_a == (("prior", "trt"),) and report.only_in_b == (("text_encoder", "trt"),)
    markdown = report.to_markdown()
    assert "| unet | trt | 20.000 | 24.000 | +20.0 % | **regression** |" in markdown
    assert "| movq_decoder | trt | 10.000 | 10.200 | +2.0 % | same |" in markdown
    with pytest.raises(ReportError, match="threshold"):
        compare_results(a_path, b_path, threshold=-0.1)


# ---------------------------------------------------------------- GPU table and the bound


@pytest.mark.parametrize(
    "name, expected",
    [
        ("NVIDIA H100 80GB HBM3", gpu_specs.H100_SXM),
        ("NVIDIA H100 PCIe", gpu_specs.H100_PCIE),
        ("NVIDIA H200", gpu_specs.H200_SXM),
        ("NVIDIA H200 NVL", gpu_specs.H200_NVL),
        ("NVIDIA A100-SXM4-80GB", gpu_specs.A100_SXM_80GB),
        ("NVIDIA A100-SXM4-40GB", gpu_specs.A100_SXM_40GB),
        ("NVIDIA A100 80GB PCIe", gpu_specs.A100_PCIE_80GB),
        ("NVIDIA L40S", gpu_specs.L40S),
        ("NVIDIA GeForce RTX 4090", gpu_specs.RTX_4090),
        ("NVIDIA H100 NVL", None),
        ("NVIDIA GH200 480GB", None),
        ("NVIDIA GeForce RTX 4090 Laptop GPU", None),
        ("NVIDIA GeForce RTX 3090", None),
        ("cpu", None),
    ],
)
def test_lookup_gpu(name, expected):
    assert lookup_gpu(name) is expected


def test_gpu_table_anchor_values():
    assert gpu_specs.H100_SXM.fp16_tensor_tflops == pytest.approx(989.4)
    assert gpu_specs.H100_SXM.memory_bandwidth_tbs == 3.35
    assert gpu_specs.H200_SXM.memory_bandwidth_tbs == 4.8
    assert gpu_specs.A100_SXM_80GB.fp16_tensor_tflops == 312.0
    assert gpu_specs.H100_SXM.ridge_flop_per_byte == pytest.approx(295.3, abs=0.1)  # perf_anchors §6: ≈295
    with pytest.raises(TypeError, match="device_name"):
        lookup_gpu(None)


def _cost(gflop: float, weight_bytes: int, io_bytes: int = 0) -> NetworkCost:
    return NetworkCost("unet", Profile(), "fp16", gflop, weight_bytes, None, io_bytes, "hand")


def test_lower_bound_hand_computed():
    toy = GpuSpec("toy", fp16_tensor_tflops=100.0, fp32_tflops=10.0, memory_bandwidth_tbs=1.0, source="test")
    # compute: 200e9 / 100e12 s = 2 ms; memory: (1e9 + 0.5e9) / 1e12 s = 1.5 ms -> 2 ms
    assert lower_bound_ms(_cost(200.0, 10**9, 5 * 10**8), toy) == pytest.approx(2.0, rel=1e-12)
    # compute: 1 ms; memory: 5e9 / 1e12 s = 5 ms -> bandwidth-bound
    assert lower_bound_ms(_cost(100.0, 5 * 10**9), toy) == pytest.approx(5.0, rel=1e-12)
    # perf_anchors §6: UNet step 1.725 TFLOP on H100 SXM -> 1.74 ms (compute-bound)
    assert lower_bound_ms(_cost(1724.6, 2_457_323_536), gpu_specs.H100_SXM) == pytest.approx(1.743, abs=1e-3)


# ---------------------------------------------------------------- FLOP counting


def test_count_forward_linear_and_conv_exact():
    with torch.device("meta"):
        linear = torch.nn.Linear(16, 32)
        conv = torch.nn.Conv2d(3, 8, kernel_size=3)
        x, image = torch.empty(4, 16), torch.empty(1, 3, 10, 10)
    count = count_forward(linear, lambda: linear(x))
    assert count.flop == 2 * 4 * 16 * 32  # 2 * batch * in * out (the bias add is not a MAC)
    assert count.weight_bytes == (16 * 32 + 32) * 4 and count.param_count == 16 * 32 + 32
    assert count.activation_bytes == 4 * 32 * 4  # one fp32 (4, 32) output
    count = count_forward(conv, lambda: conv(image))
    assert count.flop == 2 * (8 * 8) * 8 * (3 * 3 * 3)  # 2 * output pixels * c_out * (c_in * k * k)
    assert count.weight_bytes == (8 * 3 * 9 + 8) * 4


def test_count_forward_charges_only_what_runs():
    with torch.device("meta"):
        table = torch.nn.Embedding(1000, 8)
        used, unused = torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
        model = torch.nn.ModuleDict({"table": table, "used": used, "unused": unused})
        ids = torch.zeros(5, dtype=torch.long)
    count = count_forward(model, lambda: model["used"](model["table"](ids)))
    # 5 gathered rows of the table, the used linear whole, the unused one not at all
    assert count.weight_bytes == (5 * 8 + 8 * 8) * 4
    assert count.flop == 2 * 5 * 8 * 8


def test_network_cost_rejects_bad_arguments():
    with pytest.raises(CostError, match="network: expected one of"):
        network_cost("vae")
    with pytest.raises(CostError, match="precision: expected one of"):
        network_cost("unet", precision="int8")


# ---------------------------------------------------------------- full-size networks (meta device)


@pytest.fixture(scope="module")
def full_size():
    return pytest.importorskip("kandinsky_trt.export.full_size")


# (network, profile, expected GFLOP from kandinsky_map.md §3.6, expected weight bytes at fp16)
FULL_SIZE = [
    ("unet", Profile(), 1725.0, 2 * 1_228_661_768),
    ("unet", Profile(height=768, width=768), 4002.0, 2 * 1_228_661_768),
    ("movq_decoder", Profile(), 2000.0, 2 * (40_369_155 + 20)),  # decoder + post_quant_conv, no codebook
    ("movq_encoder", Profile(), 982.0, 2 * (27_397_764 + 20)),  # encoder + quant_conv
    # clip_mean/clip_std (2 x 768) belong to post-processing, shipped as constants, not the forward
    ("prior", Profile(), 329.0, 2 * (1_022_030_080 - 2 * 768)),
    ("image_encoder", Profile(), 162.0, None),
    ("prior_text_encoder", Profile(), 26.6, None),
]


@pytest.mark.parametrize("network, profile, gflop, weight_bytes", FULL_SIZE)
def test_full_size_flops_match_reference(full_size, network, profile, gflop, weight_bytes):
    cost = network_cost(network, profile, "fp16")
    # the reference values are rounded to 3-4 significant digits: 0.1 % covers the rounding
    assert cost.gflop == pytest.approx(gflop, rel=1e-3)
    if weight_bytes is not None:
        assert cost.weight_bytes == weight_bytes
    assert cost.method == "flop_counter_meta"
    assert cost.activation_bytes_estimate > 0


def test_full_size_unet_bound_on_h100(full_size):
    cost = network_cost("unet", Profile(), "fp16")
    assert lower_bound_ms(cost, gpu_specs.H100_SXM) == pytest.approx(1.74, abs=0.01)  # perf_anchors §0


def test_full_size_movq_decoder_fp32_weights(full_size):
    cost = network_cost("movq_decoder", Profile(), "fp32")
    assert cost.weight_bytes == 4 * (40_369_155 + 20)


def test_full_size_text_encoder_matches_analytic_count(full_size):
    """MultilingualCLIP cannot run whole on meta (``.item()`` in XLM-R mask creation), so it is
    counted without the mask; the count must equal the analytic XLM-R-large formula exactly."""
    cost = network_cost("text_encoder", Profile(), "fp16")
    b2, seq, hidden, ffn, layers, proj = 2, 77, 1024, 4096, 24, 768
    tokens = b2 * seq
    linear = 2 * tokens * layers * (4 * hidden * hidden + 2 * hidden * ffn)  # qkvo + FFN
    attention = layers * 2 * (2 * b2 * seq * seq * hidden)  # QK^T and AV
    pooler_and_head = 2 * b2 * hidden * hidden + 2 * b2 * hidden * proj
    assert cost.gflop * 1e9 == pytest.approx(linear + attention + pooler_and_head, rel=1e-9)
    assert cost.method.startswith("flop_counter_meta_without_attention_mask")
