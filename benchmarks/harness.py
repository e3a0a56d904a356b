"""The timing harness behind ``kandinsky-trt bench``: backends side by side, in one run.

Per stage (each network of the manifest, step graphs included) every backend runs the same inputs:
``warmup`` untimed calls each, then ``repeat`` rounds in which the backends take turns (torch, ort,
torch, ort, ...: ``rounds.py``), so a change of machine load hits them alike; medians, spread, the
ratio of every round and peak host RSS go into a result file (``report.py``). End to end, our
pipelines on each runtime backend run against diffusers' own pipelines (the ``torch`` baseline) with
the same prompts and step counts, in alternating rounds too.

The physical lower bound (``flops.py``) is attached to a stage only when the device is a GPU with a
known spec; on a CPU the bounds for a reference GPU are stored beside the figures, not as fractions.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kandinsky_trt.benchmarks.report import BenchResult, StageMeasurement, new_result, stage_result, with_baseline_ratios
from kandinsky_trt.benchmarks.rounds import interleave
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.base import sample_inputs
from kandinsky_trt.runtime.backends.registry import check_backend
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.spec import KANDINSKY_2_1_DIMS, WEIGHT_FREE

log = logging.getLogger(__name__)
PIPELINES = ("text2img", "img2img", "inpaint")


@dataclass(frozen=True)
class BenchConfig:
    artifacts: Path
    backends: tuple[str, ...] = ("torch", "ort")
    stages: tuple[str, ...] | None = None  # networks to time; None: every network of the manifest
    pipelines: tuple[str, ...] = ()  # end-to-end runs: text2img, img2img, inpaint
    repeat: int = 5
    warmup: int = 1
    steps: int = 10  # decoder steps end to end
    prior_steps: int = 5
    device: str = "cpu"
    reference_gpu: str = "H100 SXM"


def _measured(stage: str, calls: dict[str, Callable[[], object]], config: BenchConfig):
    """Time ``calls`` (backend -> call) in alternating rounds; one measurement per backend."""
    timed = interleave(calls, config.repeat, config.warmup)
    for backend, t in timed.items():
        log.info("%-20s %-5s median %.2f ms", stage, backend, float(np.median(t.samples_ms)))
        yield StageMeasurement(stage, backend, t.samples_ms, t.peak_host_rss_mb)


def _stage_measurements(config: BenchConfig, manifest: mf.Manifest, components: dict[str, Components]):
    names = config.stages or tuple(manifest.networks)
    for name in names:
        feeds = sample_inputs(manifest.network(name).resolved())
        sessions = {backend: comp.session(name) for backend, comp in components.items()}
        yield from _measured(name, {b: (lambda s=s: s.run(feeds)) for b, s in sessions.items()}, config)


def _pipeline_call(kind: str, pipe_factory: Callable[[str], Callable], config: BenchConfig, size: tuple[int, int]):
    from PIL import Image

    height, width = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = np.zeros((height, width), np.float32)
    mask[: height // 2] = 1
    common = dict(num_inference_steps=config.steps, prior_num_inference_steps=config.prior_steps, height=height,
                  width=width, output_type="np")
    pipe = pipe_factory(kind)
    if kind == "text2img":
        return lambda: pipe("a red cat on a chair", **common)
    if kind == "img2img":
        return lambda: pipe("a red cat on a chair", image, strength=0.5, **common)
    return lambda: pipe("a red cat on a chair", image, mask, **common)


def _ours(components: Components) -> Callable[[str], Callable]:
    from kandinsky_trt.runtime.pipelines import combined as cp

    classes = {"text2img": cp.KandinskyCombinedPipeline, "img2img": cp.KandinskyImg2ImgCombinedPipeline,
               "inpaint": cp.KandinskyInpaintCombinedPipeline}
    return lambda kind: classes[kind](components=components)


def _diffusers(manifest: mf.Manifest, device: str) -> Callable[[str], Callable]:
    """diffusers' own combined pipelines, assembled from the checkpoints the artifacts came from."""
    import diffusers

    from kandinsky_trt.runtime.cli.console import quiet_libraries

    quiet_libraries()  # from the command line: no loading bars (a no-op for a library user)

    def factory(kind: str):
        prior = diffusers.KandinskyPriorPipeline.from_pretrained(manifest.checkpoints["prior"])
        decoder_dir = manifest.checkpoints["inpaint" if kind == "inpaint" else "decoder"]
        decoder = diffusers.KandinskyPipeline.from_pretrained(decoder_dir)
        cls = {"text2img": diffusers.KandinskyCombinedPipeline, "img2img": diffusers.KandinskyImg2ImgCombinedPipeline,
               "inpaint": diffusers.KandinskyInpaintCombinedPipeline}[kind]
        parts = {**decoder.components, **{f"prior_{k}": v for k, v in prior.components.items()}}
        pipe = cls(**parts).to(device)
        pipe.set_progress_bar_config(disable=True)  # a bar per timed call is noise (and costs time)
        return pipe

    return factory


