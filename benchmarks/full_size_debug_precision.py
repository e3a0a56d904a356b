"""Time ``debug-precision`` on a full-size network: wall time and peak host memory on this machine.

    python -m kandinsky_trt.benchmarks.full_size_debug_precision --fp16 DIR16 --fp32 DIR32 [--network unet]

``DIR16`` / ``DIR32`` hold ``<network>.onnx`` (+ ``.onnx.data``) from
``python -m kandinsky_trt.benchmarks.full_size_export --precision fp16|fp32`` (random weights, real
config, same profile). Runs the same comparison as the command (segmented ONNX Runtime CPU runs of
both graphs in lockstep, sample inputs seed 0) and writes JSON + Markdown under ``--out``. A
watchdog stops the run if the resident set passes ``--rss-limit-gb`` (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

MACHINE = "2-core AMD EPYC VM, 23.5 GB RAM, no GPU"


def _watchdog(limit_gb: float, peak: list[float]) -> None:
    from kandinsky_trt.benchmarks.environment import current_host_rss_mb

    while True:
        rss = (current_host_rss_mb() or 0) / 1024
        peak[0] = max(peak[0], rss)
        if rss > limit_gb:
            print(f"resident set {rss:.1f} GB passed the {limit_gb} GB limit: stopping", flush=True)
            os._exit(3)
        time.sleep(0.5)


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16", required=True)
    parser.add_argument("--fp32", required=True)
    parser.add_argument("--network", default="unet")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--segment-mb", type=float, default=512)
    parser.add_argument("--rss-limit-gb", type=float, default=13.5)
    parser.add_argument("--out", default="bench-results")
    return parser.parse_args()


def _run(args: argparse.Namespace):
    """The comparison as ``debug-precision`` runs it; returns (report, fp16 graph, fp32 graph, seconds)."""
    from kandinsky_trt.export.onnx_segments import SegmentedGraph, SegmentLimits
    from kandinsky_trt.export.precision_debug import DEFAULT_TOLERANCE, NetworkReport, compare_graphs
    from kandinsky_trt.export.precision_fix import suggest_islands
    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.runtime.contract.spec import Profile, resolve

    limits = SegmentLimits(budget_bytes=int(args.segment_mb * 2**20))
    start = time.perf_counter()
    fp16 = SegmentedGraph(Path(args.fp16) / f"{args.network}.onnx", limits)
    fp32 = SegmentedGraph(Path(args.fp32) / f"{args.network}.onnx", limits)
    network = resolve(args.network, Profile(1, args.height, args.width, True))
    nodes = compare_graphs(fp16, fp32, sample_inputs(network, seed=0))
    report = NetworkReport(args.network, DEFAULT_TOLERANCE, 10, nodes)
    report.suggestion, report.notes = suggest_islands(report, fp16)
    return report, fp16, fp32, time.perf_counter() - start


def main() -> None:
    import logging

    from kandinsky_trt.benchmarks.environment import peak_host_rss_mb
    from kandinsky_trt.export.precision_report import format_report

    args = _arguments()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("kandinsky_trt.export.onnx_segments").setLevel(logging.DEBUG)
    sampled = [0.0]
    threading.Thread(target=_watchdog, args=(args.rss_limit_gb, sampled), daemon=True).start()
    report, fp16, fp32, seconds = _run(args)
    table = format_report(report)
    print(table)
    result = {
        "what": f"debug-precision on the full-size {args.network} (random weights, real config), fp16 vs fp32 "
                "graphs, ONNX Runtime CPU, segmented runs",
        "command": "python -m kandinsky_trt.benchmarks.full_size_debug_precision --fp16 DIR16 --fp32 DIR32 "
                   f"--network {args.network} --segment-mb {args.segment_mb:g}",
        "machine": MACHINE, "profile": f"{args.height}x{args.width} b1 cfg", "wall_s": round(seconds, 1),
        "peak_host_rss_gb": round(peak_host_rss_mb() / 1024, 2), "sampled_peak_rss_gb": round(sampled[0], 2),
        "segments": {"fp16": len(fp16.segments()), "fp32": len(fp32.segments())},
        "tensors": len(report.nodes), "compared": len(report.compared), "passed": report.passed,
        "max_rel_error": max((n.rel_error for n in report.compared), default=None),
        "report": {k: v for k, v in report.to_dict().items() if k != "nodes"},
    }
    _write(result, table, args)


def _write(result: dict, table: str, args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cpu-2core_full-size-{args.network}_debug-precision"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{stem}.md").write_text(
        f"# debug-precision, full-size {args.network}, {result['profile']}\n\n{MACHINE}\n\n"
        f"wall time {result['wall_s']} s, peak RSS {result['peak_host_rss_gb']} GB, "
        f"{result['compared']} of {result['tensors']} fp16 tensors compared\n\n```\n{table}\n```\n")
    print(json.dumps({k: result[k] for k in ("wall_s", "peak_host_rss_gb", "sampled_peak_rss_gb", "segments")}))


if __name__ == "__main__":
    main()
