"""UNet loop step time, before (lockstep loop, commit bd43037) vs after (loop of slots), side by side.

    git worktree add --detach /tmp/before bd43037
    .venv/bin/python benchmarks/loop_step_ratio.py --before-tree /tmp/before --work /tmp/ratio

Issue 19 asks that the loop of slots keep the UNet loop step on ONNX Runtime CPU within 3 % of the
lockstep loop (after / before <= 1.03). Each contender is a worker process importing its own source
tree: a temporary folder holding a symlink ``kandinsky_trt -> TREE`` goes first on ``sys.path`` and
wins over the editable install (the worker reports the files it imported). Each worker exports its
artifacts with its own code (schema 3 before, 4 after) from the same checkpoint, pins ONNX Runtime to
the same number of intra-op threads, and times ``Components.denoise(UNET_LOOP, table, inputs)`` over
``steps`` steps of the same table on the same inputs. The coordinator alternates the workers round
by round in ABBA order (A B, B A, A B, ...), so load drift on a shared machine hits both alike, and
reports per-step medians, IQRs, min-max and the after/before ratio with the spread of the ratios of
each round; a pause before each timed call lets the other worker's ONNX Runtime threads stop
spinning (without it the second contender of a round was the slower one). The final latents of
both are compared (same work: their SHA-256 must agree). A run takes ~12 min on 2 loaded cores,
~10 GB of RAM (two full-size sessions at once) and ~14 GB under ``--work``.

Cases: the tiny UNet (``write_tiny_checkpoint``) at 64x64 with a batch-1 and a batch-2 profile, and
the full-size UNet (real Kandinsky 2.1 config, random weights, ``export/full_size.py``) at 64x64 batch
1 with guidance. Only ``unet`` (+ its step graph) is exported. For the full-size case the checkpoint
is the tiny one with ``decoder/unet`` replaced by the full-size UNet and the other networks' configs
given the full-size dims (their weights are never loaded); the export's constants (zero-image
embedding, CLIP mean/std, used by the prior only) are written as zeros/ones of the real shapes instead
of running a 1 B-parameter prior. Pure logic (:func:`round_order`, :func:`summarize_case`,
:func:`render_markdown`, :func:`write_results`) is tested on fake timings in
tests/test_loop_step_ratio.py.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

LIMIT = 1.03  # issue 19: after / before step time
BEFORE_COMMIT = "bd43037"
NAMES = ("before", "after")


@dataclass(frozen=True)
class Case:
    """One timed configuration; ``artifacts`` names the export it runs on (shared by cases)."""

    name: str
    artifacts: str  # "tiny" | "full"
    batch: int
    steps: int  # denoising steps per timed call
    rounds: int
    guidance: float = 4.0


ARTIFACT_SIZES = {"tiny": ((1, 64, 64), (2, 64, 64)), "full": ((1, 64, 64),)}  # (batch, height, width)
CASES = (Case("tiny-unet-64px-b1", "tiny", 1, 25, 30), Case("tiny-unet-64px-b2", "tiny", 2, 25, 30),
         Case("full-size-unet-64px-b1", "full", 1, 4, 10))


# ---------------------------------------------------------------- pure logic (tested on fake timings)


def round_order(names, rounds: int) -> list[tuple[str, ...]]:
    """ABBA: the contenders in order in even rounds, reversed in odd ones."""
    names = tuple(names)
    return [names if r % 2 == 0 else names[::-1] for r in range(rounds)]


def run_rounds(call, names, rounds: int) -> dict[str, list[float]]:
    """``call(name)`` -> ms, in :func:`round_order`; each name's samples in round order."""
    samples: dict[str, list[float]] = {n: [] for n in names}
    for order in round_order(names, rounds):
        for name in order:
            samples[name].append(float(call(name)))
    return samples


