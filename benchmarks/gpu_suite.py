"""The GPU suite: one driver over the project's own export, benchmark harness and GPU tests.

    python -m kandinsky_trt.benchmarks.gpu_suite --out OUT [--dry-run] [--steps 50 ...]
    bash benchmarks/gpu_suite.sh WHEEL_DIR OUT [options]    (the GPU machine: installs wheels first)

1. ``pytest -m "gpu or tensorrt"`` (first: cheap, and the first thing to break).
2. The tiny checkpoint with its text-to-image components replaced by the full-size networks (real
   configs, random weights; left tiny with ``--dry-run``), exported by ``export_artifacts``.
3. ``run_benchmark`` (every stage, text2img end to end) per backend that can run here: torch, ort
   (CUDA EP), trt (after ``build_engines``); the others say why. One merged result file.
4. For ort and trt, CUDA-graph replay == eager: both loops through ``Components`` with
   ``cuda_graph`` True (first call captures, second replays) and False; max |diff| of the latents.

Each step is written to ``OUT/gpu_suite.{json,md}`` as it starts and ends (a timeout keeps what
finished), the benchmark to ``OUT/gpu_suite_bench.{json,md,png}``. Exit status 0; 1 when a step
failed (the others still ran); 2 without a CUDA device. ``--dry-run`` walks the same code on the CPU
execution provider (where both loops are the host loop), in CI: ``tests/test_gpu_suite_dry_run.py``.

Unverified on a GPU: no GPU was lent when this driver was written; only its dry run has run.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from kandinsky_trt.runtime.cli.output_paths import check_writable_directory
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.integrity import write_bytes_atomic

log = logging.getLogger("kandinsky_trt.benchmarks.gpu_suite")

TEXT2IMG = ("prior_text_encoder", "prior", "text_encoder", "unet", "movq_decoder")
FULL_SIZE = (*TEXT2IMG, "image_encoder")  # export loads the image encoder too (the zero-image constant)
BACKENDS = ("torch", "ort", "trt")


@dataclass
class Record:
    """What every step found; rewritten to ``out`` after each step."""

    out: Path
    data: dict = field(default_factory=lambda: {"steps": {}, "errors": {}})

    @contextmanager
    def step(self, name: str):
        entry, start = self.data["steps"].setdefault(name, {}), time.perf_counter()
        self.save(running=name)  # a run killed during this step says so
        try:
            yield entry
        except Exception as err:  # a failed step must not lose the others' results
            log.exception("%s failed", name)
            self.data["errors"][name] = f"{type(err).__name__}: {err}"[:2000]
        finally:
            entry["seconds"] = round(time.perf_counter() - start, 1)
            self.save(running=None)

    def save(self, running: str | None) -> None:
        self.data["running"] = running
        write_bytes_atomic(self.out / "gpu_suite.json", json.dumps(self.data, indent=2, default=str).encode())
        write_bytes_atomic(self.out / "gpu_suite.md", _markdown(self.data).encode())


def _markdown(data: dict) -> str:
    m = data["machine"]
    lines = ["# GPU suite", "", f"Device: {data['config']['device_name']}; machine: {m['hostname']} ({m['cpu_model']}, "
             f"{m['cores']} cores, {m['ram_gb']} GB RAM).", ""]
    for name, entry in data["steps"].items():
        status = "running" if name == data["running"] else "ok"
        status = f"FAILED: {data['errors'][name]}" if name in data["errors"] else status
        lines += [f"## {name}: {status}", "", "```json", json.dumps(entry, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def run_gpu_tests(config: argparse.Namespace, entry: dict) -> None:
    xml = config.out.resolve() / "pytest_gpu.xml"
    # A test module that cannot import here (a missing extra) must not stop the GPU tests of the others.
    command = [sys.executable, "-m", "pytest", "-m", "gpu or tensorrt", "-q", "-p", "no:cacheprovider",
               "--continue-on-collection-errors", f"--junitxml={xml}", *config.tests]
    done = subprocess.run(command, cwd=config.repo, capture_output=True, text=True)
    entry.update(command=command[1:], returncode=done.returncode, output_tail=done.stdout[-3000:])
    if xml.is_file():
        suite = next(ElementTree.parse(xml).iter("testsuite"))
        entry["counts"] = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    if done.returncode != 0:
        raise RuntimeError(f"pytest exited {done.returncode}: {done.stderr[-500:]}")


def export(config: argparse.Namespace, entry: dict) -> Path:
    """The checkpoints (one seed, the same files each run: the export's reuse keys hold) and their artifacts."""
    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint
    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.runtime.contract.spec import Profile

    tiny = write_tiny_checkpoint(config.work / "checkpoint")
    dirs = CheckpointDirs(tiny.prior, tiny.decoder)  # text-to-image only: no inpaint checkpoint
    for network in () if config.dry_run else FULL_SIZE:  # the tiny component becomes the full-size one
        folder = dirs.component(network)
        for old in (*folder.glob("*.safetensors"), *folder.glob("*.safetensors.index.json")):
            old.unlink()
        build_full_size_model(network).save_pretrained(folder, safe_serialization=True)
    profile, out = Profile(1, 64, 64) if config.dry_run else Profile(1, 512, 512), config.work / "artifacts"
    report = export_artifacts(ExportConfig(dirs, out, (profile,), config.precision, config.exporter, networks=TEXT2IMG))
    entry.update(profile=profile.name, precision=config.precision, exported=report.exported, reused=report.reused)
    return out


def why_not(backend: str, device: str) -> str | None:
    """Why ``backend`` cannot run on ``device`` here; None when it can."""
    from importlib import import_module

    from kandinsky_trt.runtime.backends.registry import backend_names

    if backend not in backend_names():
        return f"not registered (found {backend_names()}; is kandinsky-trt installed?)"
    try:  # torch's baseline end to end is diffusers' pipelines
        module = import_module({"torch": "diffusers", "ort": "onnxruntime", "trt": "tensorrt"}[backend])
    except ImportError as err:
        return f"does not import: {err}"
    if backend == "ort" and device == "cuda" and "CUDAExecutionProvider" not in module.get_available_providers():
        return f"onnxruntime {module.__version__} has no CUDAExecutionProvider (carry onnxruntime-gpu)"
    return "TensorRT runs on a CUDA device only" if backend == "trt" and device == "cpu" else None


def benchmark(config: argparse.Namespace, artifacts: Path, backend: str, results: list) -> dict:
    """``run_benchmark`` on one backend; rewrites the merged result file with it added."""
    from kandinsky_trt.benchmarks.harness import BenchConfig, run_benchmark
    from kandinsky_trt.benchmarks.report import with_baseline_ratios, write_result

    bench = BenchConfig(artifacts, (backend,), None, ("text2img",), config.repeat, config.warmup, config.steps,
                        config.prior_steps, config.device)
    results.append(run_benchmark(bench))
    stages = with_baseline_ratios([s for r in results for s in r.stages])
    merged = replace(results[0], device={**results[0].device, "name": config.device_name}, stages=stages,
                     backends=tuple(dict.fromkeys(s.backend for s in stages)))
    files = write_result(merged, config.out, stem="gpu_suite_bench")
    return {"median_ms": {s.stage: s.median_ms for s in results[-1].stages}, "files": [str(f) for f in files if f]}


def _loop_inputs(manifest, spec, table, seed: int = 0):
    """The spec's shapes: ``sample_inputs`` as conditioning, N(0, 1) latents and noise, guidance 4."""
    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.runtime.loops.template import LoopInputs

    feeds = sample_inputs(manifest.network(spec.network).resolved(), seed)
    latents, rng = manifest.network(spec.step).resolved().tensor(spec.io.latents), np.random.default_rng(seed)
    noise_shape = (int(np.sum(table.stochastic)), *latents.shape)
    return LoopInputs(rng.standard_normal(latents.shape).astype(latents.dtype),
                      {k: v for k, v in feeds.items() if k not in spec.network_fed}, {},
                      rng.standard_normal(noise_shape).astype(latents.dtype), 4.0)


def replay_vs_eager(config: argparse.Namespace, artifacts: Path, backend: str) -> dict:
    """Per loop: max |diff| of the final latents, with graphs (capture, then replay) against eager."""
    from kandinsky_trt.runtime.contract.loop_specs import PRIOR_LOOP, UNET_LOOP
    from kandinsky_trt.runtime.pipelines.components import Components

    found = {}
    with Components(artifacts, backend, config.device, cuda_graph=True) as graphs, \
            Components(artifacts, backend, config.device, cuda_graph=False) as eager:
        for which, spec in (("prior", PRIOR_LOOP), ("decoder", UNET_LOOP)):
            table = eager.loaded.scheduler(which, config.check_steps)
            inputs = _loop_inputs(eager.manifest, spec, table)
            first, replay = (graphs.denoise(spec, table, inputs) for _ in range(2))
            reference = eager.denoise(spec, table, inputs)
            found[spec.network] = {"replay_vs_eager": float(np.abs(replay - reference).max()),
                                   "first_call_vs_eager": float(np.abs(first - reference).max()),
                                   "max_abs_latents": float(np.abs(reference).max())}
    return found


def _device_name(config: argparse.Namespace) -> str | None:
    """The device's name, its CUDA libraries loaded; None without a CUDA device."""
    import torch  # first: it loads the CUDA libraries the CUDA EP needs too

    if config.dry_run or not torch.cuda.is_available():
        return "cpu (dry run)" if config.dry_run else None
    try:  # onnxruntime-gpu >= 1.21: the nvidia-* wheels' CUDA libraries (without it torch's may do)
        __import__("onnxruntime").preload_dlls()
    except Exception as err:  # absent or failing: not fatal, the ort step says what is wrong
        log.info("onnxruntime.preload_dlls(): %s", err)
    return torch.cuda.get_device_name(0)


def run_suite(config: argparse.Namespace, record: Record) -> None:
    with record.step("pytest") as entry:
        run_gpu_tests(config, entry)
    artifacts = None
    with record.step("export") as entry:
        artifacts = export(config, entry)
    if artifacts is None:
        return
    with record.step("backends") as entry:
        entry.update({b: why_not(b, config.device) or "available" for b in BACKENDS})
    runnable = [b for b in BACKENDS if entry.get(b) == "available"]
    if "trt" in runnable:
        from kandinsky_trt.engine.builder import BuildConfig, build_engines

        with record.step("build:trt") as entry:
            entry["plans"] = [p.name for p in build_engines(BuildConfig(artifacts))]
        runnable = [b for b in runnable if b != "trt" or "build:trt" not in record.data["errors"]]
    results = []
    for backend in runnable:
        with record.step(f"bench:{backend}") as entry:
            entry.update(benchmark(config, artifacts, backend, results))
    for backend in (b for b in runnable if b in ("ort", "trt")):  # the backends whose loops capture graphs
        with record.step(f"replay_vs_eager:{backend}") as entry:
            entry.update(replay_vs_eager(config, artifacts, backend))


def _parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add = parser.add_argument
    add("--out", type=Path, required=True, help="result files and the log")
    add("--dry-run", action="store_true", help="the tiny checkpoint on the CPU execution provider")
    add("--work", type=Path, default=Path("/tmp/ktrt_gpu_suite"), help="checkpoints, artifacts (tens of GB)")
    add("--repo", type=Path, default=Path("."), help="the project's folder: pyproject.toml and tests")
    add("--tests", nargs="+", default=["tests"], help="pytest targets in --repo")
    add("--precision", choices=("fp16", "fp32"), default="fp16")
    add("--exporter", choices=("dynamo", "legacy"), default="dynamo")
    for name, default in (("repeat", 10), ("warmup", 3), ("steps", 50), ("prior-steps", 25), ("check-steps", 5)):
        add(f"--{name}", type=_at_least(0 if name == "warmup" else 1), default=default)  # steps: decoder, end to end
    config = parser.parse_args(argv)
    try:  # before hours of work: the folders must be creatable
        for name in ("out", "work"):
            check_writable_directory(getattr(config, name), f"--{name}")
    except PipelineInputError as err:
        parser.error(str(err))
    config.device = "cpu" if config.dry_run else "cuda"
    return config


def _at_least(minimum: int):
    """An argparse type: an integer >= ``minimum``."""
    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, found {text!r}")
        return int(text)
    return parse


def main(argv=None) -> int:
    from kandinsky_trt.benchmarks.environment import MachineInfo

    config = _parse(argv)
    config.out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(), logging.FileHandler(config.out / "gpu_suite.log", encoding="utf-8")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers)
    config.device_name = _device_name(config)
    if config.device_name is None:
        log.error("no CUDA device: torch.cuda.is_available() is False (on a CPU machine run with --dry-run)")
        return 2
    record = Record(config.out)
    record.data.update(config=vars(config), machine=asdict(MachineInfo.collect()))
    run_suite(config, record)
    log.info("wrote %s; %d failed step(s)", config.out / "gpu_suite.json", len(record.data["errors"]))
    return 1 if record.data["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
