"""Serving benchmark: Triton (HTTP) vs the in-process Python API, dynamic batching on vs off.

    python -m kandinsky_trt.benchmarks.serve_bench --artifacts A --name STEM [--concurrency 1 2 4 8]

One run, side by side: the Python API in-process (serial calls, the floor a server adds to), then
a tritonserver with dynamic batching on (``max_batch_size`` = the profile batch) and one with it
off (``max_batch_size`` 1), each at every concurrency level (that many client threads, each
sending text2img requests with distinct seeds back to back). Per level: requests/s and latency
p50/p99, each the median of ``--rounds`` interleaved rounds of all three modes. Ratios: served p50 at concurrency 1 / in-process p50 (overhead), and batching-on /
batching-off requests/s at each level. The clients run on the same machine as the server.
Writes ``STEM.json``, ``STEM.md`` and ``STEM.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kandinsky_trt.benchmarks.environment import MachineInfo, collect_versions, peak_host_rss_mb
from kandinsky_trt.benchmarks.report import pyplot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Workload:
    steps: int
    prior_steps: int
    requests: int  # per concurrency level
    warmup: int


def _fields(workload: Workload, profile, seed: int) -> dict:
    return dict(task="text2img", prompt=f"a red cat number {seed}", seed=seed, height=profile.height,
                width=profile.width, num_inference_steps=workload.steps, prior_steps=workload.prior_steps)


def _summary(latencies_s: list[float], wall_s: float) -> dict:
    ms = np.asarray(latencies_s) * 1e3
    return {"requests": len(ms), "requests_per_s": len(ms) / wall_s, "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)), "wall_s": wall_s}


def _median(summaries: list[dict]) -> dict:
    """Per-metric median over rounds, plus every round's requests/s."""
    out = {k: float(np.median([s[k] for s in summaries])) for k in ("requests_per_s", "p50_ms", "p99_ms")}
    return {**out, "requests": summaries[0]["requests"], "rounds_requests_per_s": [s["requests_per_s"] for s in summaries]}


def in_process(artifacts: Path, workload: Workload) -> dict:
    from kandinsky_trt.runtime import Components
    from kandinsky_trt.runtime import KandinskyCombinedPipeline

    with Components(artifacts) as components:
        pipe, profile = KandinskyCombinedPipeline(components=components), components.profile

        def call(seed: int) -> None:
            f = _fields(workload, profile, seed)
            pipe(f["prompt"], height=f["height"], width=f["width"], num_inference_steps=f["num_inference_steps"],
                 prior_num_inference_steps=f["prior_steps"], generator=seed)

        for seed in range(workload.warmup):
            call(seed)
        latencies, start = [], time.perf_counter()
        for seed in range(workload.requests):
            t = time.perf_counter()
            call(seed)
            latencies.append(time.perf_counter() - t)
        summary = _summary(latencies, time.perf_counter() - start)
    log.info("in-process: %.3f req/s, p50 %.0f ms", summary["requests_per_s"], summary["p50_ms"])
    return summary


def _load(url: str, workload: Workload, profile, concurrency: int) -> dict:
    from kandinsky_trt.runtime.serve.client import Target, infer, item_arrays, make_client

    target, seeds, lock = Target(url, "http"), iter(range(10_000, 10_000 + workload.requests)), threading.Lock()
    latencies: list[float] = []

    def worker() -> None:
        client = make_client(target)
        try:
            while True:
                with lock:
                    seed = next(seeds, None)
                if seed is None:
                    return
                arrays = item_arrays(_fields(workload, profile, seed))
                t = time.perf_counter()
                infer(target, arrays, client)
                with lock:
                    latencies.append(time.perf_counter() - t)
        finally:
            client.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return _summary(latencies, time.perf_counter() - start)


