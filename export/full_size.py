"""The real, full-size Kandinsky 2.1 networks with random weights, built without downloading anything.

Used for speed and memory figures (timings do not depend on weight values). The configurations are
the published ones; each number cites its source:

* [convert]  diffusers ``scripts/convert_kandinsky_to_diffusers.py`` (UNET_CONFIG, INPAINT_UNET_CONFIG,
  MOVQ_CONFIG, ``PRIOR_CONFIG = {}`` i.e. PriorTransformer defaults);
* [K2]       ai-forever/Kandinsky-2 ``kandinsky2/configs.py`` CONFIG_2_1 (the original training configs);
* [card]     the model cards: M-CLIP/XLM-Roberta-Large-Vit-L-14 (xlm-roberta-large + Linear 1024->768),
  openai/clip-vit-large-patch14 (ViT-L/14 text and vision towers).
``/work/shared/reference/kandinsky_map.md`` §3 lists them with the parameter counts they give; the
hub ``config.json`` files themselves could not be read here (no hub), so the CLIP/M-CLIP values are
the standard ones of the named base models.

Fast random init: a 1.2B-parameter module initialised by its own ``reset_parameters`` takes minutes on
two CPU cores. The module is therefore constructed with every *parameter* redirected to the meta device
(buffers such as position ids and the prior's causal mask are still computed for real), then each
parameter is allocated once on the target device and filled with a cheap seeded init: uniform with
std ``1/sqrt(fan_in)`` for matrices/convolutions/embeddings, ones/zeros for norm weights/biases, zeros
for other biases. With ``device="meta"`` nothing is allocated at all (parameter counting).
"""

from __future__ import annotations

import contextlib
import logging
import math

import torch
from torch import nn

logger = logging.getLogger(__name__)

# Networks of the spec that have weights; the *_step graphs have none.
WEIGHTED_NETWORKS = (
    "prior_text_encoder", "prior", "image_encoder", "text_encoder",
    "unet", "unet_inpaint", "movq_decoder", "movq_encoder",
)
# network -> key of full_size_configs(); both MoVQ halves are one VQModel.
_CONFIG_KEY = {n: n for n in WEIGHTED_NETWORKS} | {"movq_decoder": "movq", "movq_encoder": "movq"}


def _unet_config(in_channels: int) -> dict:
    return {  # [convert] UNET_CONFIG / INPAINT_UNET_CONFIG (identical apart from in_channels)
        "sample_size": 64,  # 512 px / 8
        "in_channels": in_channels,  # 4 latents; inpaint 9 = latents 4 + masked-image latents 4 + mask 1
        "out_channels": 8,  # [K2] out_channels 8: eps 4 + learned variance 4 (learn_sigma True)
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
        "down_block_types": ["ResnetDownsampleBlock2D"] + ["SimpleCrossAttnDownBlock2D"] * 3,
        "mid_block_type": "UNetMidBlock2DSimpleCrossAttn",
        "up_block_types": ["SimpleCrossAttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"],
        "block_out_channels": [384, 768, 1152, 1536],  # [K2] num_channels 384, channel_mult "" = (1,2,3,4) at 64
        "layers_per_block": 3,  # [K2] num_res_blocks 3 (ResnetDown/Up: resblock_updown True)
        "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "norm_num_groups": 32, "norm_eps": 1e-5,
        "cross_attention_dim": 768,  # [K2] model_dim 768 (CLIP ViT-L/14 width)
        "encoder_hid_dim": 1024,  # [K2] text_encoder_in_dim1 1024 (XLM-R large width)
        "encoder_hid_dim_type": "text_image_proj",  # [K2] num_image_embs 10 image tokens + text
        "attention_head_dim": 64,  # [K2] num_head_channels 64; attention_resolutions 32,16,8
        "addition_embed_type": "text_image", "addition_embed_type_num_heads": 64,
        "resnet_time_scale_shift": "scale_shift",  # [K2] use_scale_shift_norm True
        "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional", "class_embed_type": None,
        "only_cross_attention": False, "upcast_attention": False, "use_linear_projection": False,
        "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_norm": None,
    }


