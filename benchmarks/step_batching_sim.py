"""Step-level vs request-level batching on one GPU, predicted by simulation (issue 20, item 6).

    .venv/bin/python benchmarks/step_batching_sim.py --out benchmarks/results

Runs the served scheduler (``runtime/scheduling``) on :mod:`sched_sim`'s cost-model executor and
simulated clock under open-loop Poisson arrivals at several rates, for each policy: step-level with
occupancy-sized steps (each step at the smallest profile batch holding the occupied slots: what the
served executor does, ``runtime/loops/sized.py``, on artifacts exporting batches 1, 2, 4 and 8),
step-level with fixed steps (loops of 8 slots always stepped at batch 8: artifacts of one batch),
request-level (groups of equal settings, up to 8, run to the end at the smallest profile that holds
them) and no batching. Writes ``sim-h200-512_step-batching.{json,md,png}``.

It is a model: the per-call times are roofline floors (FLOPs and bytes per network from
``flops.py``, H200 peaks from ``gpu_specs.py``) scaled by assumed efficiencies, stated in the
outputs. What it predicts is the *scheduling* difference under those costs, not absolute speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from kandinsky_trt.benchmarks.report import pyplot, write_files
from kandinsky_trt.benchmarks.sched_sim import (NetworkFloor, RooflineCost, SimulatedExecutor, SimRun, Workload,
                                                arrivals, simulate, steps_run)
from kandinsky_trt.runtime.scheduling.admission import RequestLevel, StepLevel
from kandinsky_trt.runtime.scheduling.clock import SimulatedClock
from kandinsky_trt.runtime.scheduling.work import DECODER, PRIOR, Request

log = logging.getLogger(__name__)
STEM = "sim-h200-512_step-batching"
NETWORKS = ("prior_text_encoder", "text_encoder", "prior", "unet", "unet_inpaint", "movq_decoder", "movq_encoder")
SIZED = "step-level, occupancy-sized steps (served)"


@dataclass(frozen=True)
class Policy:
    name: str
    admission: object
    loop_batch: str  # SimulatedExecutor's: "slots" or "fit"
    slots: int | None = None  # None: the configuration's


def policies(slots: int) -> list[Policy]:
    return [Policy("step-level", StepLevel(), "slots"), Policy("request-level", RequestLevel(slots), "fit"),
            Policy("no batching", RequestLevel(1), "fit"), Policy(SIZED, StepLevel(), "fit"),
            Policy(f"step-level, {slots // 2} slots", StepLevel(), "slots", slots // 2)]


@dataclass(frozen=True)
class SimConfig:
    """What one sweep runs: ``load_fractions`` of the no-batching saturation rate (requests/s)."""

    load_fractions: tuple[float, ...] = tuple(round(0.1 * i, 2) for i in range(1, 21))
    requests: int = 1500
    warmup: float = 0.1  # leading share of the arrivals left out of the statistics
    slots: int = 8
    seed: int = 0
    p99_targets_s: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 20.0)
    workload: Workload = Workload(rate_per_s=1.0, requests=1)


def count_floors() -> dict[str, NetworkFloor]:
    """FLOPs and bytes of one image row (guidance's doubled batch included) at 512x512, fp16 (needs torch)."""
    from kandinsky_trt.benchmarks.flops import network_cost
    from kandinsky_trt.runtime.contract.spec import Profile

    costs = {n: network_cost(n, Profile(batch=1, height=512, width=512, cfg=True), "fp16") for n in NETWORKS}
    return {n: NetworkFloor(c.gflop, c.weight_bytes, c.io_bytes) for n, c in costs.items()}


def service_s(cost: RooflineCost, request: Request) -> float:
    """One request alone at batch 1: its entry call, prior and decoder steps and decode."""
    return (cost.call_s("encode", [request]) + steps_run(request, PRIOR) * cost.step_s(PRIOR, ("prior",), 1)
            + steps_run(request, DECODER) * cost.step_s(DECODER, ("unet",), 1) + cost.call_s("decode", [request]))


def saturation_rate(cost: RooflineCost, workload: Workload) -> float:
    """Requests/s one GPU serves one at a time, on average over the workload's classes."""
    mean = statistics.fmean(service_s(cost, r) for _, r in arrivals(replace(workload, requests=4000, rate_per_s=1.0)))
    return 1.0 / mean


def percentile(values, q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 1]); None for no values."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] if ordered else None