def served(artifacts: Path, workload: Workload, levels: list[int], batching: bool, delay_us: int) -> dict:
    from kandinsky_trt.runtime.contract import manifest as mf
    from kandinsky_trt.runtime.serve.client import Target, infer, item_arrays
    from kandinsky_trt.runtime.serve.launcher import ServerConfig, TritonServer
    from kandinsky_trt.runtime.serve.repository import RepoConfig, write_repository

    profile = mf.load_manifest(artifacts).profile
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as repo:
        write_repository(RepoConfig(artifacts, Path(repo), batching=batching, max_queue_delay_us=delay_us))
        config = ServerConfig(Path(repo), http_port=0, grpc_port=0, metrics_port=0, startup_timeout_s=600)
        with TritonServer(config) as server:
            for seed in range(workload.warmup):
                infer(Target(server.config.http_url), item_arrays(_fields(workload, profile, seed)))
            levels_out = {}
            for c in levels:
                levels_out[str(c)] = _load(server.config.http_url, workload, profile, c)
                log.info("served (batching %s), concurrency %d: %.3f req/s, p50 %.0f ms", batching, c,
                         levels_out[str(c)]["requests_per_s"], levels_out[str(c)]["p50_ms"])
            return levels_out


def run(args: argparse.Namespace) -> dict:
    from kandinsky_trt.runtime.contract import manifest as mf

    artifacts, levels = Path(args.artifacts), list(args.concurrency)
    workload = Workload(args.steps, args.prior_steps, args.requests, args.warmup)
    manifest = mf.load_manifest(artifacts)
    rounds = []
    for _ in range(args.rounds):  # interleaved, so load drift on a shared machine hits every mode alike
        rounds.append({"in_process": in_process(artifacts, workload),
                       "batching_on": served(artifacts, workload, levels, True, args.max_queue_delay_us),
                       "batching_off": served(artifacts, workload, levels, False, args.max_queue_delay_us)})
    api = _median([r["in_process"] for r in rounds])
    on = {str(c): _median([r["batching_on"][str(c)] for r in rounds]) for c in levels}
    off = {str(c): _median([r["batching_off"][str(c)] for r in rounds]) for c in levels}
    return {
        "kind": "serve", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": MachineInfo.collect().__dict__, "machine_label": args.machine, "versions": collect_versions(),
        "artifacts": {"profile": manifest.profile.__dict__, "precision": manifest.precision, "label": args.label},
        "workload": {**workload.__dict__, "task": "text2img", "protocol": "http", "backend": "ort",
                     "max_queue_delay_us": args.max_queue_delay_us, "rounds": args.rounds},
        "in_process": api, "batching_on": on, "batching_off": off,
        "overhead_ratio_c1": on[str(levels[0])]["p50_ms"] / api["p50_ms"],
        "batching_throughput_ratio": {c: on[c]["requests_per_s"] / off[c]["requests_per_s"] for c in on},
        "batching_throughput_ratio_per_round": {  # the modes took turns in each round: the ratio's spread
            str(c): [r["batching_on"][str(c)]["requests_per_s"] / r["batching_off"][str(c)]["requests_per_s"]
                     for r in rounds] for c in levels},
        "peak_rss_mb_client_process": peak_host_rss_mb(),
    }


