"""The fp16 precision policy: which parts of each network stay fp32 inside an fp16 graph.

TensorRT 11 builds strongly typed networks only (no ``BuilderFlag.FP16``), so precision lives in the
ONNX graph. We export the torch module in fp16 and keep *fp32 islands*: the island modules get fp32
weights and cast their input up and their output back down, which the exporter records as Cast
nodes around an fp32 op.

Islands (``FP16_ISLANDS``), each kept for a measured or documented reason:

- ``timestep_embedding``: sin/cos of ``t * freq`` with t up to 999 needs fp32 (fp16 resolution near
  999 is 0.5). diffusers already computes it in fp32 and casts after, so nothing to change.
- ``GroupNorm`` / ``LayerNorm``: variance of wide activations; TensorRT fp16 reductions drift.
- ``softmax``: attention probabilities in fp32 (diffusers' ``upcast_softmax``, honoured by the
  classic attention processors we switch to; the SDPA processors ignore it). MoVQ's single-head
  attention (head dim 512 over 4,096+ tokens) is the likeliest overflow spot.
- ``pooling``: MultilingualCLIP's masked mean over 77 tokens of XLM-R states, and its projection.

Islands can be added per export without editing this file: ``kandinsky-trt export --fp32-nodes
unet:down_blocks.0.resnets.0`` keeps that module of the UNet in fp32 (``fp32_modules``), which is what
``kandinsky-trt debug-precision`` suggests when an fp16 tensor leaves the fp16 range; the extra
islands enter the manifest's ``fp32_islands`` and the export's production hash.

Measured (README "Precision", benchmarks/results/cpu-2core_full-size_fp16-parity.json): on the
full-size networks with random weights the islands change the fp16 error by nothing measurable
(MoVQ decoder 1.11e-2 with or without them; M-CLIP 2.6e-3 vs 2.5e-3). Random weights do not have
the activation outliers of trained ones, so that neither confirms nor refutes the overflow risk;
the islands stay because they cost a few casts and guard the known fp16 failure modes.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from diffusers.models.attention_processor import AttnAddedKVProcessor, AttnProcessor

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError


class PrecisionPolicyError(KandinskyTrtError, ValueError):
    """A bad ``--fp32-nodes`` entry (syntax, network or module path)."""


@dataclass(frozen=True)
class PrecisionPolicy:
    precision: str  # "fp16" | "fp32"
    fp32_norms: bool = True
    fp32_softmax: bool = True
    fp32_modules: tuple[str, ...] = ()  # attribute paths of modules kept fp32 (e.g. pooling heads)
    has_timestep: bool = False  # the sinusoidal embedding is fp32 inside diffusers already

    @property
    def islands(self) -> tuple[str, ...]:
        """The names recorded in the manifest's ``fp32_islands``."""
        if self.precision == "fp32":
            return ()
        names = ["timestep_embedding"] if self.has_timestep else []
        names += ["GroupNorm", "LayerNorm"] if self.fp32_norms else []
        names += ["softmax"] if self.fp32_softmax else []
        return tuple(names + list(self.fp32_modules))

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16 if self.precision == "fp16" else torch.float32


FP32 = PrecisionPolicy("fp32")
FP16_ISLANDS: dict[str, PrecisionPolicy] = {
    "prior_text_encoder": PrecisionPolicy("fp16", fp32_softmax=False),
    "prior": PrecisionPolicy("fp16", fp32_softmax=False, has_timestep=True),
    "image_encoder": PrecisionPolicy("fp16", fp32_softmax=False),
    "text_encoder": PrecisionPolicy("fp16", fp32_softmax=False, fp32_modules=("LinearTransformation",)),
    "unet": PrecisionPolicy("fp16", has_timestep=True),
    "unet_inpaint": PrecisionPolicy("fp16", has_timestep=True),
    "movq_decoder": PrecisionPolicy("fp16"),
    "movq_encoder": PrecisionPolicy("fp16"),
}
PRECISIONS = ("fp16", "fp32")


def extra_islands(network: str, fp32_nodes: tuple[str, ...]) -> tuple[str, ...]:
    """The module paths of ``network`` among ``fp32_nodes`` entries ``NETWORK:MODULE_PATH``."""
    paths = []
    for item in fp32_nodes:
        name, sep, path = item.partition(":")
        if not sep or not path or name not in FP16_ISLANDS:
            raise PrecisionPolicyError(
                f"--fp32-nodes: expected NETWORK:MODULE_PATH with NETWORK one of {sorted(FP16_ISLANDS)} "
                f"(e.g. unet:down_blocks.0.resnets.0, as `debug-precision` prints it), found {item!r}")
        if name == network:
            paths.append(path)
    return tuple(dict.fromkeys(paths))


def policy_for(network: str, precision: str, fp32_nodes: tuple[str, ...] = ()) -> PrecisionPolicy:
    """``network``'s policy; ``fp32_nodes`` (``NETWORK:MODULE_PATH``) adds islands to fp16 policies."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, found {precision!r}")
    if precision == "fp32":
        return FP32
    policy = FP16_ISLANDS[network]
    extra = tuple(p for p in extra_islands(network, tuple(fp32_nodes)) if p not in policy.fp32_modules)
    return replace(policy, fp32_modules=policy.fp32_modules + extra) if extra else policy


def _cast(value, dtype: torch.dtype):
    """``value`` with its floating tensors (also inside plain tuples and lists) cast to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() else value
    if type(value) in (tuple, list):
        return type(value)(_cast(v, dtype) for v in value)
    return value


class Fp32Island(nn.Module):
    """Runs ``module`` in fp32 (every floating tensor argument cast up) and returns its output in the
    dtype of its first floating argument."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module.float()

    def forward(self, *args, **kwargs):
        dtype = next((a.dtype for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
        out = self.module(*_cast(list(args), torch.float32), **{k: _cast(v, torch.float32) for k, v in kwargs.items()})
        return out if dtype is None else _cast(out, dtype)


def _wrap_children(root: nn.Module, types: tuple[type, ...]) -> int:
    count = 0
    for name, child in list(root.named_children()):
        if isinstance(child, types):
            setattr(root, name, Fp32Island(child))
            count += 1
        elif not isinstance(child, Fp32Island):
            count += _wrap_children(child, types)
    return count


def _use_upcasting_attention(model: nn.Module) -> None:
    """Swap SDPA processors for the classic ones, which honour ``upcast_softmax``."""
    if not hasattr(model, "attn_processors"):
        return
    processors = {}
    for name, processor in model.attn_processors.items():
        kind = type(processor).__name__
        processors[name] = AttnAddedKVProcessor() if "AddedKV" in kind else AttnProcessor()
    model.set_attn_processor(processors)


def apply_policy(model: nn.Module, policy: PrecisionPolicy) -> nn.Module:
    """Convert ``model`` in place to ``policy`` (fp32: unchanged) and return it."""
    if policy.precision == "fp32":
        return model.float()
    if policy.fp32_softmax:
        _use_upcasting_attention(model)
    model.half()
    if policy.fp32_norms:
        _wrap_children(model, (nn.GroupNorm, nn.LayerNorm))
    for path in policy.fp32_modules:
        parent, _, attr = path.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
            target = getattr(owner, attr)
        except AttributeError:
            target = None
        if not isinstance(target, nn.Module):
            raise PrecisionPolicyError(f"--fp32-nodes: expected a module path of {type(model).__name__} "
                                       f"(e.g. down_blocks.0.resnets.0), found {path!r} (no such submodule)")
        setattr(owner, attr, Fp32Island(target))
    return model
