"""torch -> ONNX for one spec network: one graph whose profile dims are symbolic.

The graph's batch and image dims (``spec.PROFILE_DIMS``) are ONNX ``dim_param`` names, so one graph
(one copy of the weights, on disk and in an ONNX Runtime session) serves every profile of an
artifacts set; TensorRT plans make them static again (one optimization profile per shape). The
trace runs at :func:`trace_profile`, a shape where no two symbolic dims are equal (so neither
exporter can merge them, nor specialise a dim of size 1); export's parity check then runs at every
profile of the set.

Exporter, chosen explicitly and recorded in the manifest:
- ``dynamo`` (default, ``torch.export`` + onnxscript): traces with fake tensors, so an fp16 graph is
  exported without running fp16 kernels on the CPU. Full-size fp16 UNet on 2 cores: 50 s and
  5.2 GB peak RSS; the TorchScript exporter had not finished its real fp16 forward after 8 min.
- ``legacy`` (TorchScript, ``dynamo=False``): 5-10x faster on tiny models (tiny UNet 1 s vs 10 s),
  which the test suite uses for most of its exports; the profile dims are ``dynamic_axes``.

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
from kandinsky_trt.runtime.contract.spec import (
    ModelDims, Profile, ResolvedNetwork, dim_values, resolve, resolve_graph)

log = logging.getLogger(__name__)

EXPORTERS = ("legacy", "dynamo")
OPSET = {"legacy": 17, "dynamo": 18}
_PROTOBUF_LIMIT = 2**31 - 1


class ExportError(KandinskyTrtError, RuntimeError):
    """An exported graph does not match the spec, or the exporter failed."""


@dataclass(frozen=True)
class ExportRequest:
    """``graph``: the spec's graph I/O (``spec.resolve_graph``); ``network``: the same at the trace
    shape; ``dim_values``: the profile dims' values at the trace and at every profile exported."""

    graph: ResolvedNetwork
    network: ResolvedNetwork
    policy: PrecisionPolicy
    out_dir: Path
    exporter: str = "dynamo"
    dim_values: tuple[dict[str, int], ...] = ()

    @classmethod
    def for_profiles(cls, name: str, profiles: tuple[Profile, ...], dims: ModelDims, policy: PrecisionPolicy,
                     out_dir: Path, exporter: str = "dynamo") -> "ExportRequest":
        """The request that exports network ``name`` once for every profile of ``profiles``."""
        traced = trace_profile(profiles[0])
        values = tuple(dim_values(p, dims) for p in (traced, *profiles))
        return cls(resolve_graph(name, dims), resolve(name, traced, dims), policy, Path(out_dir), exporter, values)


def trace_profile(first: Profile) -> Profile:
    """The shape traced: batch 2 (B2 4 with guidance) and an image larger than ``first`` by unequal
    steps, so that B, B2, h and w all differ, none is 1 and none equals a small static dim (the
    dynamo exporter specialises a dim whose trace value coincides with one)."""
    return Profile(2, first.height + 128, first.width + 256, first.cfg)


def _dim(d: onnx.TensorShapeProto.Dimension) -> int | str:
    return d.dim_param if d.HasField("dim_param") else d.dim_value


def check_graph_io(model: onnx.ModelProto, graph: ResolvedNetwork) -> None:
    """Raise ``ExportError`` unless the graph's ordered I/O equals the spec's graph I/O (dims by name)."""
    problems = []
    for kind, graph_io, expected in (("input", model.graph.input, graph.inputs),
                                     ("output", model.graph.output, graph.outputs)):
        found = [(v.name, v.type.tensor_type.elem_type,
                  tuple(_dim(d) for d in v.type.tensor_type.shape.dim)) for v in graph_io]
        wanted = [(t.name, DTYPE_TABLE[t.dtype].onnx, t.shape) for t in expected]
        if found != wanted:
            problems.append(f"{kind}s expected {wanted}, found {found}")
    if problems:
        raise ExportError(f"{graph.name}: graph I/O differs from the spec: " + "; ".join(problems))


def _symbolic_axes(graph: ResolvedNetwork) -> dict[str, dict[int, str]]:
    """{tensor: {axis: dim name}} of every profile dim of the graph's I/O."""
    axes = {t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)} for t in graph.inputs + graph.outputs}
    return {name: dims for name, dims in axes.items() if dims}


# The UNet halves its latent 3 times, so latent sides are multiples of 8 and image sides of 8 x the
# MoVQ scale factor (64 for Kandinsky 2.1); the exporter's shape guards must hold at every profile.
LATENT_STEP = 8


