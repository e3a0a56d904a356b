"""Peak arithmetic rate and memory bandwidth of the GPUs the benchmarks run on.

These are the datasheet numbers the physical lower bound (:func:`kandinsky_trt.benchmarks.flops.lower_bound_ms`)
divides by. They are *dense* (no 2:4 sparsity) peaks at boost clock: NVIDIA datasheets print the
fp16 tensor figure with sparsity, so the value here is half of it. Sources are given per entry;
``perf_anchors.md`` is the project's research note (shared/reference/perf_anchors.md, §6).

Device names are matched by whole tokens, the way ``torch.cuda.get_device_name()`` and
``nvidia-smi --query-gpu=name`` print them, e.g. ``"NVIDIA H100 80GB HBM3"`` (the SXM part),
``"NVIDIA H100 PCIe"``, ``"NVIDIA H200"``, ``"NVIDIA A100-SXM4-80GB"``, ``"NVIDIA GeForce RTX 4090"``.
Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class GpuSpec:
    """Datasheet peaks of one GPU model.

    Args:
        name: a short model name, e.g. ``"H100 SXM"``.
        fp16_tensor_tflops: dense fp16 tensor-core peak with fp32 accumulate where the part runs
            both at the same rate (data-centre parts); see ``source`` where they differ.
        fp32_tflops: fp32 peak on the CUDA cores (no tensor cores, no TF32).
        memory_bandwidth_tbs: DRAM bandwidth in TB/s (10^12 bytes per second).
        source: where the numbers come from.
    """

    name: str
    fp16_tensor_tflops: float
    fp32_tflops: float
    memory_bandwidth_tbs: float
    source: str

    @property
    def fp16_flop_per_s(self) -> float:
        return self.fp16_tensor_tflops * 1e12

    @property
    def bytes_per_s(self) -> float:
        return self.memory_bandwidth_tbs * 1e12

    @property
    def ridge_flop_per_byte(self) -> float:
        """Arithmetic intensity above which a kernel is compute- rather than bandwidth-bound."""
        return self.fp16_flop_per_s / self.bytes_per_s


_HOPPER_DS = "NVIDIA H100 datasheet (fp16 tensor 1,979 TFLOPS with sparsity, halved)"

H100_SXM = GpuSpec(
    "H100 SXM", 989.4, 66.9, 3.35,
    f"perf_anchors.md §6 [V]; {_HOPPER_DS}; glennklockwood.com/garden/processors/h100 "
    "(989.4 dense fp16 matrix, 66.9 fp32 vector)",
)
H100_PCIE = GpuSpec(
    "H100 PCIe", 756.0, 51.0, 2.0,
    "perf_anchors.md §6 [V]; NVIDIA H100 datasheet (PCIe: fp16 tensor 1,513 TFLOPS with sparsity, "
    "fp32 51 TFLOPS, HBM2e 2.0 TB/s)",
)
H200_SXM = GpuSpec(
    "H200 SXM", 989.4, 66.9, 4.8,
    "perf_anchors.md §6 (same compute as H100 SXM; 4.8 TB/s HBM3e); NVIDIA H200 datasheet "
    "(fp16 tensor 1,979 TFLOPS with sparsity, fp32 67 TFLOPS)",
)
H200_NVL = GpuSpec(
    "H200 NVL", 835.5, 60.0, 4.8,
    "NVIDIA H200 datasheet, NVL column (fp16 tensor 1,671 TFLOPS with sparsity, fp32 60 TFLOPS, "
    "4.8 TB/s); not in perf_anchors.md",
)
A100_SXM_80GB = GpuSpec(
    "A100 SXM 80GB", 312.0, 19.5, 2.039,
    "perf_anchors.md §6 [U]; NVIDIA A100 datasheet (fp16 tensor 312/624 sparse, fp32 19.5, "
    "HBM2e 2,039 GB/s); glennklockwood.com/garden/processors/A100",
)
A100_SXM_40GB = GpuSpec(
    "A100 SXM 40GB", 312.0, 19.5, 1.555,
    "NVIDIA A100 datasheet (same compute as the 80GB part, HBM2 1,555 GB/s)",
)
A100_PCIE_80GB = GpuSpec(
    "A100 PCIe 80GB", 312.0, 19.5, 1.935,
    "NVIDIA A100 datasheet (PCIe 80GB: HBM2e 1,935 GB/s; same peak compute)",
)
L40S = GpuSpec(
    "L40S", 362.05, 91.6, 0.864,
    "NVIDIA L40S datasheet (fp16 tensor 362.05 / 733 sparse TFLOPS, fp32 91.6, GDDR6 864 GB/s)",
)
RTX_4090 = GpuSpec(
    "RTX 4090", 330.3, 82.6, 1.008,
    "NVIDIA Ada (AD102) whitepaper: fp16 tensor with fp16 accumulate 330.3 dense; with fp32 "
    "accumulate 165.2 (GeForce halves it). The higher rate is used so the bound stays a floor. "
    "fp32 82.6, GDDR6X 1,008 GB/s",
)

GPU_SPECS: tuple[GpuSpec, ...] = (
    H100_SXM, H100_PCIE, H200_SXM, H200_NVL, A100_SXM_80GB, A100_SXM_40GB, A100_PCIE_80GB, L40S, RTX_4090,
)

# (tokens that must all appear, tokens that must not appear, spec); the first match wins, so the
# more specific rule of a family comes first. None as the spec: a known part without a table entry.
_RULES: tuple[tuple[frozenset[str], frozenset[str], GpuSpec | None], ...] = (
    (frozenset({"H200", "NVL"}), frozenset(), H200_NVL),
    (frozenset({"H200"}), frozenset(), H200_SXM),
    (frozenset({"H100", "PCIE"}), frozenset(), H100_PCIE),
    (frozenset({"H100", "NVL"}), frozenset(), None),  # H100 NVL (94 GB, 3.9 TB/s) is not tabulated
    (frozenset({"H100"}), frozenset(), H100_SXM),  # "H100 80GB HBM3", "H100 SXM5 80GB"
    (frozenset({"A100", "PCIE", "80GB"}), frozenset(), A100_PCIE_80GB),
    (frozenset({"A100", "PCIE"}), frozenset(), None),  # 40GB PCIe not tabulated
    (frozenset({"A100", "80GB"}), frozenset(), A100_SXM_80GB),
    (frozenset({"A100", "40GB"}), frozenset(), A100_SXM_40GB),
    (frozenset({"L40S"}), frozenset(), L40S),
    (frozenset({"4090"}), frozenset({"D", "LAPTOP", "MOBILE"}), RTX_4090),
)


def _tokens(device_name: str) -> frozenset[str]:
    return frozenset(t for t in re.split(r"[\s\-_/,()]+", device_name.upper()) if t)


def lookup_gpu(device_name: str) -> GpuSpec | None:
    """The spec of the GPU called ``device_name``, or None for a device not in the table.

    Raises:
        TypeError: ``device_name`` is not a string.
    """
    if not isinstance(device_name, str):
        raise TypeError(f"device_name: expected a str, found {type(device_name).__name__}")
    tokens = _tokens(device_name)
    for required, forbidden, spec in _RULES:
        if required <= tokens and not (forbidden & tokens):
            return spec
    return None
