"""How many replicas for a target request rate, from measurements and from the FLOP floor.

    python deploy/capacity.py --target-rps 2 --gpu "H100 SXM"

Formula: ``replicas = ceil(target_rps / (per_replica_rps * utilization))``. ``per_replica_rps``
is a replica's saturated throughput for the workload: measured on CPU here (the best level with
dynamic batching of a committed serving run), or on a GPU bounded above by ``1 / floor`` where the
floor (``benchmarks/flops.py``: FLOPs at the fp16 tensor peak, or weight bytes at the DRAM
bandwidth, whichever is slower, per network call) is summed over the calls of one text-to-image
request at the pipeline's default steps. ``utilization`` (< 1) keeps queues short: at 0.7 a replica
is busy 70 % of the time on average. Assumptions: requests alike (same size, steps, task), spread
evenly over the replicas, independent; no GPU figure is measured, so GPU counts are given for an
assumed fraction (``efficiency``) of the floor, published diffusion engines reaching 10-50 %.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
SERVE_RESULTS = {"tiny": RESULTS / "cpu-2core_tiny-64px-b2_fp32_serve-triton.json",
                 "full-size": RESULTS / "cpu-2core_full-size-256px-b2_fp32_serve-triton.json"}
TEXT2IMG_NETWORKS = ("prior_text_encoder", "prior", "text_encoder", "unet", "movq_decoder")


class CapacityError(KandinskyTrtError, ValueError):
    """A rate, utilization or efficiency out of range."""


def _positive(name: str, value: float, upper: float | None = None) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0) or (upper and value > upper):
        bound = f"a number in (0, {upper}]" if upper else "a finite number > 0"
        raise CapacityError(f"{name}: expected {bound}, found {value!r}")
    return float(value)


def replicas_for(target_rps: float, per_replica_rps: float, utilization: float = 0.7) -> int:
    """``ceil(target / (per_replica * utilization))``, at least 1."""
    target = _positive("target_rps", target_rps)
    rate = _positive("per_replica_rps", per_replica_rps) * _positive("utilization", utilization, 1.0)
    return max(1, math.ceil(target / rate - 1e-9))  # 1e-9: an exact multiple is not rounded up


@dataclass(frozen=True)
class Measured:
    """A replica's best measured throughput in one committed serving run."""

    requests_per_s: float
    concurrency: int
    label: str  # the artifacts and workload it was measured on
    machine: str


def measured_throughput(path: Path) -> Measured:
    data = json.loads(Path(path).read_text())
    levels = data["batching_on"]
    best = max(levels, key=lambda c: levels[c]["requests_per_s"])
    w = data["workload"]
    label = f"{data['artifacts']['label']}, {w['task']} {w['prior_steps']} prior + {w['steps']} decoder steps"
    return Measured(levels[best]["requests_per_s"], int(best), label, data["machine_label"])


def default_steps() -> tuple[int, int]:
    """(decoder steps, prior steps) of a text2img request that leaves them out: the pipeline's defaults."""
    from kandinsky_trt.runtime.pipelines.combined import KandinskyCombinedPipeline

    params = inspect.signature(KandinskyCombinedPipeline.__call__).parameters
    return params["num_inference_steps"].default, params["prior_num_inference_steps"].default


def floor_ms_per_request(floors_ms: dict[str, float], decoder_steps: int, prior_steps: int) -> float:
    """One text2img request: each encoder once, the prior and the UNet once per step, one decode."""
    calls = {"prior_text_encoder": 1, "prior": prior_steps, "text_encoder": 1, "unet": decoder_steps,
             "movq_decoder": 1}
    return sum(floors_ms[name] * n for name, n in calls.items())


def gpu_floors_ms(gpu_name: str) -> dict[str, float]:
    """Floor per call of each text2img network at 512x512, batch 1 with guidance, fp16 (needs torch)."""
    from kandinsky_trt.benchmarks.flops import lower_bound_ms, network_cost
    from kandinsky_trt.benchmarks.gpu_specs import lookup_gpu

    gpu = lookup_gpu(gpu_name)
    if gpu is None:
        raise CapacityError(f"gpu: expected a GPU of benchmarks/gpu_specs.py (e.g. 'H100 SXM'), found {gpu_name!r}")
    return {name: lower_bound_ms(network_cost(name, precision="fp16"), gpu) for name in TEXT2IMG_NETWORKS}


def report(target_rps: float, gpu_name: str, utilization: float, efficiencies: tuple[float, ...]) -> list[str]:
    lines = [f"target {target_rps:g} req/s at utilization {utilization:g}"]
    for name, path in SERVE_RESULTS.items():
        m = measured_throughput(path)
        lines.append(f"CPU replica ({m.machine}), {m.label}: {m.requests_per_s:.4g} req/s measured "
                     f"-> {replicas_for(target_rps, m.requests_per_s, utilization)} replica(s)")
    decoder, prior = default_steps()
    floor = floor_ms_per_request(gpu_floors_ms(gpu_name), decoder, prior)
    lines.append(f"{gpu_name}, 512x512 text2img, {prior} prior + {decoder} decoder steps: floor {floor:.1f} ms "
                 f"-> at most {1e3 / floor:.2f} req/s per GPU")
    for e in efficiencies:
        rate = _positive("efficiency", e, 1.0) * 1e3 / floor
        lines.append(f"  at {e:.0%} of the floor: {rate:.2f} req/s per GPU -> "
                     f"{replicas_for(target_rps, rate, utilization)} GPU(s)")
    lines.append(f"  no fewer than {replicas_for(target_rps, 1e3 / floor, 1.0)} GPU(s) at any efficiency")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="replicas for a target request rate")
    parser.add_argument("--target-rps", type=float, required=True, help="requests per second to serve")
    parser.add_argument("--gpu", default="H100 SXM", help="a GPU of benchmarks/gpu_specs.py (default H100 SXM)")
    parser.add_argument("--utilization", type=float, default=0.7, help="target busy fraction (default 0.7)")
    parser.add_argument("--efficiency", type=float, nargs="+", default=[0.1, 0.5],
                        help="assumed fractions of the GPU floor (default 0.1 0.5)")
    args = parser.parse_args(argv)
    try:
        print("\n".join(report(args.target_rps, args.gpu, args.utilization, tuple(args.efficiency))))
    except CapacityError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
