"""The GPU suite: full-size fp16 Kandinsky 2.1 networks, torch vs ONNX Runtime CUDA with and without CUDA graphs.

    python -m kandinsky_trt.benchmarks.gpu_suite --out OUT_DIR [--decoder-steps 100 ...]
    (or ``bash benchmarks/gpu_suite.sh WHEEL_DIR OUT_DIR``, which installs carried wheels first)

1. Builds the real networks with random weights (``export/full_size.py``) and exports them in fp16
   at 512x512, batch 1, with guidance, plus the step graphs, into ``--work`` with a manifest
   (reused when the hash of what produced them matches).
2. Times, per stage (each network and step graph): ``torch`` (the diffusers modules in fp16 on
   CUDA, eager), ``ort-cuda`` (CUDA EP, buffers bound once, no graphs) and ``ort-cuda-graph`` (the
   same with ONNX Runtime's CUDA graphs); then both denoising loops and a text-to-image run
   end to end (tokens -> image tensor; no tokenizer, no PIL). Median/p10/p90 over ``--repeat``
   calls after ``--warmup``; torch calls are bracketed by ``torch.cuda.synchronize()``, ORT runs
   return after their stream finished.
3. Checks that CUDA-graph replay equals eager: max |diff| of the final latents of a
   ``--check-steps`` decoder loop (and the prior loop), first call (captures) and second (replays).

Device memory: torch rows give ``torch.cuda.max_memory_allocated`` of the stage; ORT rows give
the growth of the device memory in use (nvidia-smi, else cudaMemGetInfo) from before the
session(s) of the stage were loaded to after it ran — what ONNX Runtime holds, not a peak.

Writes ``OUT/<stem>.{json,md,png}`` (``report.write_result``), ``OUT/gpu_suite_checks.json`` and
``OUT/gpu_suite.log``. Exit status: 0, 1 when a stage failed (the others are still written),
2 when onnxruntime has no CUDA execution provider.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import logging
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kandinsky_trt.runtime.contract.spec import PRIOR_LOOP, UNET_LOOP

log = logging.getLogger("kandinsky_trt.benchmarks.gpu_suite")

NETWORKS = ("prior_text_encoder", "prior", "text_encoder", "unet", "movq_decoder")
STEPS = ("prior_step", "unet_step")
LOOPS = {"prior": PRIOR_LOOP, "decoder": UNET_LOOP}
ORT_BACKENDS = {"ort-cuda": False, "ort-cuda-graph": True}
MIN_GRAPH_WARMUP = 3  # captured within the first Run of a graph id (recent ORT) or by the third


@dataclass(frozen=True)
class SuiteConfig:
    out: Path
    work: Path = Path("/tmp/ktrt_gpu_suite")
    networks: tuple[str, ...] = NETWORKS
    repeat: int = 10
    warmup: int = 3
    prior_steps: int = 25
    decoder_steps: int = 100
    loop_repeat: int = 3
    check_steps: int = 5
    exporter: str = "dynamo"
    skip_torch: bool = False


@dataclass
class Record:
    """Everything measured, and what went wrong, in one run."""

    stages: list = field(default_factory=list)  # StageMeasurement
    checks: dict = field(default_factory=dict)  # loop -> backend -> final latents of two check runs
    errors: dict = field(default_factory=dict)  # "stage/backend" -> message
    notes: dict = field(default_factory=dict)

    @contextmanager
    def guard(self, what: str):
        """Log and record a failed stage, then carry on with the next one."""
        try:
            yield
        except Exception as err:  # a failed stage must not lose the others' figures
            log.exception("%s failed", what)
            self.errors[what] = f"{type(err).__name__}: {err}"[:2000]


# ---------------------------------------------------------------- device facts


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def device_name() -> str:
    name = _nvidia_smi("name")
    if name:
        return name
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown CUDA device"


def device_used_mb() -> float | None:
    used = _nvidia_smi("memory.used")
    if used:
        return float(used)
    import torch

    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        return (total - free) / 2**20
    return None


def _delta(before: float | None) -> float | None:
    after = device_used_mb()
    return None if before is None or after is None else after - before


# ---------------------------------------------------------------- export


def _export_key(network: str, config: SuiteConfig) -> str:
    import torch

    from kandinsky_trt.export import full_size, onnx_export, precision, step_graphs
    from kandinsky_trt.export import torch_modules
    from kandinsky_trt.runtime.contract.manifest import sha256_file

    code = [sha256_file(Path(m.__file__)) for m in (full_size, onnx_export, precision, step_graphs, torch_modules)]
    payload = [network, config.exporter, torch.__version__, *code]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def _reusable(previous, name: str, key: str):
    from kandinsky_trt.runtime.contract.manifest import sha256_file

    entry = previous.networks.get(name) if previous else None
    if entry is None or entry.export_key != key or not previous.path(entry.onnx).is_file():
        return None
    return entry if sha256_file(previous.path(entry.onnx)) == entry.onnx_sha256 else None


def _export_one(name: str, config: SuiteConfig, profile, key: str):
    import torch

    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.export.onnx_export import ExportRequest, export_network
    from kandinsky_trt.export.precision import policy_for
    from kandinsky_trt.runtime.contract import manifest as mf
    from kandinsky_trt.runtime.contract.spec import KANDINSKY_2_1_DIMS, resolve

    start = time.perf_counter()
    policy = policy_for(name, "fp16")
    model = build_full_size_model(name, dtype=torch.float32)  # export casts to fp16 with the fp32 islands
    request = ExportRequest.for_profiles(name, (profile,), KANDINSKY_2_1_DIMS, policy, config.work, config.exporter)
    graph = request.graph
    files = export_network(model, request)
    del model
    gc.collect()
    log.info("exported %s in %.0f s", name, time.perf_counter() - start)
    return mf.NetworkEntry(name, files[0].name, mf.sha256_file(files[0]), "fp16", graph.inputs, graph.outputs,
                           (resolve(name, profile),), tuple(f.name for f in files[1:]), policy.islands, key)


def export_full_size(config: SuiteConfig):
    """The fp16 artifacts of ``config.networks`` + step graphs in ``config.work``; returns the manifest."""
    from kandinsky_trt.export.checkpoints import scheduler_configs
    from kandinsky_trt.export.step_graphs import write_step_graph
    from kandinsky_trt.runtime.contract import manifest as mf
    from kandinsky_trt.runtime.contract.integrity import file_record
    from kandinsky_trt.runtime.contract.spec import KANDINSKY_2_1_DIMS, Profile, resolve, resolve_graph

    config.work.mkdir(parents=True, exist_ok=True)
    profile = Profile(1, 512, 512, True)
    try:
        previous = mf.load_manifest(config.work)
    except mf.ManifestError:
        previous = None
    entries = {}
    for name in config.networks:
        key = _export_key(name, config)
        entries[name] = _reusable(previous, name, key) or _export_one(name, config, profile, key)
    for name in STEPS:
        path = write_step_graph(name, profile.cfg, KANDINSKY_2_1_DIMS, config.work / f"{name}.onnx")
        graph = resolve_graph(name)
        entries[name] = mf.NetworkEntry(name, path.name, mf.sha256_file(path), "fp32", graph.inputs, graph.outputs,
                                        (resolve(name, profile),))
    schedulers = {k: {"config": {"_class_name": cls, **scheduler_configs()[src]}, "tables": {}}
                  for k, cls, src in (("prior", "UnCLIPScheduler", "prior"), ("decoder", "DDIMScheduler", "ddim"))}
    files = {n: file_record(config.work / n) for e in entries.values() for n in (e.onnx, *e.external_data)}
    clip = {"size": 224, "mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]}
    manifest = mf.Manifest(config.work, (profile,), KANDINSKY_2_1_DIMS, "fp16", entries, {}, schedulers, {}, clip,
                           {"exporter": config.exporter, "random_weights": True}, {}, files)
    manifest.save()
    return manifest


def _loops(config: SuiteConfig) -> list[tuple[str, int]]:
    """The loops whose network is exported, with their step counts."""
    steps = {"prior": config.prior_steps, "decoder": config.decoder_steps}
    return [(loop, steps[loop]) for loop, names in LOOPS.items() if names.network in config.networks]


def _table(manifest, loop: str, steps: int):
    from kandinsky_trt.runtime.contract.schedulers import scheduler_table

    return scheduler_table(manifest.schedulers[loop]["config"], steps)


def _loop_inputs(manifest, loop: str, table, seed: int = 0):
    """Random conditioning of the spec's shapes (``sample_inputs``), N(0,1) latents and noise."""
    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.runtime.loops.template import LoopInputs

    names = LOOPS[loop]
    feeds = sample_inputs(manifest.network(names.network).resolved(), seed)
    conditioning = {k: v for k, v in feeds.items() if k not in (names.sample_input, "timestep")}
    rng = np.random.default_rng(seed)
    latents = rng.standard_normal(manifest.network(names.step).resolved().tensor("latents").shape).astype(np.float32)
    noise = rng.standard_normal((int(table.stochastic.sum()), *latents.shape)).astype(np.float32)
    return LoopInputs(latents, conditioning, {}, noise, 4.0)