def summarize_run(run: SimRun, warmup: float, requests: int) -> dict:
    """Throughput, latency percentiles (all and per decoder step count), queue time, occupancy."""
    measured = [f for f in run.finished if int(f.request.request_id[1:]) >= warmup * requests and f.status == "done"]
    latency = [f.latency_s for f in measured]
    by_class = {}
    for steps in sorted({f.request.decoder_steps for f in measured}):
        chosen = [f.latency_s for f in measured if f.request.decoder_steps == steps]
        by_class[str(steps)] = {"n": len(chosen), "p50_s": percentile(chosen, 0.5), "p99_s": percentile(chosen, 0.99)}
    done = [f for f in run.finished if f.status == "done"]
    first = min((f.arrived_at for f in run.finished), default=0.0)
    stages = run.scheduler.metrics.stages
    return {
        "completed": len(done), "refused": len(run.refused),
        "throughput_per_s": len(done) / (run.end_s - first) if run.end_s > first else 0.0,
        "p50_s": percentile(latency, 0.5), "p99_s": percentile(latency, 0.99),
        "queue_mean_s": statistics.fmean(f.queue_s for f in measured) if measured else None,
        "queue_p99_s": percentile([f.queue_s for f in measured], 0.99),
        "occupancy": {s: round(m.occupancy, 4) for s, m in stages.items()},
        "by_decoder_steps": by_class,
    }


def run_point(policy: Policy, cost, config: SimConfig, rate: float) -> dict:
    schedule = arrivals(replace(config.workload, rate_per_s=rate, requests=config.requests, seed=config.seed))
    executor = SimulatedExecutor(SimulatedClock(), cost, slots=policy.slots or config.slots, loop_batch=policy.loop_batch)
    run = simulate(schedule, executor, policy.admission, queue_limit=10 * config.requests)
    return {"rate_per_s": rate, **summarize_run(run, config.warmup, config.requests)}


def sustainable_rate(points: list[dict], target_s: float) -> float | None:
    """The highest simulated rate, below the first that misses it, whose p99 meets ``target_s``."""
    best = None
    for p in sorted(points, key=lambda p: p["rate_per_s"]):
        if p["p99_s"] is None or p["p99_s"] > target_s or p["refused"]:
            break
        best = p["rate_per_s"]
    return best


def idle_p50_10(cost, config: SimConfig, policy: Policy) -> float:
    """p50 latency of 10-step requests on an idle server (one request at a time) under ``policy``."""
    schedule = [(1000.0 * i, r) for i, (_, r) in enumerate(arrivals(replace(config.workload, requests=200, rate_per_s=1.0,
                                                                           seed=config.seed)))]
    executor = SimulatedExecutor(SimulatedClock(), cost, slots=policy.slots or config.slots, loop_batch=policy.loop_batch)
    run = simulate(schedule, executor, policy.admission)
    return percentile([f.latency_s for f in run.finished if f.request.decoder_steps == 10], 0.5)


def sweep(cost: RooflineCost, config: SimConfig) -> dict:
    """Every policy at every rate, and the comparisons at equal p99 (see :func:`sustainable_rate`)."""
    saturation = saturation_rate(cost, config.workload)
    rates = [round(f * saturation, 4) for f in config.load_fractions]
    results = {p.name: [run_point(p, cost, config, r) for r in rates] for p in policies(config.slots)}
    idle = {p.name: idle_p50_10(cost, config, p) for p in policies(config.slots)}
    at_p99 = []
    for target in config.p99_targets_s:
        rates_at = {name: sustainable_rate(points, target) for name, points in results.items()}
        request = rates_at["request-level"]
        ratio = lambda name: rates_at[name] / request if rates_at[name] and request else None  # noqa: E731
        at_p99.append({"p99_target_s": target, "sustainable_rate_per_s": rates_at, "step_over_request":
                       ratio("step-level"), "sized_over_request": ratio(SIZED)})
    return {"saturation_no_batching_per_s": saturation, "rates_per_s": rates, "idle_p50_10_steps_s": idle,
            "policies": results, "at_equal_p99": at_p99}


# -- scenarios, outputs ----------------------------------------------------------------------------

ANCHORED = ((1, 0.15), (2, 0.22), (4, 0.30))  # perf_anchors.md §6: SD1.5-size kernels 0.11-0.17, SDXL-size 0.27-0.31


def scenarios(floors: dict[str, NetworkFloor], gpu) -> dict[str, RooflineCost]:
    """The two cost models compared: one efficiency at every batch, and one that rises with the batch."""
    base = RooflineCost(floors, gpu.fp16_flop_per_s, gpu.bytes_per_s)
    return {"constant efficiency": base, "efficiency rising with batch": replace(base, batch_efficiency=ANCHORED)}