def _pipeline_measurements(config: BenchConfig, manifest: mf.Manifest, components: dict[str, Components]):
    size = (manifest.profile.height, manifest.profile.width)
    for kind in config.pipelines:
        factories = {b: _diffusers(manifest, config.device) if b == "torch" else _ours(components[b])
                     for b in config.backends}
        calls = {b: _pipeline_call(kind, factory, config, size) for b, factory in factories.items()}
        yield from _measured(f"e2e:{kind}", calls, config)


def reference_bounds(names, profile, precision: str, gpu_name: str = "H100 SXM") -> dict:
    """Floors on a named GPU for full-size networks, stored beside figures measured elsewhere."""
    from kandinsky_trt.benchmarks.flops import lower_bound_ms, network_cost
    from kandinsky_trt.benchmarks.gpu_specs import GPU_SPECS

    gpu = next(g for g in GPU_SPECS if g.name == gpu_name)
    bounds = {n: lower_bound_ms(network_cost(n, profile, precision), gpu) for n in names if n not in WEIGHT_FREE}
    return {"reference_gpu": gpu.name, "lower_bound_ms": bounds}


# End-to-end runs and the networks each needs beyond the text-to-image set.
_PIPELINE_NEEDS = {"text2img": (), "img2img": ("movq_encoder",), "inpaint": ("unet_inpaint", "movq_encoder")}


def check_config(config: BenchConfig, manifest: mf.Manifest) -> None:
    """Refuse what would fail midway, before anything is loaded or timed."""
    from kandinsky_trt.runtime.pipelines import inputs

    for name, value in (("--repeat", config.repeat), ("--steps", config.steps), ("--prior-steps", config.prior_steps)):
        inputs.check_positive_int(value, name)
    if isinstance(config.warmup, bool) or not isinstance(config.warmup, int) or config.warmup < 0:
        raise PipelineInputError(f"--warmup: expected an integer >= 0, found {config.warmup!r}")
    for backend in config.backends:
        check_backend(backend, "--backends")
    unknown = [s for s in config.stages or () if s not in manifest.networks]
    if unknown:
        raise PipelineInputError(f"--stages: expected networks of {config.artifacts} "
                                 f"({', '.join(manifest.networks)}), found {', '.join(unknown)}")
    for kind in config.pipelines:
        if kind not in _PIPELINE_NEEDS:
            raise PipelineInputError(f"--pipelines: expected names from {PIPELINES}, found {kind!r}")
        missing = [n for n in _PIPELINE_NEEDS[kind] if n not in manifest.networks]
        if missing:
            hint = " (export with --inpaint DIR)" if "unet_inpaint" in missing else ""
            raise PipelineInputError(f"--pipelines {kind}: expected artifacts with {', '.join(missing)}{hint}, "
                                     f"found none in {config.artifacts}")


def run_benchmark(config: BenchConfig) -> BenchResult:
    manifest = mf.load_manifest(config.artifacts)
    check_config(config, manifest)
    # "torch" stages run the diffusers modules through the torch backend; "torch" end to end runs
    # diffusers' pipelines themselves (nothing of ours in the loop).
    components = {b: Components(config.artifacts, b, config.device) for b in config.backends}
    try:
        stages = [] if config.stages == () else list(_stage_measurements(config, manifest, components))
        stages += list(_pipeline_measurements(config, manifest, components))
    finally:
        for comp in components.values():
            comp.close()
    rows = with_baseline_ratios([stage_result(m) for m in stages], interleaved=True)
    result = new_result(manifest.profile.to_dict(), manifest.precision, rows, device_name=config.device)
    names = [n for n in dict.fromkeys(s.stage for s in rows) if n in manifest.networks]
    full_size = manifest.model_dims == KANDINSKY_2_1_DIMS  # tiny checkpoints have no meaningful floor
    bounds = reference_bounds(names, manifest.profile, manifest.precision, config.reference_gpu) if full_size else {}
    return BenchResult(**{**result.__dict__, "device": {**result.device, **bounds}})