# ---------------------------------------------------------------- ONNX Runtime


def _ort_bound_stage(backend, name: str):
    """A bound run of ``name`` with the harness's inputs uploaded once."""
    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.runtime.backends.ort_cuda import upload

    network = backend.load(name).network
    buffers = {t.name: backend.allocate(t) for t in network.inputs + network.outputs}
    for n, array in sample_inputs(network).items():
        upload(buffers[n], array, n)
    run = backend.bind(name, buffers)
    run.synchronize_inputs()
    return run


def _ort_loop(backend, loop: str):
    return backend.loop(LOOPS[loop])


def _check_runs(loop, table, inputs) -> list[np.ndarray]:
    """Final latents of two calls (with graphs: captures, then replays) and one eager call of the
    same bindings (``gpu_graph_id`` -1)."""
    runs = [loop(table, inputs) for _ in range(2)]
    loop.replay_graphs = False
    try:
        return runs + [loop(table, inputs)]
    finally:
        loop.replay_graphs = True


def _measure(record: Record, stage: str, backend: str, call, repeat: int, warmup: int, memory=None) -> None:
    from kandinsky_trt.benchmarks.harness import time_calls
    from kandinsky_trt.benchmarks.report import StageMeasurement

    samples, rss = time_calls(call, repeat, warmup)
    peak = memory() if memory is not None else None
    record.stages.append(StageMeasurement(stage, backend, tuple(samples), rss, peak))
    log.info("%-22s %-15s median %9.3f ms  device %s MB", stage, backend, float(np.median(samples)), peak)


