"""The one dtype table: each tensor dtype as the spec, numpy, ONNX and ONNX Runtime name it.

Export (ONNX value infos), ONNX Runtime (session I/O and buffer checks), byte and FLOP counts and
:attr:`~kandinsky_trt.runtime.contract.spec.ResolvedTensor.nbytes` read it. Standard library only.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One tensor dtype as each layer names it: the spec / numpy name, its size, ONNX's and ORT's codes."""

    name: str  # the spec's and numpy's name
    itemsize: int
    onnx: int  # the ``onnx.TensorProto`` enum value (FLOAT = 1, INT64 = 7, BOOL = 9, FLOAT16 = 10)
    ort: str  # ONNX Runtime's type string (``NodeArg.type``, ``OrtValue.data_type()``)


# The one dtype table: export (ONNX value infos), ONNX Runtime (session and buffer checks), FLOP/byte counts.
DTYPE_TABLE: dict[str, DType] = {d.name: d for d in (
    DType("float32", 4, 1, "tensor(float)"), DType("float16", 2, 10, "tensor(float16)"),
    DType("int64", 8, 7, "tensor(int64)"), DType("bool", 1, 9, "tensor(bool)"),
)}
DTYPES = tuple(DTYPE_TABLE)
DTYPE_OF_ORT: dict[str, str] = {d.ort: d.name for d in DTYPE_TABLE.values()}  # "tensor(float)" -> "float32"
