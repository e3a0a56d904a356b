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


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--network", default="unet")
    parser.add_argument("--precision", choices=("fp16", "fp32"), default="fp16")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--exporter", choices=("legacy", "dynamo"), default="dynamo",
                        help="dynamo traces with fake tensors; legacy runs a real fp16 forward (slow on CPU)")
    parser.add_argument("--verify", action="store_true",
                        help="also compare the graph (ONNX Runtime CPU) with the fp32 torch module on 3 input sets")
    parser.add_argument("--out", required=True)
    return parser.parse_args()


def main() -> None:
    args = _parse()
    import torch

    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.export.onnx_export import ExportRequest, export_network
    from kandinsky_trt.export import verify
    from kandinsky_trt.export.precision import policy_for
    from kandinsky_trt.export.torch_modules import WRAPPERS
    from kandinsky_trt.runtime.contract.spec import KANDINSKY_2_1_DIMS, Profile, resolve

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model = build_full_size_model(args.network, dtype=torch.float32)
    built = time.perf_counter()
    profile = Profile(1, args.height, args.width, True)
    network = resolve(args.network, profile)
    reference = inputs = None
    if args.verify:
        inputs = verify.verification_inputs(network)
        reference = verify.torch_reference(WRAPPERS[args.network](model, torch.float32), inputs)
    exported = time.perf_counter()
    files = export_network(model, ExportRequest.for_profiles(args.network, (profile,), KANDINSKY_2_1_DIMS,
                                                             policy_for(args.network, args.precision), out, args.exporter))
    done = time.perf_counter()
    parity = None
    if args.verify:
        del model
        parity = verify.compare(args.network, args.precision, reference, verify.onnx_outputs(files[0], inputs))
    print(json.dumps({
        "network": args.network, "precision": args.precision, "exporter": args.exporter, "profile": f"{args.height}x{args.width} b1 cfg",
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, {__import__('os').cpu_count()} cores)",
        "build_random_model_s": round(built - start, 1), "export_s": round(done - exported, 1),
        "parity": None if parity is None else {"max_abs": parity.max_abs, "max_rel": parity.max_rel,
                                               "tolerance": parity.tolerance, "passed": parity.passed},
        "peak_host_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "files": {f.name: f.stat().st_size for f in files},
    }))


if __name__ == "__main__":
    main()