def _with_fallback(backends: tuple, build, what: str, record: Record):
    """``build(backend)`` on the first backend that can; a fallback (no CUDA graphs) is noted."""
    from kandinsky_trt.runtime.backends.base import BackendError

    for index, backend in enumerate(backends):
        try:
            return build(backend)
        except BackendError as err:
            if index == len(backends) - 1:
                raise
            record.notes[what] = f"ran without CUDA graphs: {err}"[:1000]
    raise ValueError("backends: expected at least one backend, found none")


def run_ort(config: SuiteConfig, manifest, record: Record, label: str) -> None:
    """Stages, loops (and the graph-vs-eager check data) and end to end on one backend kind."""
    from kandinsky_trt.runtime.backends.ort_cuda import CudaGraphOptions, OrtCudaBackend

    graphs = ORT_BACKENDS[label]
    warmup = max(config.warmup, MIN_GRAPH_WARMUP) if graphs else config.warmup
    start_mb = device_used_mb()
    with ExitStack() as stack:
        backends = tuple(stack.enter_context(OrtCudaBackend(manifest, "cuda", CudaGraphOptions(enabled=g)))
                         for g in ((True, False) if graphs else (False,)))  # the eager one: e2e fallback only
        for name in (*config.networks, *STEPS):
            with record.guard(f"{name}/{label}"):
                before = device_used_mb()
                run = _ort_bound_stage(backends[0], name)
                _measure(record, name, label, run.enqueue, config.repeat, warmup, lambda: _delta(before))
        loops = {}
        for loop, steps in _loops(config):
            with record.guard(f"loop:{loop}/{label}"):
                loops[loop] = _ort_loop(backends[0], loop)
                check = _table(manifest, loop, config.check_steps)
                inputs = _loop_inputs(manifest, loop, check)
                record.checks.setdefault(loop, {})[label] = _check_runs(loops[loop], check, inputs)
                table = _table(manifest, loop, steps)
                inputs = _loop_inputs(manifest, loop, table)
                _measure(record, f"loop:{loop}", label, lambda: loops[loop](table, inputs),
                         config.loop_repeat, 1, lambda: _delta(start_mb))
        if set(NETWORKS) - set(config.networks):
            return  # end to end needs every network
        with record.guard(f"e2e:text2img/{label}"):
            e2e = OrtText2Image(lambda build, what: _with_fallback(backends, build, f"e2e {what}/{label}", record),
                                loops, manifest, config)
            _measure(record, "e2e:text2img", label, e2e, config.loop_repeat, 1, lambda: _delta(start_mb))
    gc.collect()