def _dim_steps(values: dict[str, int]) -> dict[str, int]:
    latent_scale = values["H"] // values["h"] if "H" in values and "h" in values else 8
    return {"h": LATENT_STEP, "w": LATENT_STEP, "H": LATENT_STEP * latent_scale, "W": LATENT_STEP * latent_scale}


def _dim_range(taken: list[int], step: int) -> tuple[int, int]:
    """``(min, max)`` in units of ``step`` of the values a dim takes, ``max > min`` always.

    torch.export refuses a ``Dim`` whose min equals its max ("Cannot create Dim with inconsistent
    min=4, max=4"), which is what a dim taking one value gives: a single ``--batch 2`` (the trace's
    batch), or any dim whose trace and profiles coincide. Such a range is widened by one step above,
    so the dim stays symbolic (the graph is still one graph with named dims) and its one value is in
    range; nothing is ever run at the extra value.
    """
    low, high = min(taken) // step, max(taken) // step
    return low, max(high, low + 1)


def _dynamic_shapes(graph: ResolvedNetwork, values: list[dict[str, int]]) -> tuple | None:
    """torch.export's ``dynamic_shapes``: one ``Dim`` per profile dim name (shared across inputs),
    its range the values it takes in ``values`` (the trace's and each profile's, see
    :func:`_dim_range`), image dims as multiples of their step, so that the exporter's shape guards
    hold on every profile."""
    from torch.export import Dim

    dims, steps = {}, _dim_steps(values[0])
    for name in dict.fromkeys(d for t in graph.inputs for d in t.shape if isinstance(d, str)):
        step = steps.get(name, 1)
        low, high = _dim_range([v[name] for v in values], step)
        dims[name] = step * Dim(f"{name}_steps", min=low, max=high) if step > 1 else Dim(name, min=low, max=high)
    if not dims:
        return None
    return tuple({i: dims[d] for i, d in enumerate(t.shape) if isinstance(d, str)} or None for t in graph.inputs)


def _torch_export(wrapper: torch.nn.Module, args: tuple, path: Path, request: ExportRequest) -> None:
    names = dict(input_names=request.network.input_names, output_names=request.network.output_names)
    with torch.no_grad(), warnings.catch_warnings():
        # Tracer warnings flag Python branches on shapes; parity at every profile checks them.
        warnings.simplefilter("ignore")
        if request.exporter == "dynamo":
            shapes = _dynamic_shapes(request.graph, request.dim_values)
            program = torch.onnx.export(wrapper, args, dynamo=True, opset_version=OPSET["dynamo"],
                                        dynamic_shapes=shapes, verbose=log.isEnabledFor(logging.DEBUG), **names)
            program.save(str(path), external_data=True)
        else:
            torch.onnx.export(wrapper, args, str(path), dynamo=False, opset_version=OPSET["legacy"],
                              do_constant_folding=True, dynamic_axes=_symbolic_axes(request.graph), **names)


def _stamp_io_shapes(model: onnx.ModelProto, graph: ResolvedNetwork) -> None:
    """Write the spec's graph shapes (integers, profile dims by name) into the graph's I/O.

    The exporters name symbolic dims their own way (``s0``, ``batch_size``...) and cannot always
    infer an output shape (the prior's output is data-dependent indexing); parity runs at every
    profile check the real shapes.
    """
    for values, tensors in ((model.graph.input, graph.inputs), (model.graph.output, graph.outputs)):
        for value, tensor in zip(values, tensors):
            dims = value.type.tensor_type.shape.dim
            if len(dims) != len(tensor.shape):
                continue  # left for check_graph_io to report
            for dim, size in zip(dims, tensor.shape):
                dim.Clear()
                if isinstance(size, str):
                    dim.dim_param = size
                else:
                    dim.dim_value = size


def _save_single_file(src: Path, dst_dir: Path, graph: ResolvedNetwork) -> list[Path]:
    """Re-save ``src`` as ``name.onnx`` (+ one ``name.onnx.data`` when over 2 GB) in ``dst_dir``."""
    name = graph.name
    model = onnx.load(str(src), load_external_data=True)
    _stamp_io_shapes(model, graph)
    del model.graph.value_info[:]  # the exporter's own dim names; ONNX Runtime infers these again
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
        files = _save_single_file(raw_dir / f"{name}.onnx", Path(tmp), request.graph)
        shutil.rmtree(raw_dir)
        check_graph_io(onnx.load(str(files[0]), load_external_data=False), request.graph)
        final = [request.out_dir / f.name for f in files]
        for src, dst in reversed(list(zip(files, final))):
            src.replace(dst)
    log.debug("exported %s (%s) -> %s", name, request.policy.precision, final[0])  # a staging folder
    return final
