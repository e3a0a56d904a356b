"""Start-up cost of the artifact hash checks at full size: cold and cached verification vs session load.

    python -m kandinsky_trt.benchmarks.hash_startup --graph DIR/unet.onnx --out benchmarks/results

``--graph`` is a full-size graph with its external data beside it (``full_size_export`` writes one:
random weights, the real file sizes). Measured side by side in one process, ``--repeats`` times each:

- ``cold``: the first verification in a process (:data:`~kandinsky_trt.runtime.contract.integrity.VERIFIED`
  empty): size check + sha256 of the graph and its external data; what every process pays once;
- ``cached``: a second verification in the same process (``stat`` only);
- ``load``: creating the ONNX Runtime CPU session of the graph, without any verification.

The page cache is not dropped (other jobs share the machine); the first cold sample may read from
disk, later ones from memory; all samples are reported. Writes ``<stem>.json`` and ``<stem>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def _files(graph: Path) -> list[Path]:
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(graph), load_external_data=False)
    locations = {item.value for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
                 for item in t.external_data if item.key == "location"}
    return [graph, *(graph.parent / name for name in sorted(locations))]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(graph: Path, repeats: int) -> dict:
    import onnxruntime as ort

    from kandinsky_trt.runtime.contract.integrity import VERIFIED, file_record

    files = _files(graph)
    records = {f: file_record(f) for f in files}  # what export records (also warms nothing we rely on)
    size = sum(r.size for r in records.values())

    def verify():
        for f, record in records.items():
            VERIFIED.verify(f, record, f.name)

    cold, cached, load = [], [], []
    for _ in range(repeats):
        VERIFIED.clear()  # as in a new process
        cold.append(_timed(verify))
        cached.append(_timed(verify))
        options = ort.SessionOptions()
        options.log_severity_level = 3
        load.append(_timed(lambda: ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])))
    med = {k: statistics.median(v) for k, v in (("cold", cold), ("cached", cached), ("load", load))}
    return {
        "files": {f.name: r.size for f, r in records.items()}, "total_bytes": size,
        "samples_s": {"cold_verify": cold, "cached_verify": cached, "session_load_unverified": load},
        "median_s": med,
        "cold_verify_s_per_gb": med["cold"] / (size / 1e9),
        "cold_verify_over_load": med["cold"] / med["load"],
        "cached_verify_over_load": med["cached"] / med["load"],
    }


def _markdown(result: dict) -> str:
    m, gb = result["median_s"], result["total_bytes"] / 1e9
    return "\n".join([
        f"# Hash-check start-up cost: {result['network']} ({gb:.2f} GB, fp16, random weights)",
        "",
        f"Machine: {result['machine']}. Command: `{result['command']}`. Medians of {result['repeats']} runs in one process.",
        "",
        "| step | median | vs. session load |",
        "|---|---|---|",
        f"| first verification in a process (size + sha256 of every file) | {m['cold']:.2f} s "
        f"({result['cold_verify_s_per_gb']:.2f} s/GB) | {result['cold_verify_over_load']:.2f}x |",
        f"| later verification in the same process (stat only) | {m['cached'] * 1e6:.0f} µs "
        f"| {result['cached_verify_over_load']:.1e}x |",
        f"| ONNX Runtime CPU session load, no verification | {m['load']:.2f} s | 1x |",
        "",
        "Page cache not dropped (shared machine): samples " + json.dumps(result["samples_s"]),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--graph", required=True, help="a full-size .onnx with its external data beside it")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--machine", help="how to name the machine in the result (default: from /proc)")
    parser.add_argument("--out", required=True, help="folder for the JSON and Markdown files")
    parser.add_argument("--stem", default="cpu-2core_full-size-unet-fp16_hash-startup")
    args = parser.parse_args()

    from kandinsky_trt.benchmarks.environment import MachineInfo, collect_versions

    graph = Path(args.graph)
    info = MachineInfo.collect()
    result = {
        "what": "start-up cost of verifying a full-size graph's files against their size + sha256 records",
        "network": graph.stem, "repeats": args.repeats,
        "machine": args.machine or f"{info.cores}-core {info.cpu_model}, {info.ram_gb} GB RAM, no GPU",
        "command": f"python -m kandinsky_trt.benchmarks.hash_startup --graph {graph.name} --repeats {args.repeats}",
        "versions": collect_versions(), **measure(graph, args.repeats),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / f"{args.stem}.md").write_text(_markdown(result))
    print(_markdown(result))


if __name__ == "__main__":
    main()