class OrtText2Image:
    """Tokens -> prior loop -> decoder loop -> MoVQ on bound ORT sessions (host glue in between).

    ``get(build, what)`` builds a binding or loop, falling back to a backend without CUDA graphs
    for networks that cannot be captured; ``loops`` are the already-built loops.
    """

    def __init__(self, get, loops: dict, manifest, config: SuiteConfig) -> None:
        stage = lambda name: get(lambda b: _ort_bound_stage(b, name), name)  # noqa: E731
        self.prior_text, self.text, self.movq = (stage(n) for n in ("prior_text_encoder", "text_encoder", "movq_decoder"))
        self.loops = {loop: loops.get(loop) or get(lambda b, loop=loop: _ort_loop(b, loop), f"loop:{loop}")
                      for loop in LOOPS}
        self.tables = {"prior": _table(manifest, "prior", config.prior_steps),
                       "decoder": _table(manifest, "decoder", config.decoder_steps)}
        self.inputs = {loop: _loop_inputs(manifest, loop, table) for loop, table in self.tables.items()}

    @staticmethod
    def _outputs(run) -> dict:
        run.enqueue()
        return {n: run.buffers[n].numpy().copy() for n in ("text_embeds", "last_hidden_state")}

    def __call__(self) -> np.ndarray:
        from kandinsky_trt.runtime.backends.ort_cuda import upload

        clip, prior_in = self._outputs(self.prior_text), self.inputs["prior"]
        prior_in.conditioning.update(proj_embedding=clip["text_embeds"], encoder_hidden_states=clip["last_hidden_state"])
        embeds = self.loops["prior"](self.tables["prior"], prior_in)
        text, unet_in = self._outputs(self.text), self.inputs["decoder"]
        unet_in.conditioning.update(encoder_hidden_states=text["last_hidden_state"], text_embeds=text["text_embeds"],
                                    image_embeds=np.concatenate([np.zeros_like(embeds), embeds]))
        latents = self.loops["decoder"](self.tables["decoder"], unet_in)
        upload(self.movq.buffers["latents"], latents, "latents")
        self.movq.synchronize_inputs()
        self.movq.enqueue()
        return self.movq.buffers["image"].numpy().copy()


