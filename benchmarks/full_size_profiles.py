"""Full-size UNet, one size vs three sizes in one artifacts set: on-disk size, peak RSS, step time at 512x512.

    flock /tmp/fullsize.lock python -m kandinsky_trt.benchmarks.full_size_profiles --out benchmarks/results

The real-config UNet (random weights, ``export/full_size.py``; timings do not depend on weight
values) is exported in fp16 twice with the export's own request: for the profile set {512x512} and
for {512x512, 768x768, 1024x576} (batch 1, guidance). Both are one graph with symbolic dims. A
third graph is the first with its I/O made static at 512x512 (what a one-profile export was
before several profiles existed), beside the same weights file. Each variant then runs in a child
process of its own (peak RSS = that process's): ONNX Runtime CPU session load, one warm-up call
and ``--repeat`` timed calls at 512x512, the variants taking turns for ``--rounds`` rounds.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETS = {"1 size": ((512, 512),), "3 sizes": ((512, 512), (768, 768), (576, 1024))}  # (height, width)
MACHINE = "2-core AMD EPYC VM, 23.5 GB RAM, no GPU (shared with other agents)"


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _export(label: str, work: Path) -> dict:
    """Child: build the UNet and export it for the sizes of ``label``; its files and costs."""
    import torch

    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.export.onnx_export import ExportRequest, export_network
    from kandinsky_trt.export.precision import policy_for
    from kandinsky_trt.runtime.contract.spec import KANDINSKY_2_1_DIMS, Profile

    work.mkdir(parents=True, exist_ok=True)
    profiles = tuple(Profile(1, h, w, True) for h, w in SETS[label])
    model = build_full_size_model("unet", dtype=torch.float32)
    start = time.perf_counter()
    request = ExportRequest.for_profiles("unet", profiles, KANDINSKY_2_1_DIMS, policy_for("unet", "fp16"), work)
    files = export_network(model, request)
    return {"export_s": round(time.perf_counter() - start, 1), "peak_rss_gb": round(_peak_rss_gb(), 2),
            "files": {f.name: f.stat().st_size for f in files}}


def _static_copy(work: Path) -> Path:
    """The graph with its I/O fixed at 512x512 b1 (same weights file, referenced by its name)."""
    import onnx

    from kandinsky_trt.runtime.contract.spec import Profile, resolve

    model = onnx.load(str(work / "unet.onnx"), load_external_data=False)
    network = resolve("unet", Profile(1, 512, 512, True))
    for values, tensors in ((model.graph.input, network.inputs), (model.graph.output, network.outputs)):
        for value, tensor in zip(values, tensors):
            for dim, size in zip(value.type.tensor_type.shape.dim, tensor.shape):
                dim.Clear()
                dim.dim_value = size
    path = work / "unet_static512.onnx"
    onnx.save_model(model, str(path))
    return path


def _time(graph: Path, repeat: int) -> dict:
    """Child: session load, one warm-up call, ``repeat`` timed calls at 512x512."""
    import onnxruntime as ort

    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.runtime.contract.spec import Profile, resolve

    feeds = sample_inputs(resolve("unet", Profile(1, 512, 512, True)))
    start = time.perf_counter()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    session.run(None, feeds)
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        session.run(None, feeds)
        samples.append(round((time.perf_counter() - start) * 1e3, 1))
    return {"load_s": round(load_s, 1), "step_ms": samples, "peak_rss_gb": round(_peak_rss_gb(), 2)}


def _child(*argv: str) -> dict:
    done = subprocess.run([sys.executable, "-m", __spec__.name, "--child", *argv], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(work: Path, repeat: int, rounds: int) -> dict:
    exports = {label: _child("export", label, str(work / label.replace(" ", "_"))) for label in SETS}
    graphs = {label: work / label.replace(" ", "_") / "unet.onnx" for label in SETS}
    graphs["1 size, static 512x512 I/O"] = _static_copy(work / "1_size")
    runs: dict[str, list] = {label: [] for label in graphs}
    for _ in range(rounds):  # the variants take turns, so machine load drifts affect them alike
        for label, graph in graphs.items():
            runs[label].append(_child("time", str(graph), str(repeat)))
    return {"exports": exports, "runs": runs}


def _summary(result: dict) -> dict:
    rows = {}
    for label, runs in result["runs"].items():
        samples = [s for run in runs for s in run["step_ms"]]
        rows[label] = {"step_ms_median": statistics.median(samples), "samples": len(samples),
                       "step_ms_range": [min(samples), max(samples)],
                       "load_s_median": round(statistics.median(r["load_s"] for r in runs), 1),
                       "peak_rss_gb": max(r["peak_rss_gb"] for r in runs)}
    base = rows["1 size"]["step_ms_median"]
    for row in rows.values():
        row["vs_1_size"] = round(row["step_ms_median"] / base, 3)
    return rows


def _write(result: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    stem = out / "cpu-2core_full-size-unet-fp16_profiles"
    rows = result["summary"]
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    disk = {label: sum(e["files"].values()) for label, e in result["exports"].items()}
    lines = [f"# Full-size UNet (fp16, random weights): 1 size vs 3 sizes in one set\n", f"Machine: {MACHINE}. "
             f"Command: `{result['command']}`. Run {result['run_utc']}.\n",
             "| set | on-disk bytes | vs 1 size | export s | export peak RSS GB |", "|---|---:|---:|---:|---:|"]
    for label, e in result["exports"].items():
        lines.append(f"| {label} | {disk[label]:,} | {disk[label] / disk['1 size']:.4f}x | {e['export_s']} | "
                     f"{e['peak_rss_gb']} |")
    lines += ["", "UNet call at 512x512 (batch 1, guidance: 2 rows), ONNX Runtime CPU, one process per run:", "",
              "| graph | median ms | min–max ms | n | vs 1 size | session load s | peak RSS GB |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label, r in rows.items():
        low, high = r["step_ms_range"]
        lines.append(f"| {label} | {r['step_ms_median']:.0f} | {low:.0f}–{high:.0f} | {r['samples']} | "
                     f"{r['vs_1_size']:.3f}x | {r['load_s_median']} | {r['peak_rss_gb']} |")
    lines += ["", "Both sets are one graph + one weights file of the same size; the spread of the samples (other "
              "agents shared the 2 cores during the run) is larger than any difference between the variants."]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    axes[0].bar(list(rows), [r["step_ms_median"] / 1e3 for r in rows.values()], color="tab:blue")
    axes[0].set_ylabel("UNet call at 512x512, s (median)")
    axes[1].bar(list(rows), [r["peak_rss_gb"] for r in rows.values()], color="tab:orange")
    axes[1].set_ylabel("peak RSS, GB")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=7)
    figure.suptitle(f"Full-size UNet fp16, ONNX Runtime CPU ({MACHINE})", fontsize=8)
    figure.tight_layout()
    figure.savefig(stem.with_suffix(".png"), dpi=110)
    return [stem.with_suffix(s) for s in (".json", ".md", ".png")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-results")
    parser.add_argument("--work", default="/tmp/kandinsky-full-size-profiles")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument("--render", help="write the report again from this JSON result (no measuring)")
    args = parser.parse_args()
    if args.render:
        result = json.loads(Path(args.render).read_text())
        result["summary"] = _summary(result)
        for path in _write(result, Path(args.out)):
            print(f"wrote {path}")
        return
    if args.child:
        kind, *rest = args.child
        print(json.dumps(_export(rest[0], Path(rest[1])) if kind == "export" else _time(Path(rest[0]), int(rest[1]))))
        return
    result = measure(Path(args.work), args.repeat, args.rounds)
    result |= {"machine": MACHINE, "python": platform.python_version(), "run_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
               "command": f"python -m kandinsky_trt.benchmarks.full_size_profiles --repeat {args.repeat} "
                          f"--rounds {args.rounds}"}
    result["summary"] = _summary(result)
    for path in _write(result, Path(args.out)):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