def _spread(values) -> dict:
    v = np.asarray(values, dtype=np.float64)
    p25, median, p75 = np.percentile(v, [25, 50, 75])
    return {"median": float(median), "p25": float(p25), "p75": float(p75),
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def summarize_case(case: Case, call_ms: dict[str, list[float]]) -> dict:
    """Per-step statistics (ms) of each contender and the after/before ratio: of the medians, and
    per round (its median, IQR and min-max). ``call_ms``: per contender, one call time per round."""
    before, after = (np.asarray(call_ms[n], dtype=np.float64) / case.steps for n in NAMES)
    if before.size != after.size or before.size == 0 or np.any(before <= 0):
        raise ValueError(f"call_ms: expected as many positive samples per contender, found {call_ms}")
    ratio = float(np.median(after) / np.median(before))
    return {"case": case.name, "batch": case.batch, "steps_per_call": case.steps, "rounds": case.rounds,
            "guidance_scale": case.guidance,
            "step_ms": {"before": _spread(before), "after": _spread(after)},
            "samples_step_ms": {"before": before.tolist(), "after": after.tolist()},
            "ratio": ratio, "round_ratios": _spread(after / before),
            "verdict": "pass" if ratio <= LIMIT else "FAIL"}


def _row(s: dict) -> str:
    b, a, r = s["step_ms"]["before"], s["step_ms"]["after"], s["round_ratios"]
    return (f"| {s['case']} | {s['batch']} | {b['median']:.3f} ({b['p25']:.3f}–{b['p75']:.3f}) | "
            f"{a['median']:.3f} ({a['p25']:.3f}–{a['p75']:.3f}) | **{s['ratio']:.3f}** | "
            f"{r['median']:.3f} ({r['p25']:.3f}–{r['p75']:.3f}; {r['min']:.3f}–{r['max']:.3f}) | "
            f"{s['steps_per_call']}×{s['rounds']} | {s['verdict']} |")


def render_markdown(result: dict) -> str:
    """The result as a table, one row per case, with the machine, the load and how it was run."""
    load = result["load"]
    lines = [f"# UNet loop step: before ({result['before']['commit']}, lockstep) vs after "
             f"({result['after']['commit']}, loop of slots)", "",
             f"- machine: {result['machine']} — shared with other agents' jobs while it ran",
             f"- ONNX Runtime CPU {result['versions'].get('onnxruntime', '?')}, intra-op threads "
             f"{result['threads']} for both; fp32; {result['created_utc']}",
             f"- load average (1, 5, 15 min) before: {load['before']}, after: {load['after']}",
             f"- sizes: {result['sizes']}", "",
             "| case | batch | before ms/step median (IQR) | after ms/step median (IQR) | after/before | "
             "per-round ratio median (IQR; min–max) | steps × rounds | ≤ 1.03 |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    lines += [_row(s) for s in result["cases"]]
    lines += ["", f"ms/step = one `Components.denoise(UNET_LOOP, …)` call over the steps, divided by the "
              "steps. The two contenders ran in their own processes on their own code and exports, taking "
              f"turns in ABBA order each round (a pause of {result.get('pause_s', 0)} s before each call); per-round "
              "ratio = after / before of the same round.",
              f"Final latents identical before/after: {result['latents_identical']}."]
    return "\n".join(lines) + "\n"


def plot_results(result: dict, png: Path) -> bool:
    """Per case, the per-round ratios (points) beside the ratio of medians (bar) and the limit."""
    from kandinsky_trt.benchmarks.report import pyplot  # here: a worker imports kandinsky_trt from its tree

    plt = pyplot(png)
    if plt is None:
        return False
    cases = result["cases"]
    fig, ax = plt.subplots(figsize=(2.2 * len(cases) + 2, 4))
    for i, s in enumerate(cases):
        rounds = np.asarray(s["samples_step_ms"]["after"]) / np.asarray(s["samples_step_ms"]["before"])
        ax.bar(i, s["ratio"], 0.5, color="tab:blue", alpha=0.5, label="median after / median before" if i == 0 else None)
        ax.scatter(np.full(rounds.size, i) + np.linspace(-0.15, 0.15, rounds.size), rounds, s=10, color="black",
                   label="per round" if i == 0 else None)
    ax.axhline(LIMIT, color="red", linestyle="--", label=f"limit {LIMIT}")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(cases)), [s["case"] for s in cases])
    ax.set_ylabel("step time after / before")
    ax.set_ylim(bottom=min(0.8, ax.get_ylim()[0]))
    ax.set_title(f"UNet loop step, ONNX Runtime CPU, {result['threads']} threads")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def write_results(result: dict, out_dir, stem: str = "cpu-2core_loop-step-ratio") -> list[Path]:
    """``<stem>.json``, ``.md`` and ``.png`` (the PNG only where matplotlib imports)."""
    from kandinsky_trt.benchmarks.report import write_files  # here: a worker imports kandinsky_trt from its tree

    return write_files(result, out_dir, stem, render_markdown(result), plot_results)