def _movq_config() -> dict:
    return {  # [convert] MOVQ_CONFIG; [K2] ch 128, ch_mult [1,2,2,4], num_res_blocks 2, n_embed 16384,
        # embed_dim/z_channels 4, attn_resolutions [32] (the last, 32x32 level of a 256 input)
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "vq_embed_dim": 4,
        "num_vq_embeddings": 16384, "block_out_channels": [128, 256, 256, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 3 + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 3,
        "layers_per_block": 2, "norm_type": "spatial", "norm_num_groups": 32,
        "act_fn": "silu", "scaling_factor": 0.18215,  # unused by the Kandinsky pipelines
    }


def full_size_configs() -> dict[str, dict]:
    """Constructor keyword arguments of every real network, a fresh dict on every call, by component:
    ``prior_text_encoder`` (``CLIPTextConfig``), ``image_encoder`` (``CLIPVisionConfig``), ``prior``
    (``PriorTransformer``), ``text_encoder`` (``MCLIPConfig``), ``unet``, ``unet_inpaint``
    (``UNet2DConditionModel``), ``movq`` (``VQModel``)."""
    return {
        "prior_text_encoder": {  # [card] openai/clip-vit-large-patch14 text_config
            "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
            "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
            # The openai config keeps the legacy ids (eos 2): pooling then takes argmax(input_ids),
            # i.e. the first <|endoftext|>, which has the largest id.
            "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
        },
        "image_encoder": {  # [card] openai/clip-vit-large-patch14 vision_config
            "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
            "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "num_channels": 3,
            "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 768,
        },
        "prior": {  # [convert] PRIOR_CONFIG = {} -> PriorTransformer defaults, written out
            "num_attention_heads": 32, "attention_head_dim": 64,  # [K2] xf_heads 32, xf_width 2048
            "num_layers": 20,  # [K2] xf_layers 20
            "embedding_dim": 768,  # [K2] clip_dim 768
            "num_embeddings": 77,  # [K2] text_ctx 77
            "additional_embeddings": 4, "dropout": 0.0, "time_embed_act_fn": "silu",
            "norm_in_type": None, "embedding_proj_norm_type": None,
            "encoder_hid_proj_type": "linear", "added_emb_type": "prd",
        },
        "text_encoder": {  # [card] M-CLIP/XLM-Roberta-Large-Vit-L-14 = xlm-roberta-large + Linear
            "transformerDimensions": 1024, "numDims": 768,  # [K2] text_enc_params in 1024 / out 768
            "vocab_size": 250002, "hidden_size": 1024, "num_hidden_layers": 24,
            "num_attention_heads": 16, "intermediate_size": 4096, "hidden_act": "gelu",
            "max_position_embeddings": 514, "type_vocab_size": 1, "layer_norm_eps": 1e-5,
            "bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2,
        },
        "unet": _unet_config(4),
        "unet_inpaint": _unet_config(9),
        "movq": _movq_config(),
    }


def instantiate(component: str, config: dict) -> nn.Module:
    """Construct the module of ``component`` (a key of :func:`full_size_configs`) from ``config``.

    Shared with the tiny-checkpoint generator, which passes scaled-down configs.
    """
    if component == "prior_text_encoder":
        from transformers import CLIPTextConfig, CLIPTextModelWithProjection

        return CLIPTextModelWithProjection(CLIPTextConfig(**config))
    if component == "image_encoder":
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        return CLIPVisionModelWithProjection(CLIPVisionConfig(**config))
    if component == "text_encoder":
        from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP

        return MultilingualCLIP(MCLIPConfig(**config))
    if component == "prior":
        from diffusers import PriorTransformer

        return PriorTransformer(**config)
    if component in ("unet", "unet_inpaint"):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)
    if component == "movq":
        from diffusers import VQModel

        return VQModel(**config)
    raise ValueError(f"component: expected one of {sorted(full_size_configs())}, found {component!r}")


@contextlib.contextmanager
def _parameters_on_meta():
    """Register every new parameter on the meta device (no memory, no init cost); buffers stay real.

    Patches ``nn.Module.register_parameter`` for the duration of the block (restored on exit), the
    same technique as accelerate's ``init_empty_weights(include_buffers=False)``.
    """
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def _fill_(tensor: torch.Tensor, name: str, in_norm: bool, generator: torch.Generator) -> None:
    if in_norm:  # LayerNorm / GroupNorm affine: the identity transform, as torch initialises them
        tensor.fill_(1.0 if name == "weight" else 0.0)
    elif tensor.ndim < 2:  # biases
        tensor.zero_()
    else:  # matrices, conv kernels, embeddings, positional tables: std 1/sqrt(fan_in) keeps activations O(1)
        bound = math.sqrt(3.0 / (tensor.numel() // tensor.shape[0]))
        tensor.uniform_(-bound, bound, generator=generator)  # ~2x cheaper than normal_ on CPU


def materialize_(model: nn.Module, device: str | torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """Allocate every meta parameter of ``model`` on ``device`` in ``dtype`` and fill it (seeded).

    Shared parameters stay shared. Buffers are moved to ``device`` (floating ones cast to ``dtype``).
    """
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    norm_types = (nn.LayerNorm, nn.GroupNorm)
    created: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is None:
                continue
            if id(param) not in created:
                data = torch.empty(param.shape, device=device, dtype=dtype)
                _fill_(data, name, isinstance(module, norm_types), generator)
                created[id(param)] = nn.Parameter(data, requires_grad=param.requires_grad)
            module._parameters[name] = created[id(param)]
        for name, buffer in list(module._buffers.items()):
            if buffer is not None:  # cast floating buffers only (ids and masks keep their dtype)
                module._buffers[name] = buffer.to(device, dtype if buffer.is_floating_point() else buffer.dtype)
    return model


def build_full_size_model(
    network: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """The diffusers/transformers module behind spec ``network`` at full size, random weights, eval mode.

    ``device="meta"`` builds it without allocating anything (for counting parameters). Both
    ``movq_decoder`` and ``movq_encoder`` return the whole ``VQModel``.

    Raises:
        ValueError: ``network`` is not one of :data:`WEIGHTED_NETWORKS`.
    """
    if network not in _CONFIG_KEY:
        raise ValueError(f"network: expected one of {list(WEIGHTED_NETWORKS)}, found {network!r}")
    component = _CONFIG_KEY[network]
    config = full_size_configs()[component]
    if torch.device(device).type == "meta":
        with torch.device("meta"):
            return instantiate(component, config).eval()
    with _parameters_on_meta():
        model = instantiate(component, config)
    logger.info("materialising full-size %s on %s (%s)", network, device, dtype)
    return materialize_(model, device, dtype, seed).eval()


def parameter_count(model: nn.Module) -> int:
    """Number of distinct parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())