def markdown(r: dict) -> str:
    w, a = r["workload"], r["artifacts"]
    p = a["profile"]
    lines = [f"# Serving on Triton: {a['label']}", "",
             f"Machine: {r['machine_label']} ({r['machine']['cpu_model']}, {r['machine']['cores']} cores). "
             f"Artifacts: {a['precision']}, {p['height']}x{p['width']}, profile batch {p['batch']}. "
             f"Workload: {w['task']}, {w['prior_steps']} prior + {w['steps']} decoder steps, {w['requests']} requests "
             f"per level over {w['protocol'].upper()}, backend {w['backend']}, queue delay {w['max_queue_delay_us']} us; "
             f"medians of {w['rounds']} interleaved rounds. "
             f"Created {r['created_utc']}.", "",
             f"In-process Python API (serial): {_rate(r['in_process']['requests_per_s'])} req/s, "
             f"p50 {r['in_process']['p50_ms']:.1f} ms, p99 {r['in_process']['p99_ms']:.1f} ms.", "",
             f"Served / in-process p50 at concurrency {min(r['batching_on'], key=int)}: "
             f"**{r['overhead_ratio_c1']:.2f}x**.", "", *_memory_lines(r),
             "| concurrency | batching on req/s | p50 ms | p99 ms | batching off req/s | p50 ms | p99 ms | on/off |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c, on in r["batching_on"].items():
        off = r["batching_off"][c]
        lines.append(f"| {c} | {_rate(on['requests_per_s'])} | {on['p50_ms']:.1f} | {on['p99_ms']:.1f} | "
                     f"{_rate(off['requests_per_s'])} | {off['p50_ms']:.1f} | {off['p99_ms']:.1f} | "
                     f"{r['batching_throughput_ratio'][c]:.2f}x{_round_range(r, c)} |")
    return "\n".join(lines) + "\n"


def _round_range(r: dict, level: str) -> str:
    """`` (rounds a–b)``: the on/off ratio's lowest and highest round, where the file has them."""
    ratios = r.get("batching_throughput_ratio_per_round", {}).get(level)
    return f" (rounds {min(ratios):.2f}–{max(ratios):.2f})" if ratios and len(ratios) > 1 else ""


def _rate(requests_per_s: float) -> str:
    """Two decimals, or three significant digits below 1 req/s (full-size requests take a minute)."""
    return f"{requests_per_s:.2f}" if requests_per_s >= 1 else f"{requests_per_s:.3g}"


def _memory_lines(r: dict) -> list[str]:
    m = r.get("memory")
    if m is None:
        return []
    return [f"Memory: graph files {m['graph_files_gb']:.1f} GiB; peak RSS of the server process tree (tritonserver "
            f"+ Python stub) {m['peak_rss_mb_server_tree'] / 1024:.1f} GiB; of the client process, which also ran "
            f"the in-process API, {m['peak_rss_mb_client_process'] / 1024:.1f} GiB.", ""]


def plot(r: dict, path: Path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    import matplotlib.ticker  # noqa: F401 (the NullFormatter below)
    levels = [int(c) for c in r["batching_on"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, label in (("batching_on", "Triton, dynamic batching"), ("batching_off", "Triton, no batching")):
        ax.plot(levels, [r[key][str(c)]["requests_per_s"] for c in levels], marker="o", label=label)
    ax.axhline(r["in_process"]["requests_per_s"], linestyle="--", color="grey", label="in-process API (serial)")
    ax.set(xlabel="concurrent clients", ylabel="requests / s", xscale="log",
           title=f"{r['artifacts']['label']}\n{r['machine_label']}")
    ax.set_xticks(levels, [str(c) for c in levels])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.title.set_fontsize(9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", required=True)
    parser.add_argument("--label", default="tiny checkpoint", help="what the artifacts are, for the report")
    parser.add_argument("--machine", default="2-core AMD EPYC VM, 23.5 GB RAM, no GPU")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prior-steps", type=int, default=5)
    parser.add_argument("--requests", type=int, default=24, help="requests per concurrency level (default 24)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of every mode; medians reported")
    parser.add_argument("--max-queue-delay-us", type=int, default=2000)
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--name", required=True, help="file stem")
    return parser


def write_report(result: dict, out: Path, name: str) -> None:
    """``name``.json, .md and (with matplotlib) .png under ``out``; prints the Markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    wrote = [out / f"{name}.json", out / f"{name}.md"]
    if plot(result, out / f"{name}.png"):
        wrote.append(out / f"{name}.png")
    print(markdown(result))
    print("wrote " + ", ".join(map(str, wrote)))


def main() -> None:
    args = build_parser().parse_args()
    write_report(run(args), Path(args.out), args.name)


if __name__ == "__main__":
    main()
