"""Full-size stages side by side, in one run: ONNX Runtime vs torch eager on the same inputs.

    python -m kandinsky_trt.benchmarks.full_size_stages --networks unet movq_decoder --out bench-results

Each network is built at its real Kandinsky 2.1 configuration with random weights
(``export/full_size.py``; timings do not depend on weight values) and exported to ONNX at the
requested precision; then ``torch`` (the module through the same wrapper export traced) and ``ort``
(the exported graph) take turns on identical inputs, one call each per round, for ``--repeat``
rounds (``rounds.py``), both held in memory at once. The result file has each side's median and
min–max and the ratio of every round: a change of machine load between rounds moves both sides.
Earlier versions timed all torch calls first and ONNX Runtime after, which let a load change
between the two move the ratio (0.85x against 2.75x interleaved for the UNet at 256x256).
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from kandinsky_trt.benchmarks.harness import reference_bounds
from kandinsky_trt.benchmarks.rounds import interleave
from kandinsky_trt.benchmarks.report import StageMeasurement, new_result, stage_result, with_baseline_ratios, write_result
from kandinsky_trt.runtime.backends.base import sample_inputs
from kandinsky_trt.runtime.contract.spec import KANDINSKY_2_1_DIMS, Profile, resolve

log = logging.getLogger(__name__)


def _measure(name: str, profile: Profile, precision: str, repeat: int, work_dir: Path):
    import onnxruntime as ort
    import torch

    from kandinsky_trt.export.full_size import build_full_size_model
    from kandinsky_trt.export.onnx_export import ExportRequest, export_network
    from kandinsky_trt.export.precision import policy_for
    from kandinsky_trt.export.torch_modules import WRAPPERS

    network = resolve(name, profile)
    feeds = sample_inputs(network)
    wrapper = WRAPPERS[name](build_full_size_model(name, dtype=torch.float32), torch.float32)
    args = [torch.from_numpy(feeds[n]) for n in network.input_names]
    request = ExportRequest.for_profiles(name, (profile,), KANDINSKY_2_1_DIMS, policy_for(name, precision), work_dir)
    files = export_network(wrapper.model, request)
    gc.collect()
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])

    def torch_call():
        with torch.no_grad():
            return wrapper(*args)

    timed = interleave({"torch": torch_call, "ort": lambda: session.run(None, feeds)}, repeat, warmup=1)
    for backend, t in timed.items():
        log.info("%s %s: median %.0f ms (%.0f-%.0f)", name, backend, float(np.median(t.samples_ms)),
                 min(t.samples_ms), max(t.samples_ms))
        yield StageMeasurement(name, backend, t.samples_ms, t.peak_host_rss_mb)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["unet", "movq_decoder"])
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5, help="rounds of torch, ort (default 5)")
    parser.add_argument("--out", default="bench-results", help="result folder (default ./bench-results)")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    profile = Profile(1, args.height, args.width, True)
    measurements = []
    for name in args.networks:
        with tempfile.TemporaryDirectory() as work_dir:
            measurements += list(_measure(name, profile, args.precision, args.repeat, Path(work_dir)))
        gc.collect()
    rows = with_baseline_ratios([stage_result(m) for m in measurements], interleaved=True)
    result = new_result(profile.to_dict(), args.precision, rows, device_name="cpu")
    result = replace(result, device={**result.device, **reference_bounds(args.networks, profile, "fp16")})
    for path in write_result(result, Path(args.out), stem=args.name):
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