def assumptions(cost: RooflineCost) -> dict:
    return {"compute_efficiency": cost.compute_efficiency, "batch_efficiency": cost.batch_efficiency,
            "bandwidth_efficiency": cost.bandwidth_efficiency, "overhead_s_per_network_call": cost.overhead_s,
            "profile_batches": cost.profile_batches,
            "unet_step_ms_by_batch": {b: round(cost.step_s(DECODER, ("unet",), b) * 1e3, 3) for b in cost.profile_batches}}


MODEL_NOTES = [
    "A simulation, not a measurement: the served scheduler (runtime/scheduling) runs unchanged on a cost-model "
    "executor and a simulated clock; no GPU ran.",
    "Call time = overhead + max(rows x FLOPs / (efficiency x fp16 dense peak), (weights + rows x I/O bytes) / "
    "(bandwidth efficiency x DRAM bandwidth)); FLOPs and bytes per network counted by benchmarks/flops.py on the "
    "meta device (full-size Kandinsky 2.1 configs, fp16, 512x512, one image row = the [uncond, cond] pair).",
    "rows = the profile batch the call runs at (static shapes): the fixed step-level loop always runs its 8 slots; "
    "occupancy-sized steps, request-level groups, no batching and one-shot calls run at the smallest of batches "
    "1, 2, 4, 8 holding them.",
    "Activation traffic, the step graph's elementwise work, host-device copies of results and Python overhead "
    "beyond the per-call overhead are not modelled; one GPU runs one call at a time.",
    "Request-level groups requests with equal task, step counts, guidance and strength (everyone's guidance is 4 "
    "here, which favours it). Latencies count from arrival to the decoded image; p99 is over all measured requests.",
    "Sustainable rates are read off the simulated rate grid (steps of 10% of the no-batching saturation rate), so "
    "the ratios between policies are coarse; each point is one seeded run, not an average.",
    "'step-level, N slots' is the loop of slots built at a smaller profile batch (fewer slots, cheaper steps). "
    "The 'occupancy-sized' policy steps at the smallest profile batch holding the occupied slots, as the served "
    "executor does (runtime/loops/sized.py: rows move between the batches' loops with their state; row moves "
    "are not costed here); 'step-level' always steps its 8 slots (artifacts exporting one batch).",
]