def graph_check_summary(checks: dict) -> dict:
    """Max |diff| of the check loops' final latents: the graph session's first call (captures) and
    second (replays) against the same bindings run eagerly, and against the session without graphs."""
    summary = {}
    for loop, runs in checks.items():
        if "ort-cuda-graph" not in runs:
            continue
        first, replay, same_eager = runs["ort-cuda-graph"]
        diff = lambda a, b: float(np.abs(a - b).max())  # noqa: E731
        summary[loop] = {"replay_vs_eager_same_session": diff(replay, same_eager),
                         "first_call_vs_eager_same_session": diff(first, same_eager),
                         "max_abs_latents": float(np.abs(same_eager).max())}
        if "ort-cuda" in runs:
            summary[loop]["replay_vs_session_without_graphs"] = diff(replay, runs["ort-cuda"][0])
            summary[loop]["without_graphs_repeatable"] = bool(np.array_equal(runs["ort-cuda"][0], runs["ort-cuda"][1]))
    return summary


# ---------------------------------------------------------------- torch (the baseline)


def _torch_module(name: str):
    import torch

    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.export.torch_modules import WRAPPERS

    return WRAPPERS[name](build_full_size_model(name, device="cuda", dtype=torch.float16), torch.float16)


def _torch_feeds(resolved) -> dict:
    import torch

    from kandinsky_trt.runtime.backends.base import sample_inputs

    return {k: torch.from_numpy(v).to("cuda") for k, v in sample_inputs(resolved).items()}


def _synced(call):
    import torch

    def run():
        with torch.no_grad():
            out = call()
        torch.cuda.synchronize()
        return out

    return run


def _torch_peak_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20


def _free() -> None:
    import torch

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def torch_step(row, x, out, noise, guidance, x0_prev):
    """The step graph in torch (fp32), in the graph's operation order (``export/step_graphs.py``)."""
    import torch

    p, q, clip_min, clip_max, u, v, w, r, s, learned, log_min, log_max = row.unbind()
    channels = x.shape[1]
    uncond, cond = out.chunk(2)
    eps = uncond[:, :channels] + guidance * (cond[:, :channels] - uncond[:, :channels])
    std = s
    if out.shape[1] > channels:  # learned variance: cond half of the extra channels
        var = cond[:, channels:]
        std = s + learned * torch.exp(0.5 * (log_min + (var + 1) * 0.5 * (log_max - log_min)))
    x0 = torch.minimum(torch.maximum(p * x + q * eps, clip_min), clip_max)
    return u * x0 + v * x + w * eps + r * x0_prev + std * noise, x0


def torch_loop(module, loop: str, table, cond: dict, inputs):
    """The denoising loop with the torch module and :func:`torch_step` on ``cond``'s device."""
    import torch

    sample, device = LOOPS[loop].sample_input, next(iter(cond.values())).device
    x, noise = (torch.tensor(a, device=device) for a in (inputs.latents, inputs.noise))
    rows = torch.tensor(table.coefficients, device=device)
    guidance = torch.tensor(inputs.guidance_scale, device=device)
    x0_prev = zeros = torch.zeros_like(x)
    drawn = 0
    for i, t in enumerate(table.timesteps):
        out = module(**{sample: torch.cat([x, x]), "timestep": torch.tensor([float(t)], device=device), **cond})[0]
        step_noise = zeros
        if table.stochastic[i]:
            step_noise, drawn = noise[drawn], drawn + 1
        x, x0_prev = torch_step(rows[i], x, out, step_noise, guidance, x0_prev)
    return x


def _device_cond(inputs) -> dict:
    import torch

    return {k: torch.from_numpy(v).to("cuda") for k, v in inputs.conditioning.items()}


