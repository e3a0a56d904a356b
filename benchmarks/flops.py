"""FLOPs and bytes of one call of each spec network, and the physical lower bound they imply.

The count runs the real full-size module on the ``meta`` device (shapes only: no memory, no
weights, well under a second for the UNet) with exactly the inputs the runtime feeds it (the
resolved spec shapes), under :class:`torch.utils.flop_counter.FlopCounterMode`. That mode counts
2 FLOPs per multiply-accumulate of convolutions, matmuls and attention and ignores elementwise,
norm and softmax work, which is the right measure against a tensor-core peak.

Alongside it a dispatch mode records which parameters the forward actually reads (so the
``movq_decoder`` is not charged for the encoder half of the VQModel) and the bytes every non-view
op writes (an upper bound on activation traffic: every op unfused).

Needs torch and diffusers/transformers (the ``export`` extra); the benchmark harness imports it,
the runtime never does. Nothing is cached.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from kandinsky_trt.benchmarks.gpu_specs import GpuSpec
from kandinsky_trt.runtime.contract.spec import NETWORKS, Profile, ResolvedNetwork, resolve
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

log = logging.getLogger(__name__)

PRECISIONS = {"fp16": torch.float16, "fp32": torch.float32}

METHOD_FULL = "flop_counter_meta"
METHOD_NO_MASK = (
    "flop_counter_meta_without_attention_mask: XLM-R mask creation calls .item(), which meta tensors "
    "cannot; the transformer and projection head were counted without the mask (a mask changes no "
    "matmul FLOPs)"
)


class CostError(KandinskyTrtError, ValueError):
    """A network, precision or module that cannot be counted."""


@dataclass(frozen=True)
class ForwardCount:
    """What one forward pass costs.

    Args:
        flop: FLOPs (2 per multiply-accumulate) of convolutions, matmuls and attention.
        weight_bytes: bytes of the parameters the forward read (each counted once; embedding
            tables only for the gathered rows).
        param_count: number of elements of the parameters the forward touched.
        activation_bytes: bytes written by every non-view op, as if nothing were fused.
        flop_by_op: FLOPs per aten op name.
    """

    flop: int
    weight_bytes: int
    param_count: int
    activation_bytes: int
    flop_by_op: dict[str, int] = field(default_factory=dict)


class _TrafficMode(TorchDispatchMode):
    """Records the parameter bytes each op reads and the bytes each non-view op writes.

    An embedding lookup reads only the gathered rows of its table, so it is charged for
    ``min(indices, rows)`` rows, not the whole table (XLM-R's is 512 MB at fp16).
    """

    def __init__(self, params: dict[int, torch.Tensor]) -> None:
        super().__init__()
        self._params = params
        self.param_bytes: dict[int, int] = {}  # id -> bytes read (a parameter read twice counts once)
        self.output_bytes = 0

    def _record_reads(self, func, args, kwargs) -> None:
        for arg in tree_flatten((args, kwargs))[0]:
            if not (isinstance(arg, torch.Tensor) and id(arg) in self._params):
                continue
            nbytes = arg.numel() * arg.element_size()
            if func is torch.ops.aten.embedding.default and arg is args[0]:
                rows = min(args[1].numel(), arg.shape[0])
                nbytes = rows * (nbytes // max(arg.shape[0], 1))
            self.param_bytes[id(arg)] = max(self.param_bytes.get(id(arg), 0), nbytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self._record_reads(func, args, kwargs)
        out = func(*args, **kwargs)
        if not func.is_view:
            self.output_bytes += sum(
                t.numel() * t.element_size() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)
            )
        return out


def count_forward(module: torch.nn.Module, run: Callable[[], Any]) -> ForwardCount:
    """Count one forward: ``run()`` must call ``module`` (or one of its methods) once.

    Works on any device; on ``meta`` it allocates nothing. Parameters are matched by identity, so
    ``module`` must be the object whose parameters ``run`` uses.
    """
    params = {id(p): p for p in module.parameters()}
    traffic = _TrafficMode(params)
    with FlopCounterMode(display=False) as counter, traffic, torch.no_grad():
        run()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return ForwardCount(
        flop=int(counter.get_total_flops()),
        weight_bytes=sum(traffic.param_bytes.values()),
        param_count=sum(params[i].numel() for i in traffic.param_bytes),
        activation_bytes=traffic.output_bytes,
        flop_by_op=by_op,
    )


@dataclass(frozen=True)
class NetworkCost:
    """One call of a spec network at a profile.

    Args:
        network: spec network name.
        profile: the static build point.
        precision: ``"fp16"`` or ``"fp32"`` (the weight and activation element size).
        gflop: 10^9 FLOPs per call (2 per multiply-accumulate).
        weight_bytes: bytes of the parameters one call reads, at ``precision`` (2 bytes per
            parameter at fp16; an embedding table only for the rows gathered).
        activation_bytes_estimate: bytes written by every op unfused (an over-estimate of the
            activation traffic; not used by the bound), or None when not measured.
        io_bytes: bytes of the network's spec inputs and outputs (what any engine must read/write).
        method: how the numbers were obtained.
    """

    network: str
    profile: Profile
    precision: str
    gflop: float
    weight_bytes: int
    activation_bytes_estimate: int | None
    io_bytes: int
    method: str

    @property
    def min_bytes(self) -> int:
        """Bytes one call cannot avoid moving: every weight once, plus the inputs and outputs."""
        return self.weight_bytes + self.io_bytes

    def to_dict(self) -> dict:
        return {
            "network": self.network,
            "profile": self.profile.to_dict(),
            "precision": self.precision,
            "gflop": self.gflop,
            "weight_bytes": self.weight_bytes,
            "activation_bytes_estimate": self.activation_bytes_estimate,
            "io_bytes": self.io_bytes,
            "method": self.method,
        }


def lower_bound_ms(cost: NetworkCost, gpu: GpuSpec) -> float:
    """The physical floor for one call of ``cost`` on ``gpu``, in milliseconds.

    ``max(FLOPs / fp16 dense tensor peak, (weight + I/O bytes) / DRAM bandwidth)``: no
    implementation can do the arithmetic faster than the tensor cores' peak, nor finish before
    every weight has been read once from DRAM (the weights of the big networks far exceed L2).
    It is a floor, not a target: it ignores the elementwise/norm/softmax work, activation traffic,
    launch gaps and tile quantisation, so real fp16 kernels reach a fraction of it (published
    diffusion engines: 10-50 %, perf_anchors.md §6). The fp16 tensor peak is used at every
    precision, being the fastest rate the GPU has for these dtypes, so the bound also holds for
    fp32/TF32 runs (where it is loose).
    """
    compute_s = cost.gflop * 1e9 / gpu.fp16_flop_per_s
    memory_s = cost.min_bytes / gpu.bytes_per_s
    return max(compute_s, memory_s) * 1e3


def _meta_inputs(resolved: ResolvedNetwork, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Meta tensors of the spec shapes; float inputs at the compute dtype, masks all ones."""
    tensors = {}
    for t in resolved.inputs:
        spec_dtype = getattr(torch, t.dtype)  # the spec names are torch names too
        if spec_dtype.is_floating_point:
            tensors[t.name] = torch.empty(t.shape, dtype=dtype, device="meta")
        else:
            tensors[t.name] = torch.ones(t.shape, dtype=spec_dtype, device="meta")
    return tensors


def _io_bytes(resolved: ResolvedNetwork) -> int:
    return sum(t.nbytes for t in resolved.inputs + resolved.outputs)


def _forward(network: str, model: torch.nn.Module, x: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """The call the runtime's wrapper makes, as a thunk over meta inputs ``x``."""
    if network in ("unet", "unet_inpaint"):
        added = {"text_embeds": x["text_embeds"], "image_embeds": x["image_embeds"]}
        return lambda: model(
            x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"], added_cond_kwargs=added
        )
    if network == "movq_decoder":
        return lambda: model.decode(x["latents"], force_not_quantize=True)
    if network == "movq_encoder":
        return lambda: model.encode(x["image"])
    return lambda: model(**x)  # prior, prior_text_encoder, image_encoder, text_encoder: kwargs = spec names


def _text_encoder_without_mask(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """MultilingualCLIP minus the attention mask: transformer, mean pooling, projection head."""

    def run():
        hidden = model.transformer(input_ids=x["input_ids"])[0]
        return model.LinearTransformation(hidden.mean(dim=1))

    return run


def _build(network: str, dtype: torch.dtype, builder: Callable | None) -> torch.nn.Module:
    if builder is None:
        from kandinsky_trt.export.full_size import build_full_size_model as builder  # noqa: N813
    # .to(dtype) as well: a meta build may come back in its construction dtype (free on meta)
    return builder(network, device="meta", dtype=dtype).to(dtype).eval()


def network_cost(
    network: str, profile: Profile = Profile(), precision: str = "fp16", builder: Callable | None = None
) -> NetworkCost:
    """FLOPs and bytes of one call of spec network ``network`` at ``profile``.

    Args:
        builder: ``(network, device=, dtype=) -> module``; defaults to
            ``kandinsky_trt.export.full_size.build_full_size_model`` (real Kandinsky 2.1 configs).

    Raises:
        CostError: unknown network or precision, or a forward that fails on meta tensors.
    """
    if network not in NETWORKS:
        raise CostError(f"network: expected one of {sorted(NETWORKS)}, found {network!r}")
    if precision not in PRECISIONS:
        raise CostError(f"precision: expected one of {sorted(PRECISIONS)}, found {precision!r}")
    resolved = resolve(network, profile)
    model = _build(network, PRECISIONS[precision], builder)
    x = _meta_inputs(resolved, PRECISIONS[precision])
    method = METHOD_FULL
    try:
        count = count_forward(model, _forward(network, model, x))
    except (RuntimeError, NotImplementedError) as err:
        if network != "text_encoder":
            raise CostError(f"{network}: the forward failed on meta tensors: {err}") from err
        log.info("text_encoder: full forward failed on meta (%s); counting without the mask", err)
        method = METHOD_NO_MASK
        count = count_forward(model, _text_encoder_without_mask(model, x))
    return NetworkCost(
        network=network,
        profile=profile,
        precision=precision,
        gflop=count.flop / 1e9,
        weight_bytes=count.weight_bytes,
        activation_bytes_estimate=count.activation_bytes,
        io_bytes=_io_bytes(resolved),
        method=method,
    )


def network_costs(
    profile: Profile = Profile(), precision: str = "fp16", networks: tuple[str, ...] | None = None
) -> dict[str, NetworkCost]:
    """:func:`network_cost` of every spec network (or of ``networks``), in spec order."""
    return {name: network_cost(name, profile, precision) for name in (networks or tuple(NETWORKS))}
