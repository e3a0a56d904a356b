"""Full-size stages side by side, in one run: ONNX Runtime vs torch eager on the same inputs.

    python -m kandinsky_trt.benchmarks.full_size_stages --networks unet movq_decoder --out benchmarks/results

Each network is built at its real Kandinsky 2.1 configuration with random weights
(``export/full_size.py``; timings do not depend on weight values), exported to ONNX at the
requested precision, then timed with the harness's ``time_calls``: ``torch`` runs the module
through the same wrapper export traced, ``ort`` runs the exported graph. Both get identical inputs.
"""

from __future__ import annotations

import argparse
import gc
import logging
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from kandinsky_trt.benchmarks.harness import reference_bounds, time_calls
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
    with torch.no_grad():
        samples, rss = time_calls(lambda: wrapper(*args), repeat, warmup=1)
    yield StageMeasurement(name, "torch", tuple(samples), rss)
    log.info("%s torch: median %.0f ms", name, float(np.median(samples)))
    request = ExportRequest.for_profiles(name, (profile,), KANDINSKY_2_1_DIMS, policy_for(name, precision), work_dir)
    files = export_network(wrapper.model, request)
    del wrapper, args
    gc.collect()
    session = ort.InferenceSession(str(files[0]), providers=["CPUExecutionProvider"])
    samples, rss = time_calls(lambda: session.run(None, feeds), repeat, warmup=1)
    log.info("%s ort: median %.0f ms", name, float(np.median(samples)))
    yield StageMeasurement(name, "ort", tuple(samples), rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--networks", nargs="+", default=["unet", "movq_decoder"])
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32")
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    profile = Profile(1, args.height, args.width, True)
    measurements = []
    for name in args.networks:
        with tempfile.TemporaryDirectory() as work_dir:
            measurements += list(_measure(name, profile, args.precision, args.repeat, Path(work_dir)))
        gc.collect()
    rows = with_baseline_ratios([stage_result(m) for m in measurements])
    result = new_result(profile.to_dict(), args.precision, rows, device_name="cpu")
    result = replace(result, device={**result.device, **reference_bounds(args.networks, profile, "fp16")})
    for path in write_result(result, Path(args.out), stem=args.name):
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