def render_markdown(result: dict) -> str:
    w = result["workload"]
    lines = [f"# Step-level vs request-level batching, {result['device']['name']}, 512x512 (simulated)", "",
             *[f"- {n}" for n in MODEL_NOTES],
             f"- Workload: open-loop Poisson, {result['config']['requests']} requests per point (first "
             f"{result['config']['warmup']:.0%} left out), decoder steps {w['decoder_steps']}, prior steps "
             f"{w['prior_steps']}, tasks {w['tasks']} (img2img strength {w['strength']}), guidance 4 for all, 512x512.",
             ""]
    for name, sc in result["scenarios"].items():
        lines += [f"## {name}", "", f"Assumptions: `{json.dumps(sc['assumptions'])}`", "",
                  f"No-batching saturation {sc['saturation_no_batching_per_s']:.2f} req/s (one request at a time, "
                  "batch 1). Idle p50 of 10-step requests (one request at a time): "
                  + ", ".join(f"{p} {v:.3f} s" for p, v in sc["idle_p50_10_steps_s"].items()) + ".", "",
                  "| policy | rate/s | thr/s | p50 s | p99 s | p50 10-step | p99 10-step | p50 100-step | "
                  "p99 100-step | queue mean s | decoder occupancy |", "|" + "---|" * 11]
        for policy, points in sc["policies"].items():
            for p in points:
                c10, c100 = p["by_decoder_steps"].get("10", {}), p["by_decoder_steps"].get("100", {})
                cells = [p["rate_per_s"], p["throughput_per_s"], p["p50_s"], p["p99_s"], c10.get("p50_s"),
                         c10.get("p99_s"), c100.get("p50_s"), c100.get("p99_s"), p["queue_mean_s"],
                         p["occupancy"].get(DECODER)]
                lines.append(f"| {policy} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in cells) + " |")
        lines += ["", "Sustainable rate at equal p99 (highest simulated rate meeting the p99, req/s):", "",
                  "| p99 target s | " + " | ".join(sc["policies"]) + " | step / request-level | occupancy-sized / "
                  "request-level |", "|" + "---|" * (len(sc["policies"]) + 3)]
        for row in sc["at_equal_p99"]:
            cells = [row["sustainable_rate_per_s"][p] for p in sc["policies"]]
            cells += [row["step_over_request"], row["sized_over_request"]]
            lines.append(f"| {row['p99_target_s']} | " + " | ".join("-" if r is None else f"{r:.2f}" for r in cells)
                         + " |")
        lines += ["", f"Goals (in this model): {sc['goals']['text']}", ""]
    return "\n".join(lines) + "\n"


def _goals_of(sc: dict, policy: str) -> dict:
    rates = [(r["sustainable_rate_per_s"][policy], r["sustainable_rate_per_s"]["request-level"])
             for r in sc["at_equal_p99"]]
    ratios = [a / b for a, b in rates if a and b]
    idle = sc["idle_p50_10_steps_s"][policy]
    under = [p["rate_per_s"] for p in sc["policies"][policy]
             if (p["by_decoder_steps"].get("10", {}).get("p50_s") or math.inf) <= 1.5 * idle]
    return {"best_rate_ratio_at_equal_p99": max(ratios) if ratios else None,
            "p50_10_within_1_5x_idle_up_to_per_s": max(under, default=None), "idle_p50_10_s": idle}


def goals(sc: dict) -> dict:
    """The issue's two goals read off one scenario, for each step-level policy: sustainable rate >= 2x
    request-level's at equal p99; p50 of 10-step requests <= 1.5x its own idle p50."""
    out, texts = {}, []
    for policy in (p for p in sc["policies"] if p.startswith("step-level")):
        g = out[policy] = _goals_of(sc, policy)
        ratio, load = g["best_rate_ratio_at_equal_p99"], g["p50_10_within_1_5x_idle_up_to_per_s"]
        share = f"{100 * load / sc['saturation_no_batching_per_s']:.0f}% of no-batching saturation" if load else "-"
        texts.append(f"{policy}: best rate ratio at equal p99 {'-' if ratio is None else f'{ratio:.2f}'} (goal >= 2: "
                     f"{'met' if ratio and ratio >= 2 else 'not met'}); 10-step p50 <= 1.5x its idle "
                     f"({g['idle_p50_10_s']:.3f} s) up to {'no simulated rate' if load is None else f'{load:.2f} req/s'}"
                     f" ({share})")
    return {"by_policy": out, "text": "; ".join(texts)}


def plot(result: dict, path: Path) -> bool:
    plt = pyplot(path)
    if plt is None:
        return False
    names = list(result["scenarios"])
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        sc = result["scenarios"][name]
        for policy, points in sc["policies"].items():
            rates = [p["rate_per_s"] for p in points]
            axes[row][0].plot(rates, [p["p99_s"] for p in points], marker="o", label=policy)
            axes[row][1].plot(rates, [p["by_decoder_steps"].get("10", {}).get("p50_s") for p in points], marker="o",
                              label=policy)
        for ax, what in zip(axes[row], ("p99 latency, all requests (s)", "p50 latency, 10-step requests (s)")):
            ax.set(title=f"{name} (simulated)", xlabel="arrival rate (req/s)", ylabel=what, yscale="log")
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def build_result(floors: dict[str, NetworkFloor], gpu, config: SimConfig) -> dict:
    result = {"kind": "simulation", "device": {"name": gpu.name, "fp16_tensor_tflops": gpu.fp16_tensor_tflops,
                                               "memory_bandwidth_tbs": gpu.memory_bandwidth_tbs, "source": gpu.source},
              "floors": {n: asdict(f) for n, f in floors.items()}, "notes": MODEL_NOTES,
              "workload": asdict(config.workload) | {"rate_per_s": None, "requests": None},
              "config": {k: v for k, v in asdict(config).items() if k != "workload"}, "scenarios": {}}
    for name, cost in scenarios(floors, gpu).items():
        log.info("scenario %s", name)
        sc = {"assumptions": assumptions(cost), **sweep(cost, config)}
        sc["goals"] = goals(sc)
        result["scenarios"][name] = sc
    return result


def write_results(result: dict, out: Path, stem: str = STEM) -> list[Path]:
    return write_files(result, out, stem, render_markdown(result), plot)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--requests", type=int, default=SimConfig.requests)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from kandinsky_trt.benchmarks.gpu_specs import H200_SXM

    result = build_result(count_floors(), H200_SXM, SimConfig(requests=args.requests))
    for path in write_results(result, args.out):
        print(path)


if __name__ == "__main__":
    main()
