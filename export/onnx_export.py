"""torch -> ONNX for one spec network, at the profile's static shapes.

Exporter, chosen explicitly and recorded in the manifest:
- ``dynamo`` (default, ``torch.export`` + onnxscript): traces with fake tensors, so an fp16 graph is
  exported without running fp16 kernels on the CPU. Full-size fp16 UNet on 2 cores: 50 s and
  5.2 GB peak RSS; the TorchScript exporter had not finished its real fp16 forward after 8 min.
- ``legacy`` (TorchScript, ``dynamo=False``): 5-10x faster on tiny models (tiny UNet 1 s vs 10 s),
  which the test suite uses for most of its exports; shapes are static, so nothing dynamic is lost.

Graphs over 2 GB are stored with one external-data file (``<name>.onnx.data``).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch

from kandinsky_trt.export.precision import PrecisionPolicy, apply_policy
from kandinsky_trt.runtime.backends.base import sample_inputs
from kandinsky_trt.export.torch_modules import WRAPPERS
from kandinsky_trt.runtime.contract.dtypes import DTYPE_TABLE
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.contract.spec import ResolvedNetwork

log = logging.getLogger(__name__)

EXPORTERS = ("legacy", "dynamo")
OPSET = {"legacy": 17, "dynamo": 18}
_PROTOBUF_LIMIT = 2**31 - 1


class ExportError(KandinskyTrtError, RuntimeError):
    """An exported graph does not match the spec, or the exporter failed."""


@dataclass(frozen=True)
class ExportRequest:
    network: ResolvedNetwork
    policy: PrecisionPolicy
    out_dir: Path
    exporter: str = "dynamo"


def check_graph_io(model: onnx.ModelProto, network: ResolvedNetwork) -> None:
    """Raise ``ExportError`` unless the graph's ordered I/O equals the resolved spec."""
    problems = []
    for kind, graph_io, expected in (("input", model.graph.input, network.inputs),
                                     ("output", model.graph.output, network.outputs)):
        found = [(v.name, v.type.tensor_type.elem_type,
                  tuple(d.dim_value for d in v.type.tensor_type.shape.dim)) for v in graph_io]
        wanted = [(t.name, DTYPE_TABLE[t.dtype].onnx, t.shape) for t in expected]
        if found != wanted:
            problems.append(f"{kind}s expected {wanted}, found {found}")
    if problems:
        raise ExportError(f"{network.name}: graph I/O differs from the spec: " + "; ".join(problems))


def _torch_export(wrapper: torch.nn.Module, args: tuple, path: Path, request: ExportRequest) -> None:
    names = dict(input_names=request.network.input_names, output_names=request.network.output_names)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag Python branches on shapes; with static shapes they are expected.
        warnings.simplefilter("ignore")
        if request.exporter == "dynamo":
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=OPSET["dynamo"], **names)
            program.save(str(path), external_data=True)
        else:
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=OPSET["legacy"],
                              do_constant_folding=True, **names)


def _stamp_output_shapes(model: onnx.ModelProto, network: ResolvedNetwork) -> None:
    """Write the static output shapes into the graph where the exporter left them unknown.

    The exporter cannot always infer them (the prior's output is data-dependent indexing); every
    shape is static by construction, and parity runs check the real output shapes.
    """
    for value, tensor in zip(model.graph.output, network.outputs):
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(tensor.shape):
            continue  # left for check_graph_io to report
        for dim, size in zip(dims, tensor.shape):
            if dim.dim_value == 0:  # unknown or symbolic
                dim.Clear()
                dim.dim_value = size


def _save_single_file(src: Path, dst_dir: Path, network: ResolvedNetwork) -> list[Path]:
    """Re-save ``src`` as ``name.onnx`` (+ one ``name.onnx.data`` when over 2 GB) in ``dst_dir``."""
    name = network.name
    model = onnx.load(str(src), load_external_data=True)
    _stamp_output_shapes(model, network)
    path = dst_dir / f"{name}.onnx"
    exported_bytes = sum(f.stat().st_size for f in src.parent.iterdir())  # ByteSize() fails past 2 GB
    if exported_bytes < _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path))
        return [path]
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{name}.onnx.data", size_threshold=1024)
    return [path, dst_dir / f"{name}.onnx.data"]


def export_network(model: torch.nn.Module, request: ExportRequest) -> list[Path]:
    """Export ``model`` (fp32, eval) under ``request``; returns the written files, ONNX first.

    Files appear in ``request.out_dir`` only once complete (built in a temporary directory, then
    renamed; external data before the graph that references it).
    """
    if request.exporter not in EXPORTERS:
        raise ExportError(f"exporter: expected one of {EXPORTERS}, found {request.exporter!r}")
    name = request.network.name
    wrapper = WRAPPERS[name](apply_policy(model, request.policy), request.policy.dtype)
    args = tuple(torch.from_numpy(a) for a in sample_inputs(request.network).values())
    with tempfile.TemporaryDirectory(dir=request.out_dir, prefix=f".{name}.") as tmp:
        raw_dir = Path(tmp) / "raw"
        raw_dir.mkdir()
        _torch_export(wrapper, args, raw_dir / f"{name}.onnx", request)
        files = _save_single_file(raw_dir / f"{name}.onnx", Path(tmp), request.network)
        shutil.rmtree(raw_dir)
        check_graph_io(onnx.load(str(files[0]), load_external_data=False), request.network)
        final = [request.out_dir / f.name for f in files]
        for src, dst in reversed(list(zip(files, final))):
            src.replace(dst)
    log.info("exported %s (%s) -> %s", name, request.policy.precision, final[0])
    return final
