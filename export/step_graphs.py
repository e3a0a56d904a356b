"""The step graphs ``prior_step``, ``unet_step``, ``unet_inpaint_step``: guidance + scheduler update as ONNX.

Each denoising step runs the network, then one of these tiny elementwise float32 graphs (DESIGN §4). The
scheduler enters only through the per-step ``coefficients`` rows (``spec.COEFFICIENT_COLUMNS``), one per
latents row (``(B, K)``), with one ``guidance_scale`` per row (``(B, 1)``), so one graph serves every
supported scheduler and step count, and the rows of one call may each be at their own step; the numpy reference with the same operation
order is :func:`kandinsky_trt.runtime.contract.schedulers.apply_step`. Inputs and outputs come from the resolved
spec (``spec.STEP_NETWORKS``), never restated here. Built with ``onnx.helper`` (no torch needed).

The bridge graphs (``spec.BRIDGE_NETWORKS``, :func:`build_bridge_graph`) are built the same way: the
elementwise maths between two stages (the prior's CLIP mean/std post-processing, img2img's and
inpainting's start from the MoVQ latents of their images), so that a device
backend keeps a stage's output on the device; each repeats its numpy reference's operation order, so
ONNX Runtime on the CPU gives the host path's bits.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from kandinsky_trt.runtime.contract.integrity import write_bytes_atomic
from kandinsky_trt.runtime.contract.dtypes import DTYPE_TABLE
from kandinsky_trt.runtime.contract.spec import (
    COEFFICIENT_COLUMNS,
    KANDINSKY_2_1_DIMS,
    BRIDGE_NETWORKS,
    STEP_NETWORKS,
    ModelDims,
    ResolvedNetwork,
    SpecError,
    resolve_graph,
)

logger = logging.getLogger(__name__)

OPSET = 18


@dataclass
class _GraphBuilder:
    """Collects nodes and constant initializers; names are the graph's own (inputs keep spec names)."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)

    def op(self, op_type: str, inputs: list[str], output: str | list[str], **attrs) -> str | list[str]:
        outputs = [output] if isinstance(output, str) else output
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=f"{op_type}_{outputs[0]}", **attrs))
        return output

    def const(self, name: str, value) -> str:
        dtype = np.int64 if isinstance(value, (list, tuple)) and isinstance(value[0], int) else np.float32
        self.initializers.append(numpy_helper.from_array(np.array(value, dtype=dtype), name))
        return name


def _value_info(tensor) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(tensor.name, DTYPE_TABLE[tensor.dtype].onnx, list(tensor.shape))


def _per_row(g: _GraphBuilder, spec: ResolvedNetwork, name: str) -> str:
    """Input ``name`` ``(B, n)`` as ``(B, n, 1, 1)`` when the latents have rank 4, else as it is."""
    rank = len(spec.tensor("latents").shape)
    if rank == 2:
        return name
    if not any(init.name == "per_row_shape" for init in g.initializers):
        g.const("per_row_shape", [0, -1] + [1] * (rank - 2))
    return g.op("Reshape", [name, "per_row_shape"], f"{name}_per_row")


def _per_row_columns(g: _GraphBuilder, spec: ResolvedNetwork) -> None:
    """``c_<column>``: one value per latents row, shaped to broadcast against them.

    ``coefficients`` ``(B, K)`` is split on axis 1 into ``(B, 1)`` columns, as ``guidance_scale`` ``(B, 1)``
    is (:func:`_guidance`): they broadcast as they are against rank-2 latents (the prior's ``(B, E)``);
    against rank-4 latents (``(B, C, h, w)``) they are reshaped to ``(B, ..., 1, 1)`` first. Row b's value
    meets only row b's elements, so each row computes exactly what a one-row call with its scalars does.
    """
    coefficients = _per_row(g, spec, "coefficients")
    columns = [f"c_{c}" for c in COEFFICIENT_COLUMNS]
    g.op("Split", [coefficients], columns, axis=1, num_outputs=len(columns))