def run_torch(config: SuiteConfig, manifest, record: Record) -> None:
    """Per stage, both loops and end to end with the diffusers modules in fp16, eager."""
    _free()
    for name in config.networks:
        with record.guard(f"{name}/torch"):
            module, feeds = _torch_module(name), _torch_feeds(manifest.network(name).resolved())
            _measure(record, name, "torch", _synced(lambda: module(**feeds)), config.repeat, config.warmup, _torch_peak_mb)
            del module
        _free()
    for name in STEPS:
        with record.guard(f"{name}/torch"):
            x = _torch_feeds(manifest.network(name).resolved())
            args = (x["coefficients"], x["latents"], x["model_output"], x["noise"], x["guidance_scale"], x["x0_prev"])
            _measure(record, name, "torch", _synced(lambda: torch_step(*args)), config.repeat, config.warmup,
                     _torch_peak_mb)
    for loop, steps in _loops(config):
        with record.guard(f"loop:{loop}/torch"):
            module, table = _torch_module(LOOPS[loop].network), _table(manifest, loop, steps)
            inputs = _loop_inputs(manifest, loop, table)
            cond = _device_cond(inputs)
            _measure(record, f"loop:{loop}", "torch", _synced(lambda: torch_loop(module, loop, table, cond, inputs)),
                     config.loop_repeat, 1, _torch_peak_mb)
            del module
        _free()
    if set(NETWORKS) - set(config.networks):
        return
    with record.guard("e2e:text2img/torch"):
        e2e = TorchText2Image(manifest, config)
        _measure(record, "e2e:text2img", "torch", _synced(e2e), config.loop_repeat, 1, _torch_peak_mb)
        del e2e
    _free()


class TorchText2Image:
    """The same end-to-end sequence as :class:`OrtText2Image`, all on the device in torch."""

    def __init__(self, manifest, config: SuiteConfig) -> None:
        self.modules = {name: _torch_module(name) for name in NETWORKS}
        self.feeds = {name: _torch_feeds(manifest.network(name).resolved()) for name in ("prior_text_encoder", "text_encoder")}
        self.tables = {loop: _table(manifest, loop, steps)
                       for loop, steps in (("prior", config.prior_steps), ("decoder", config.decoder_steps))}
        self.inputs = {loop: _loop_inputs(manifest, loop, table) for loop, table in self.tables.items()}

    def __call__(self):
        import torch

        clip_embeds, clip_states = self.modules["prior_text_encoder"](**self.feeds["prior_text_encoder"])
        prior_cond = {**_device_cond(self.inputs["prior"]), "proj_embedding": clip_embeds,
                      "encoder_hidden_states": clip_states}
        embeds = torch_loop(self.modules["prior"], "prior", self.tables["prior"], prior_cond, self.inputs["prior"])
        text_embeds, text_states = self.modules["text_encoder"](**self.feeds["text_encoder"])
        unet_cond = {"encoder_hidden_states": text_states, "text_embeds": text_embeds,
                     "image_embeds": torch.cat([torch.zeros_like(embeds), embeds])}
        latents = torch_loop(self.modules["unet"], "decoder", self.tables["decoder"], unet_cond, self.inputs["decoder"])
        return self.modules["movq_decoder"](latents)[0].cpu()


# ---------------------------------------------------------------- results and command line


def _with_bounds(stages: list, gpu: str) -> list:
    """Attach the physical lower bound of each network stage where the GPU is in the spec table."""
    from dataclasses import replace

    from kandinsky_trt.benchmarks.flops import lower_bound_ms, network_cost
    from kandinsky_trt.benchmarks.gpu_specs import lookup_gpu

    spec = lookup_gpu(gpu)
    if spec is None:
        return stages
    bounds = {}
    for name in {s.stage for s in stages if s.stage in NETWORKS}:
        try:
            bounds[name] = lower_bound_ms(network_cost(name), spec)
        except Exception as err:  # a missing bound must not lose the measurements
            log.warning("no lower bound for %s: %s", name, err)
    return [replace(s, lower_bound_ms=bounds.get(s.stage)) for s in stages]