# ---------------------------------------------------------------- worker (runs in the contender's tree)


def _use_tree(tree: str) -> str:
    """Put ``kandinsky_trt -> tree`` first on sys.path; returns the folder of the imported runtime."""
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]  # run as a script: not the tree
    shim = tempfile.mkdtemp(prefix="kandinsky-shim-")
    atexit.register(shutil.rmtree, shim, True)
    os.symlink(os.path.abspath(tree), os.path.join(shim, "kandinsky_trt"))
    sys.path.insert(0, shim)
    import kandinsky_trt.runtime

    found = os.path.dirname(os.path.realpath(kandinsky_trt.runtime.__file__))
    if found != os.path.join(os.path.realpath(tree), "runtime"):
        raise RuntimeError(f"worker imported {found}, expected the tree {tree}")
    return found


def _placeholder_constants(dirs, store, dims):
    """Zeros/ones of the constants' real shapes (prior-only inputs; the UNet loop never reads them)."""
    from kandinsky_trt.export.artifact_files import _write_constant

    arrays = {"zero_image_embeds": np.zeros((1, dims.clip_dim), np.float32),
              "clip_mean": np.zeros((1, dims.clip_dim), np.float32), "clip_std": np.ones((1, dims.clip_dim), np.float32)}
    return {name: _write_constant(store, name, a) for name, a in arrays.items()}


def _export(checkpoint: Path, kind: str, out: Path) -> float:
    """Export ``unet`` (and its step graph) with this tree's code; the seconds it took."""
    from kandinsky_trt.export import artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
    from kandinsky_trt.runtime.contract.spec import Profile

    profiles = tuple(Profile(b, h, w, cfg=True) for b, h, w in ARTIFACT_SIZES[kind])
    if kind == "full":
        artifacts.export_constants = _placeholder_constants
    start = time.perf_counter()
    exporter = "legacy" if kind == "tiny" else "dynamo"
    artifacts.export_artifacts(artifacts.ExportConfig(CheckpointDirs(checkpoint / "prior", checkpoint / "decoder"),
                                                      out, profiles, "fp32", exporter=exporter, networks=("unet",)))
    return time.perf_counter() - start


def _inputs(manifest, table, batch: int, guidance: float):
    """Seeded conditioning (``sample_inputs``), N(0, 1) latents and noise for ``batch`` rows."""
    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.runtime.contract.loop_specs import UNET_LOOP
    from kandinsky_trt.runtime.loops.template import LoopInputs

    profile = next(i for i, p in enumerate(manifest.profiles) if p.batch == batch)
    feeds = sample_inputs(manifest.network("unet").resolved(profile), seed=0)
    latents = manifest.network("unet_step").resolved(profile).tensor(UNET_LOOP.io.latents)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((int(np.sum(table.stochastic)), *latents.shape)).astype(latents.dtype)
    return LoopInputs(rng.standard_normal(latents.shape).astype(latents.dtype),
                      {k: v for k, v in feeds.items() if k not in UNET_LOOP.network_fed}, {}, noise, guidance)


