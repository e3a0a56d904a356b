"""Errors of the engine build (ONNX -> TensorRT plan), each naming what was expected and found.

:class:`TensorRTUnavailableError` lives in the runtime (the TensorRT backend raises it too; the
runtime may not import ``engine``) and is re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from kandinsky_trt.runtime.backends.trt_engine import TensorRTUnavailableError
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

__all__ = ["BuildConfigError", "EngineBuildError", "OnnxParseError", "TensorRTUnavailableError"]


class BuildConfigError(KandinskyTrtError, ValueError):
    """An invalid build argument; raised before TensorRT is imported."""


class EngineBuildError(KandinskyTrtError, RuntimeError):
    """TensorRT could not turn a network into a plan, or the plan disagrees with the manifest."""


class OnnxParseError(EngineBuildError):
    """TensorRT's ONNX parser rejected a graph; ``errors`` has one line per parser error (as TensorRT prints it)."""

    def __init__(self, network: str, onnx_path: Path, errors: list[str]) -> None:
        self.network = network
        self.errors = tuple(errors) or ("the parser reported failure without an error record",)
        super().__init__(
            f"{network}: TensorRT's ONNX parser expected a parsable graph in {onnx_path}, found "
            f"{len(self.errors)} error(s):\n  " + "\n  ".join(self.errors)
        )