def write_results(config: SuiteConfig, manifest, record: Record, facts: dict) -> Path:
    from kandinsky_trt.benchmarks.report import BenchResult, new_result, stage_result, with_baseline_ratios, write_result

    rows = with_baseline_ratios([stage_result(m) for m in _with_bounds(record.stages, facts["name"])])
    result = new_result(manifest.profile.to_dict(), "fp16", rows, device_name=facts["name"])
    checks = {"graph_replay_vs_eager": graph_check_summary(record.checks), "errors": record.errors,
              "notes": record.notes, "check_steps": config.check_steps}
    device = {**result.device, **facts, **checks,
              "loop_steps": {"prior": config.prior_steps, "decoder": config.decoder_steps}}
    json_path, _, _ = write_result(BenchResult(**{**result.__dict__, "device": device}), config.out)
    (config.out / "gpu_suite_checks.json").write_text(json.dumps(checks, indent=2) + "\n", encoding="utf-8")
    return json_path


def _facts() -> dict:
    import onnxruntime as ort
    import torch

    return {"name": device_name(), "driver": _nvidia_smi("driver_version"), "torch": torch.__version__,
            "torch_cuda": torch.version.cuda, "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(), "weights": "random (full-size real configs)"}


def _parse(argv) -> SuiteConfig:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="result files and the log")
    parser.add_argument("--work", type=Path, default=SuiteConfig.work, help="exported ONNX files (GBs; reused)")
    parser.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=NETWORKS)
    for name in ("repeat", "warmup", "prior_steps", "decoder_steps", "loop_repeat", "check_steps"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(SuiteConfig, name))
    parser.add_argument("--exporter", choices=("dynamo", "legacy"), default=SuiteConfig.exporter)
    parser.add_argument("--skip-torch", action="store_true", help="ONNX Runtime only")
    args = parser.parse_args(argv)
    return SuiteConfig(args.out, args.work, tuple(args.networks), args.repeat, args.warmup, args.prior_steps,
                       args.decoder_steps, args.loop_repeat, args.check_steps, args.exporter, args.skip_torch)


def _setup_logging(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    handlers = [logging.StreamHandler(sys.stderr), logging.FileHandler(out / "gpu_suite.log", encoding="utf-8")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers)


def _cuda_ep_missing() -> str | None:
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        return None
    return (f"onnxruntime {ort.__version__} ({ort.__file__}) has no CUDAExecutionProvider (providers: "
            f"{ort.get_available_providers()}): install onnxruntime-gpu for this machine's CUDA, e.g. carry its "
            "wheel in gpu_suite.sh's WHEEL_DIR")


def main(argv=None) -> int:
    config = _parse(argv)
    _setup_logging(config.out)
    missing = _cuda_ep_missing()
    if missing:
        log.error("%s", missing)
        return 2
    import onnxruntime as ort
    import torch  # first: loads the CUDA/cuDNN libraries the CUDA EP also needs

    try:
        ort.preload_dlls()  # onnxruntime-gpu >= 1.21: the CUDA/cuDNN libraries of the nvidia-* wheels
    except Exception as err:  # absent or failing: the libraries torch loaded may be enough
        log.warning("onnxruntime.preload_dlls(): %s", err)
    facts = _facts()
    log.info("device %s, driver %s, torch %s (CUDA %s), onnxruntime %s", facts["name"], facts["driver"],
             facts["torch"], facts["torch_cuda"], facts["onnxruntime"])
    record = Record()
    start = time.perf_counter()
    manifest = export_full_size(config)
    log.info("artifacts ready in %.0f s", time.perf_counter() - start)
    for label in ORT_BACKENDS:
        run_ort(config, manifest, record, label)
    if config.skip_torch:
        log.info("torch skipped (--skip-torch)")
    elif not torch.cuda.is_available():
        record.errors["torch"] = "torch.cuda.is_available() is False: no torch baseline"
    else:
        run_torch(config, manifest, record)
    path = write_results(config, manifest, record, facts)
    log.info("wrote %s in %.0f s total; %d failed stage(s)", path, time.perf_counter() - start, len(record.errors))
    return 1 if record.errors else 0


if __name__ == "__main__":
    sys.exit(main())