class Worker:
    """The contender side: one artifacts set loaded, ``time`` requests answered."""

    def __init__(self, tree: str, threads: int) -> None:
        self.tree, self.threads, self.components, self.inputs = tree, threads, None, {}
        self.runtime_dir = _use_tree(tree)

    def setup(self, checkpoint: str, kind: str, out: str) -> dict:
        from kandinsky_trt.runtime.pipelines.components import Components

        start = time.perf_counter()  # in a child: the exporter's memory (GBs at full size) is not kept here
        subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", self.tree, "--export", checkpoint,
                        kind, out], check=True, stdout=sys.stderr)
        export_s = time.perf_counter() - start
        if self.components is not None:
            self.components.close()
        self.components = Components(out)
        self.components.backend.options = replace(self.components.backend.options, intra_op_threads=self.threads)
        return {"export_s": round(export_s, 1), "runtime": self.runtime_dir,
                "schema": json.loads((Path(out) / "manifest.json").read_text())["schema_version"]}

    def time(self, batch: int, steps: int, guidance: float) -> dict:
        from kandinsky_trt.runtime.contract.loop_specs import UNET_LOOP

        c = self.components
        # The lockstep tree's Components holds the tables itself; today's keeps them in ``loaded``.
        table = getattr(c, "loaded", c).scheduler("decoder", steps)
        key = (batch, steps, guidance)
        if key not in self.inputs:
            self.inputs[key] = _inputs(c.manifest, table, batch, guidance)
        start = time.perf_counter()
        latents = c.denoise(UNET_LOOP, table, self.inputs[key])
        ms = (time.perf_counter() - start) * 1e3
        return {"ms": ms, "sha256": hashlib.sha256(np.ascontiguousarray(latents).tobytes()).hexdigest(),
                "shape": list(latents.shape)}


def worker_main(tree: str, threads: int) -> None:
    """JSON lines in on stdin, one JSON line out per request on the original stdout."""
    reply = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # anything the libraries print goes to stderr, not into the replies
    worker = Worker(tree, threads)
    for line in sys.stdin:
        request = json.loads(line)
        command = request.pop("cmd")
        if command == "quit":
            break
        answer = getattr(worker, command)(**request)
        reply.write(json.dumps(answer) + "\n")
        reply.flush()


# ---------------------------------------------------------------- coordinator


class Contender:
    """A worker process (one per contender and artifacts set)."""

    def __init__(self, tree: Path, threads: int, log: Path) -> None:
        self.log = open(log, "a", encoding="utf-8")
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", str(tree),
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def ask(self, cmd: str, **kwargs) -> dict:
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited (rc {self.proc.wait()}), see {self.log.name}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"cmd": "quit"}\n')
            self.proc.stdin.close()
            self.proc.wait(timeout=120)
        self.log.close()


def prepare_checkpoints(work: Path, kinds) -> dict[str, Path]:
    """The tiny checkpoint and, for ``full``, its copy with the full-size UNet (seed 0) and dims."""
    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    found = {"tiny": work / "tiny-checkpoint", "full": work / "full-checkpoint"}
    if not (found["tiny"] / "decoder").is_dir():
        write_tiny_checkpoint(found["tiny"], seed=0)
    if "full" in kinds and not (found["full"] / "decoder" / "unet" / "config.json").is_file():
        _full_size_unet_checkpoint(found["tiny"], found["full"])
    return found


def _full_size_unet_checkpoint(tiny: Path, out: Path) -> None:
    import torch

    from kandinsky_trt.export.full_size import build_full_size_model, full_size_configs
    from kandinsky_trt.runtime.contract.spec import NETWORK_SOURCE

    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tiny, staging)
    configs = full_size_configs()
    for network, key in (("prior_text_encoder", "prior_text_encoder"), ("image_encoder", "image_encoder"),
                         ("prior", "prior"), ("text_encoder", "text_encoder"), ("movq_decoder", "movq")):
        path = staging.joinpath(*NETWORK_SOURCE[network], "config.json")
        path.write_text(json.dumps({**json.loads(path.read_text()), **configs[key]}, indent=1))
    unet = staging.joinpath(*NETWORK_SOURCE["unet"])
    shutil.rmtree(unet)
    build_full_size_model("unet", dtype=torch.float32, seed=0).save_pretrained(unet, max_shard_size="1GB")
    staging.rename(out)


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def measure(args: argparse.Namespace) -> dict:
    """Every selected case, the contenders taking turns; the result dict of :func:`write_results`."""
    cases = [c if args.rounds is None else replace(c, rounds=args.rounds) for c in CASES if c.artifacts in args.sets]
    checkpoints = prepare_checkpoints(args.work, {c.artifacts for c in cases})
    trees = {"before": args.before_tree, "after": Path(__file__).resolve().parents[1]}
    summaries, same, setups, loads = [], True, {}, {"before": _load()}
    for kind in dict.fromkeys(c.artifacts for c in cases):
        workers = {n: Contender(trees[n], args.threads, args.work / f"worker-{n}.log") for n in NAMES}
        try:
            for n in NAMES:
                setups[f"{kind}/{n}"] = workers[n].ask("setup", checkpoint=str(checkpoints[kind]), kind=kind,
                                                       out=str(args.work / f"artifacts-{kind}-{n}"))
            for case in (c for c in cases if c.artifacts == kind):
                summary, identical = _time_case(case, workers, args.warmup)
                summaries.append(summary)
                same = same and identical
        finally:
            for w in workers.values():
                w.close()
    loads["after"] = _load()
    return {"cases": summaries, "latents_identical": same, "setups": setups, "load": loads}


