"""Why the fp16 islands: parity of fp16 graphs with and without them, against fp32 torch.

    python -m kandinsky_trt.benchmarks.precision_ablation --networks movq_decoder text_encoder --out FILE.json

Each full-size network (real config, random weights) is exported three ways — the shipped policy,
no fp32 islands at all, and islands without the fp32 softmax — and each graph is compared with the
fp32 torch module on the same three input sets as ``export --verify``.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from dataclasses import replace
from pathlib import Path


def _variants(policy):
    return {
        "shipped": policy,
        "no_islands": replace(policy, fp32_norms=False, fp32_softmax=False, fp32_modules=()),
        "no_fp32_softmax": replace(policy, fp32_softmax=False),
    }


def ablate(network: str, height: int, width: int) -> dict:
    import torch

    from kandinsky_trt.export import verify
    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.export.onnx_export import ExportRequest, export_network
    from kandinsky_trt.export.precision import policy_for
    from kandinsky_trt.export.torch_modules import WRAPPERS
    from kandinsky_trt.runtime.contract.spec import KANDINSKY_2_1_DIMS, Profile, resolve

    resolved = resolve(network, Profile(1, height, width, True))
    model = build_full_size_model(network, dtype=torch.float32)
    inputs = verify.verification_inputs(resolved)
    reference = verify.torch_reference(WRAPPERS[network](model, torch.float32), inputs)
    results = {}
    for name, policy in _variants(policy_for(network, "fp16")).items():
        with tempfile.TemporaryDirectory() as tmp:
            request = ExportRequest.for_profiles(network, (Profile(1, height, width, True),), KANDINSKY_2_1_DIMS,
                                                 policy, Path(tmp))
            files = export_network(copy.deepcopy(model), request)
            parity = verify.compare(network, "fp16", reference, verify.onnx_outputs(files[0], inputs))
        results[name] = {"islands": list(policy.islands), "max_abs": parity.max_abs, "max_rel": parity.max_rel}
        print(network, name, f"max rel {parity.max_rel:.3e}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["movq_decoder"])
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    report = {"machine": "2-core CPU, ONNX Runtime CPU EP", "weights": "random, real configs",
              "profile": f"{args.height}x{args.width} batch 1 cfg",
              "results": {n: ablate(n, args.height, args.width) for n in args.networks}}
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