def _guidance(g: _GraphBuilder, spec: ResolvedNetwork, cfg: bool) -> tuple[str, str | None]:
    """eps (guided latent channels) and var (cond half of the extra channels, or None) from model_output."""
    channels = spec.tensor("latents").shape[1]
    out_channels = spec.tensor("model_output").shape[1]
    has_var = out_channels > channels
    if has_var:
        g.const("eps_lo", [0]), g.const("eps_hi", [channels]), g.const("var_hi", [out_channels])
        g.const("axis1", [1])

    def latent_part(src: str, name: str) -> str:
        return g.op("Slice", [src, "eps_lo", "eps_hi", "axis1"], name) if has_var else src

    var_src = "model_output"
    if cfg:
        g.op("Split", ["model_output"], ["out_uncond", "out_cond"], axis=0, num_outputs=2)
        uncond, cond = latent_part("out_uncond", "eps_uncond"), latent_part("out_cond", "eps_cond")
        g.op("Sub", [cond, uncond], "eps_delta")
        g.op("Mul", [_per_row(g, spec, "guidance_scale"), "eps_delta"], "eps_scaled")
        eps = g.op("Add", [uncond, "eps_scaled"], "eps")
        var_src = "out_cond"
    else:
        eps = latent_part("model_output", "eps")
    var = g.op("Slice", [var_src, "eps_hi", "var_hi", "axis1"], "var") if has_var else None
    return eps, var


def _std(g: _GraphBuilder, var: str | None) -> str:
    """std = s + learned * exp(0.5 * (log_var_min + (var + 1) * 0.5 * (log_var_max - log_var_min)))."""
    if var is None:  # no variance channels (the prior): the learned term does not exist
        return "c_s"
    g.const("one", 1.0), g.const("half", 0.5)
    g.op("Add", [var, "one"], "var_plus_one")
    g.op("Mul", ["var_plus_one", "half"], "var_frac")
    g.op("Sub", ["c_log_var_max", "c_log_var_min"], "log_var_span")
    g.op("Mul", ["var_frac", "log_var_span"], "log_var_offset")
    g.op("Add", ["c_log_var_min", "log_var_offset"], "log_var")
    g.op("Mul", ["half", "log_var"], "half_log_var")
    g.op("Exp", ["half_log_var"], "learned_std")
    g.op("Mul", ["c_learned", "learned_std"], "learned_term")
    return g.op("Add", ["c_s", "learned_term"], "std")


def _update(g: _GraphBuilder, eps: str, std: str) -> None:
    """x0 = clip(p*x + q*eps); x_next = u*x0 + v*x + w*eps + r*x0_prev + std*noise (left to right)."""
    g.op("Mul", ["c_p", "latents"], "p_x")
    g.op("Mul", ["c_q", eps], "q_eps")
    g.op("Add", ["p_x", "q_eps"], "x0_raw")
    g.op("Max", ["x0_raw", "c_clip_min"], "x0_low")
    g.op("Min", ["x0_low", "c_clip_max"], "x0")
    terms = [("c_u", "x0"), ("c_v", "latents"), ("c_w", eps), ("c_r", "x0_prev"), (std, "noise")]
    acc = None
    for i, (coefficient, tensor) in enumerate(terms):
        term = g.op("Mul", [coefficient, tensor], f"term{i}")
        acc = term if acc is None else g.op("Add", [acc, term], f"sum{i}" if i < len(terms) - 1 else "latents_next")


def _model_input(g: _GraphBuilder, spec: ResolvedNetwork, cfg: bool) -> None:
    """The next network input: [x; x] with guidance, then the inpaint conditioning along channels."""
    inpaint = "conditioning" in spec.input_names
    batch_out = "model_input" if not inpaint else "model_latents"
    if cfg:
        g.op("Concat", ["latents_next", "latents_next"], batch_out, axis=0)
    else:
        g.op("Identity", ["latents_next"], batch_out)
    if inpaint:
        g.op("Concat", [batch_out, "conditioning"], "model_input", axis=1)


