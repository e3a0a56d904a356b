"""What a plan builder takes and returns, shared by ``builder`` and ``polygraphy_builder`` (no cycle)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kandinsky_trt.runtime.contract.manifest import NetworkEntry


@dataclass(frozen=True)
class Platform:
    """The TensorRT and GPU a plan is built with (plans only load on the same pair)."""

    tensorrt_version: str  # full, e.g. "11.4.0.106"
    gpu_name: str
    compute_capability: str  # "9.0"


@dataclass(frozen=True)
class BuildRequest:
    """One network to build: its manifest entry, its ONNX path and the builder options."""

    entry: NetworkEntry
    onnx_path: Path
    opt_level: int
    workspace_bytes: int | None
    timing_cache: Path | None


@dataclass(frozen=True)
class BuiltPlan:
    """A serialized plan (bytes or a buffer such as TensorRT's ``IHostMemory``) and its activation size."""

    data: Any
    device_memory_bytes: int


class PlanBuilder(Protocol):
    def platform(self) -> Platform: ...
    def build(self, request: BuildRequest) -> BuiltPlan: ...
