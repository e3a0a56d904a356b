"""Parity of an exported graph (ONNX Runtime, CPU) against the fp32 torch module.

The inputs differ from the ones traced at export — other prompt lengths (the text encoders pool
with the mask; an exporter can fold a mask path into a constant), timesteps 999 and 500 on every row
and rows at different timesteps 1 / 999 / 500 (``timestep`` is per row, ``(B2,)``), and distinct
uncond / cond halves — so a graph that only reproduces its tracing inputs fails.

Error metric per output: ``max|onnx - torch| / max|torch|`` (relative to the output's scale),
the worst over outputs and input sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kandinsky_trt.runtime.backends.base import sample_inputs
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork

FP32_TOLERANCE = 1e-4
# fp16 graph vs fp32 torch, relative to the output scale: ~2x the worst value measured on the tiny
# and the full-size random-weight networks (benchmarks/results/cpu-2core_full-size_fp16-parity.json).
# The MoVQ decoder's full-size maximum (1.1e-2) is a single-pixel outlier: mean error 0.2% of std.
FP16_TOLERANCE = {
    "prior_text_encoder": 5e-3,  # measured 1.3e-3 tiny, 9.7e-4 full size
    "prior": 5e-3,  # 6.9e-4, 1.0e-3
    "image_encoder": 5e-3,  # 5.8e-4, 8.2e-4
    "text_encoder": 5e-3,  # 4.4e-4, 2.6e-3
    "unet": 5e-3,  # 9.4e-4, 9.2e-4
    "unet_inpaint": 5e-3,  # 8.4e-4, 7.9e-4
    "movq_decoder": 2.5e-2,  # 1.3e-3, 1.1e-2
    "movq_encoder": 5e-3,  # 1.2e-3, 7.9e-4
}
TIMESTEPS = (999.0, 500.0, 1.0)


@dataclass(frozen=True)
class ParityResult:
    network: str
    precision: str
    max_abs: float
    max_rel: float
    tolerance: float
    profile: str = ""  # the profile (name) whose shapes were compared

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.passed else "FAIL"
        return (f"{self.network:<20} {self.precision}  {self.profile:<18} max abs {self.max_abs:.3e}  "
                f"max rel {self.max_rel:.3e}  (tolerance {self.tolerance:.0e})  {verdict}")


def tolerance(network: str, precision: str) -> float:
    return FP32_TOLERANCE if precision == "fp32" else FP16_TOLERANCE[network]


def verification_inputs(network: ResolvedNetwork) -> list[dict[str, np.ndarray]]:
    """Three input sets unlike the tracing inputs (seed 0, timestep 500): timestep 999, then 500 on
    every row, then rows at different timesteps (1, 999, 500, 1, ...): ``timestep`` is per row
    (``(B2,)``), so a graph that took one row's value for all rows fails."""
    sets = []
    for seed, t in enumerate(TIMESTEPS, start=1):
        feeds = sample_inputs(network, seed=seed)
        if "timestep" in feeds:
            shape = feeds["timestep"].shape
            per_row = np.resize(np.array((TIMESTEPS[-1], *TIMESTEPS[:-1]), np.float32), shape)
            feeds["timestep"] = per_row if t == TIMESTEPS[-1] else np.full(shape, t, np.float32)
        sets.append(feeds)
    return sets


def torch_reference(wrapper: torch.nn.Module, input_sets: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    """Outputs of the fp32 torch wrapper for every input set."""
    results = []
    with torch.no_grad():
        for feeds in input_sets:
            outs = wrapper(*(torch.from_numpy(a) for a in feeds.values()))
            results.append([o.detach().numpy().copy() for o in outs])
    return results


def onnx_outputs(onnx_path: Path, input_sets: list[dict[str, np.ndarray]]) -> list[list[np.ndarray]]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # fp16 graphs warn about CPU constant folding; not errors
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, feeds) for feeds in input_sets]


def onnx_outputs_by_shape(onnx_path: Path, inputs: dict) -> dict:
    """{key: outputs of each input set} for ``{key: input sets}``, from one session of ``onnx_path``."""
    if not inputs:
        return {}
    flat = [feeds for sets in inputs.values() for feeds in sets]
    outputs, found = iter(onnx_outputs(onnx_path, flat)), {}
    for key, sets in inputs.items():
        found[key] = [next(outputs) for _ in sets]
    return found


def compare(network: str, precision: str, reference: list[list[np.ndarray]], found: list[list[np.ndarray]],
            profile: str = "") -> ParityResult:
    max_abs = max_rel = 0.0
    for ref_set, got_set in zip(reference, found):
        for ref, got in zip(ref_set, got_set):
            if got.shape != ref.shape:
                return ParityResult(network, precision, float("inf"), float("inf"), tolerance(network, precision),
                                    profile)
            err = float(np.max(np.abs(got.astype(np.float64) - ref)))
            err = err if np.isfinite(err) else float("inf")  # NaN must fail, never compare as 0
            scale = float(np.max(np.abs(ref))) or 1.0
            max_abs, max_rel = max(max_abs, err), max(max_rel, err / scale)
    return ParityResult(network, precision, max_abs, max_rel, tolerance(network, precision), profile)
