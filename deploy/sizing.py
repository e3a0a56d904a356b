"""The deployment's numbers that come from measurements (``benchmarks/results/``), not from taste.

- Start-up allowance: the slowest measured load rate (ONNX Runtime CPU session creation of the
  full-size fp16 UNet, worst of 5 samples, plus the worst first sha256 verification), per GB, times
  the measured size of the full-size artifact set (GiB), times a safety factor of 2. No GPU or TensorRT
  load has been measured: TensorRT deserialises plans instead of optimising graphs, so this CPU
  rate should over-estimate it, but a slow network volume could eat into the margin.
- Memory: the measured peak RSS of the full-size server (tritonserver + its Python stub, fp32, ONNX
  Runtime CPU) plus 25 %. On a GPU the weights live in device memory, so this over-asks host
  memory; it is the only measured figure.
- Volume: the measured artifact size plus 50 % (room for a TensorRT plan set beside the graphs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
HASH_STARTUP = RESULTS / "cpu-2core_full-size-unet-fp16_hash-startup.json"
SERVE_FULL_SIZE = RESULTS / "cpu-2core_full-size-256px-b2_fp32_serve-triton.json"

SAFETY = 2.0
PROBE_PERIOD_S = 10
MEMORY_HEADROOM = 1.25
CLAIM_HEADROOM = 1.5
GIB = 1024**3


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


@dataclass(frozen=True)
class StartupAllowance:
    """How long a pod may take to turn ready before the kubelet restarts it."""

    artifacts_gib: float  # measured size of the full-size artifact set's graphs
    load_s_per_gib: float  # worst measured session creation, per GiB of graph
    verify_s_per_gib: float  # worst measured first sha256 verification, per GiB
    safety: float = SAFETY
    period_s: int = PROBE_PERIOD_S

    @property
    def seconds(self) -> float:
        return self.safety * self.artifacts_gib * (self.load_s_per_gib + self.verify_s_per_gib)

    @property
    def failure_threshold(self) -> int:
        return math.ceil(self.seconds / self.period_s)

    @property
    def probe_window_s(self) -> int:
        """What the startup probe really allows: whole probe periods."""
        return self.failure_threshold * self.period_s


def startup_allowance(hash_startup: Path = HASH_STARTUP, serve: Path = SERVE_FULL_SIZE) -> StartupAllowance:
    h = _read(hash_startup)
    gib = h["total_bytes"] / GIB
    samples = h["samples_s"]
    return StartupAllowance(artifacts_gib=_read(serve)["memory"]["graph_files_gb"],  # GiB, despite the key
                            load_s_per_gib=max(samples["session_load_unverified"]) / gib,
                            verify_s_per_gib=max(samples["cold_verify"]) / gib)


def peak_server_rss_bytes(serve: Path = SERVE_FULL_SIZE) -> int:
    return int(_read(serve)["memory"]["peak_rss_mb_server_tree"] * 1024**2)


def memory_request(serve: Path = SERVE_FULL_SIZE) -> str:
    """Request = limit, whole GiB: the measured peak RSS plus 25 %."""
    return f"{math.ceil(peak_server_rss_bytes(serve) * MEMORY_HEADROOM / GIB)}Gi"


def claim_size(serve: Path = SERVE_FULL_SIZE) -> str:
    return f"{math.ceil(_read(serve)['memory']['graph_files_gb'] * CLAIM_HEADROOM)}Gi"  # the key holds GiB