def build_step_graph(name: str, cfg: bool, dims: ModelDims = KANDINSKY_2_1_DIMS) -> onnx.ModelProto:
    """The ONNX step graph ``name`` (a key of ``spec.STEP_NETWORKS``), checked with onnx.checker.

    Its batch and latent dims are symbolic (``spec.resolve_graph``): one graph serves every profile
    with guidance ``cfg``.

    Raises:
        SpecError: ``name`` is not a step network.
    """
    if name not in STEP_NETWORKS:
        raise SpecError(f"name: expected one of {sorted(STEP_NETWORKS)}, found {name!r}")
    spec = resolve_graph(name, dims)
    g = _GraphBuilder()
    _per_row_columns(g, spec)
    eps, var = _guidance(g, spec, cfg)
    _update(g, eps, _std(g, var))
    _model_input(g, spec, cfg)
    return _model(g, spec, {"coefficient_columns": ",".join(COEFFICIENT_COLUMNS), "cfg": str(cfg).lower()})


def _prior_embeds(g: _GraphBuilder) -> None:
    """``image_embeds = latents * clip_std + clip_mean`` (``pipelines.prior.image_embeds_of``)."""
    g.op("Mul", ["latents", "clip_std"], "scaled")
    g.op("Add", ["scaled", "clip_mean"], "image_embeds")


def _img2img_start(g: _GraphBuilder) -> None:
    """``latents = signal * (image_latents * sigma) + spread * noise`` per row
    (``schedulers.img2img_add_noise`` after the pipeline's ``* init_noise_sigma``)."""
    g.const("rows_4d", [0, -1, 1, 1])
    g.op("Reshape", ["coefficients", "rows_4d"], "per_row")
    g.op("Split", ["per_row"], ["sigma", "signal", "spread"], axis=1, num_outputs=3)
    g.op("Mul", ["image_latents", "sigma"], "scaled")
    g.op("Mul", ["signal", "scaled"], "signal_part")
    g.op("Mul", ["spread", "noise"], "noise_part")
    g.op("Add", ["signal_part", "noise_part"], "latents")


def _inpaint_start(g: _GraphBuilder) -> None:
    """``conditioning = [image_latents * keep, keep]`` and ``model_input = [latents, conditioning]``
    along channels (the decoder pipeline's start and the loop's first network input)."""
    g.op("Mul", ["image_latents", "keep"], "masked")
    g.op("Concat", ["masked", "keep"], "conditioning", axis=1)
    g.op("Concat", ["latents", "conditioning"], "model_input", axis=1)


_BRIDGES = {"prior_embeds": _prior_embeds, "img2img_start": _img2img_start, "inpaint_start": _inpaint_start}


def build_bridge_graph(name: str, dims: ModelDims = KANDINSKY_2_1_DIMS) -> onnx.ModelProto:
    """The ONNX bridge graph ``name`` (a key of ``spec.BRIDGE_NETWORKS``), symbolic in the profile
    dims like the step graphs, checked with onnx.checker.

    Raises:
        SpecError: ``name`` is not a bridge graph.
    """
    if name not in BRIDGE_NETWORKS:
        raise SpecError(f"name: expected one of {sorted(BRIDGE_NETWORKS)}, found {name!r}")
    spec = resolve_graph(name, dims)
    g = _GraphBuilder()
    _BRIDGES[name](g)
    return _model(g, spec, {})


def _model(g: _GraphBuilder, spec: ResolvedNetwork, props: dict) -> onnx.ModelProto:
    graph = helper.make_graph(
        g.nodes, spec.name, [_value_info(t) for t in spec.inputs], [_value_info(t) for t in spec.outputs],
        g.initializers)
    opset = helper.make_opsetid("", OPSET)
    model = helper.make_model(graph, opset_imports=[opset], producer_name="kandinsky_trt.export.step_graphs")
    model.ir_version = helper.find_min_ir_version_for([opset])
    if props:
        helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def write_step_graph(name: str, cfg: bool, dims: ModelDims, path: str | os.PathLike) -> Path:
    """Build the step graph and write it to ``path`` atomically (temporary file in the same folder, rename)."""
    path = Path(path)
    model = build_step_graph(name, cfg, dims)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(path, model.SerializeToString())
    logger.info("wrote %s (%s, cfg %s)", path, name, cfg)
    return path