def _time_case(case: Case, workers: dict, warmup: int) -> tuple[dict, bool]:
    request = {"batch": case.batch, "steps": case.steps, "guidance": case.guidance}
    hashes = {n: {workers[n].ask("time", **request)["sha256"] for _ in range(warmup)} for n in NAMES}
    load_before = _load()
    samples = run_rounds(lambda n: _timed(workers[n], request, hashes[n]), NAMES, case.rounds)
    summary = summarize_case(case, samples)
    summary["load_during"] = {"before": load_before, "after": _load()}
    identical = len(hashes["before"] | hashes["after"]) == 1
    summary["latents_identical"] = identical
    print(f"{case.name}: before {summary['step_ms']['before']['median']:.3f} ms/step, after "
          f"{summary['step_ms']['after']['median']:.3f} ms/step, ratio {summary['ratio']:.3f}", flush=True)
    return summary, identical


PAUSE_S = 0.3  # before each timed call: the other worker's ONNX Runtime threads stop spinning first


def _timed(worker: Contender, request: dict, hashes: set) -> float:
    time.sleep(PAUSE_S)
    answer = worker.ask("time", **request)
    hashes.add(answer["sha256"])
    return answer["ms"]


def _commit(tree: Path) -> str:
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--export", nargs=3, help=argparse.SUPPRESS)  # CHECKPOINT KIND OUT, with --worker
    parser.add_argument("--before-tree", type=Path, help=f"a checkout of {BEFORE_COMMIT} (git worktree add --detach)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "loop-step-ratio")
    parser.add_argument("--sets", nargs="+", choices=("tiny", "full"), default=["tiny", "full"])
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, both contenders")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, help="rounds of every case (default: the case's own)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = parser.parse_args()
    if args.worker and args.export:
        _use_tree(args.worker)
        return print(f"exported in {_export(Path(args.export[0]), args.export[1], Path(args.export[2])):.1f} s")
    if args.worker:
        return worker_main(args.worker, args.threads)
    if args.before_tree is None:
        parser.error("--before-tree: expected a checkout of the before commit, found none")
    from kandinsky_trt.benchmarks.environment import MachineInfo, collect_versions

    args.work.mkdir(parents=True, exist_ok=True)
    result = measure(args)
    m = MachineInfo.collect()
    result.update({
        "machine": f"{m.hostname}: {m.cpu_model}, {m.cores} cores, {m.ram_gb} GB RAM (shared VM)",
        "versions": collect_versions(), "threads": args.threads, "pause_s": PAUSE_S, "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "before": {"commit": _commit(args.before_tree), "tree": str(args.before_tree)},
        "after": {"commit": _commit(Path(__file__).resolve().parents[1])},
        "sizes": "; ".join(f"{k}: " + ", ".join(f"b{b} {h}x{w} px" for b, h, w in v) + " (cfg, fp32)"
                           for k, v in ARTIFACT_SIZES.items()),
        "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
    })
    for path in write_results(result, args.out):
        print(path)


if __name__ == "__main__":
    main()
