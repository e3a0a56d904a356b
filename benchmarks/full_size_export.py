"""Export one full-size random-weight network to ONNX on this machine; report time and peak memory.

    python -m kandinsky_trt.benchmarks.full_size_export --network unet --precision fp16 --out DIR

Random weights (real config, ``export/full_size.py``) make the same graph and the same file size as
the real checkpoint; only the values differ. Writes ``DIR/<network>.onnx`` (+ ``.onnx.data``) and
prints one JSON line with the wall time, peak host RSS and file sizes.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="unet")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--exporter", choices=("legacy", "dynamo"), default="dynamo",
                        help="dynamo traces with fake tensors; legacy runs a real fp16 forward (slow on CPU)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch

    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.export.onnx_export import ExportRequest, export_network
    from kandinsky_trt.export.precision import policy_for
    from kandinsky_trt.runtime.spec import Profile, resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = build_full_size_model(args.network, dtype=torch.float32)
    built = time.perf_counter()
    network = resolve(args.network, Profile(1, args.height, args.width, True))
    files = export_network(model, ExportRequest(network, policy_for(args.network, args.precision), out, args.exporter))
    done = time.perf_counter()
    print(json.dumps({
        "network": args.network, "precision": args.precision, "exporter": args.exporter, "profile": f"{args.height}x{args.width} b1 cfg",
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)",
        "build_random_model_s": round(built - start, 1), "export_s": round(done - built, 1),
        "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "files": {f.name: f.stat().st_size for f in files},
    }))


if __name__ == "__main__":
    main()
