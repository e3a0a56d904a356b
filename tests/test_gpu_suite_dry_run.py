"""The GPU suite's dry run (``benchmarks/gpu_suite.py --dry-run``): its whole code path on the CPU.

The tiny checkpoint through ``export_artifacts``, the benchmark harness on torch and ort, the
replay == eager check through ``Components`` and ``pytest -m "gpu or tensorrt"``, in a subprocess as
the GPU machine runs it; then the result files it leaves. Whatever would fail on the GPU for a
reason other than the GPU fails here first. Each step is on disk while it runs and after it fails;
bad arguments stop the suite before any work.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest

from kandinsky_trt.benchmarks.environment import MachineInfo
from kandinsky_trt.benchmarks.gpu_suite import TEXT2IMG, Record, main
from kandinsky_trt.benchmarks.report import load_result

REPO = Path(__file__).resolve().parents[1]
STEPS = ["pytest", "export", "backends", "bench:torch", "bench:ort", "replay_vs_eager:ort"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> Path:
    """The result folder of one dry run (a minute on two cores), shared by the tests below."""
    tmp_path = tmp_path_factory.mktemp("gpu_suite")
    out, work = tmp_path / "out", tmp_path / "work"
    command = [sys.executable, "-m", "kandinsky_trt.benchmarks.gpu_suite", "--dry-run", "--out", out, "--work", work,
               "--repo", REPO, "--tests", "tests/test_cuda_graphs.py", "--precision", "fp32", "--exporter", "legacy",
               "--repeat", "1", "--warmup", "0", "--steps", "2", "--prior-steps", "2", "--check-steps", "3"]
    done = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_dry_run_walks_every_step_and_writes_its_records(dry_run):
    out = dry_run
    for name in ("gpu_suite.json", "gpu_suite.md", "gpu_suite.log", "gpu_suite_bench.json", "gpu_suite_bench.md",
                 "pytest_gpu.xml"):
        assert (out / name).is_file(), name
    record = json.loads((out / "gpu_suite.json").read_text())
    assert record["errors"] == {} and record["running"] is None
    assert list(record["steps"]) == STEPS
    steps = record["steps"]
    assert steps["export"]["exported"] == list(TEXT2IMG) and steps["export"]["profile"] == "b1_64x64_cfg"
    assert steps["backends"]["torch"] == steps["backends"]["ort"] == "available"
    trt_absent = importlib.util.find_spec("tensorrt") is None
    assert steps["backends"]["trt"].startswith("does not import" if trt_absent else "TensorRT runs on a CUDA")
    assert steps["pytest"]["returncode"] == 0 and steps["pytest"]["counts"]["tests"] >= 1
    assert steps["pytest"]["counts"]["failures"] == steps["pytest"]["counts"]["errors"] == 0
    for network in ("prior", "unet"):  # on the CPU both runs are the host loop: identical, bit for bit
        check = steps["replay_vs_eager:ort"][network]
        assert check["replay_vs_eager"] == 0.0 == check["first_call_vs_eager"] and check["max_abs_latents"] > 0
    markdown = (out / "gpu_suite.md").read_text()
    assert all(f"## {name}: ok" in markdown for name in STEPS)


def test_dry_run_merges_both_backends_into_one_result_file(dry_run):
    result = load_result(dry_run / "gpu_suite_bench.json")
    assert result.backends == ("torch", "ort") and result.device["name"] == "cpu (dry run)"
    stages = (*TEXT2IMG, "prior_step", "unet_step", "prior_embeds", "e2e:text2img")
    assert sorted((s.stage, s.backend) for s in result.stages) == sorted((n, b) for n in stages for b in result.backends)
    assert all(s.median_ms > 0 and len(s.samples_ms) == 1 for s in result.stages)
    assert all(s.ratio_to_baseline is not None for s in result.stages)  # torch is every row's baseline


def test_a_step_is_on_disk_while_it_runs_and_a_failure_keeps_the_others(tmp_path):
    record = Record(tmp_path)
    record.data.update(config={"device_name": "cpu (dry run)"}, machine=asdict(MachineInfo.collect()))
    with record.step("first") as entry:
        entry["value"] = 1
    with record.step("second"):
        during = json.loads((tmp_path / "gpu_suite.json").read_text())
        raise RuntimeError("lost the device")
    after = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert during["running"] == "second" and during["steps"]["first"]["value"] == 1 and during["errors"] == {}
    assert after["running"] is None and after["errors"] == {"second": "RuntimeError: lost the device"}
    assert after["steps"]["first"]["value"] == 1 and "seconds" in after["steps"]["second"]
    markdown = (tmp_path / "gpu_suite.md").read_text()
    assert "## first: ok" in markdown and "## second: FAILED: RuntimeError: lost the device" in markdown


@pytest.mark.parametrize("args, message", [
    (["--repeat", "0"], "argument --repeat: expected an integer >= 1, found '0'"),
    (["--warmup", "x"], "argument --warmup: expected an integer >= 0, found 'x'"),
    (["--work", "{file}/work"], "--work: expected a directory for {file}/work, found the file {file} on its path"),
])
def test_bad_arguments_stop_before_any_work(tmp_path, capsys, args, message):
    file = tmp_path / "a-file"
    file.write_text("")
    with pytest.raises(SystemExit) as stopped:
        main(["--out", str(tmp_path / "out"), "--dry-run", *(a.format(file=file) for a in args)])
    assert stopped.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f": error: {message.format(file=file)}")
    assert not (tmp_path / "out").exists()
