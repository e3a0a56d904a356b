"""Torch modules with the spec's contract: one thin ``nn.Module`` per network.

They are what export traces to ONNX and what the ``torch`` backend runs (the parity oracle), so
both see exactly the same call into the diffusers / transformers models. Imports torch: only the
torch backend and the export layer import this module.

Each ``forward`` takes exactly the spec's input names, in spec order, and returns the spec's outputs
as a tuple in spec order. Float inputs arrive as float32 and are cast to the compute dtype inside the
graph; float outputs leave as float32 (see ``runtime/contract/spec.py``), so fp16 artifacts keep fp32 I/O.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class _Wrapper(nn.Module):
    """Holds the wrapped model, casts floats in to its dtype and out to float32."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model.eval()
        self.dtype = dtype
        self.eval()  # a fresh Module is in training mode; XLM-R dropout would randomise outputs

    def cast_in(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)

    @staticmethod
    def cast_out(*xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.float() for x in xs)


class PriorTextEncoderWrapper(_Wrapper):
    """``CLIPTextModelWithProjection``, called as the prior pipeline does: without an attention mask."""

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids)
        return self.cast_out(out.text_embeds, out.last_hidden_state)


class PriorWrapper(_Wrapper):
    """``PriorTransformer``: the image-embedding prediction of one denoising step."""

    def forward(self, hidden_states, timestep, proj_embedding, encoder_hidden_states, attention_mask):
        out = self.model(
            self.cast_in(hidden_states),
            timestep=timestep,  # float32: the sinusoidal projection stays fp32 inside diffusers
            proj_embedding=self.cast_in(proj_embedding),
            encoder_hidden_states=self.cast_in(encoder_hidden_states),
            attention_mask=attention_mask,
        )
        return self.cast_out(out.predicted_image_embedding)


class ImageEncoderWrapper(_Wrapper):
    """``CLIPVisionModelWithProjection``: zero-image embedding and ``interpolate`` image conditions."""

    def forward(self, pixel_values):
        return self.cast_out(self.model(pixel_values=self.cast_in(pixel_values)).image_embeds)


class TextEncoderWrapper(_Wrapper):
    """``MultilingualCLIP``: masked-mean pooled projection and XLM-R hidden states."""

    def forward(self, input_ids, attention_mask):
        # MultilingualCLIP.forward, with the masked mean taken in fp32: an fp16 sum over 77 tokens
        # of XLM-R states can overflow. LinearTransformation is an fp32 island (export/precision.py).
        hidden = self.model.transformer(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(2).float()
        pooled = (hidden.float() * mask).sum(dim=1) / mask.sum(dim=1)
        projection = self.model.LinearTransformation
        # fp32 when the projection is an fp32 island (its weights are fp32), else the model dtype.
        text_embeds = projection(pooled.to(next(projection.parameters()).dtype))
        return self.cast_out(text_embeds, hidden)


class UNetWrapper(_Wrapper):
    """``UNet2DConditionModel`` with ``text_image`` conditioning (also the 9-channel inpaint UNet)."""

    def forward(self, sample, timestep, encoder_hidden_states, text_embeds, image_embeds):
        out = self.model(
            self.cast_in(sample),
            timestep,
            encoder_hidden_states=self.cast_in(encoder_hidden_states),
            added_cond_kwargs={"text_embeds": self.cast_in(text_embeds), "image_embeds": self.cast_in(image_embeds)},
        )
        return self.cast_out(out.sample)


class MovqDecoderWrapper(_Wrapper):
    """``VQModel.decode`` exactly as the pipelines call it: the quantizer is skipped."""

    def forward(self, latents):
        return self.cast_out(self.model.decode(self.cast_in(latents), force_not_quantize=True).sample)


class MovqEncoderWrapper(_Wrapper):
    """``VQModel.encode``: ``quant_conv(encoder(x))``, no quantisation (img2img and inpaint)."""

    def forward(self, image):
        return self.cast_out(self.model.encode(self.cast_in(image)).latents)


WRAPPERS: dict[str, type[_Wrapper]] = {
    "prior_text_encoder": PriorTextEncoderWrapper,
    "prior": PriorWrapper,
    "image_encoder": ImageEncoderWrapper,
    "text_encoder": TextEncoderWrapper,
    "unet": UNetWrapper,
    "unet_inpaint": UNetWrapper,
    "movq_decoder": MovqDecoderWrapper,
    "movq_encoder": MovqEncoderWrapper,
}


def _model_class(network: str):
    if network == "prior_text_encoder":
        from transformers import CLIPTextModelWithProjection as cls
    elif network == "image_encoder":
        from transformers import CLIPVisionModelWithProjection as cls
    elif network == "prior":
        from diffusers import PriorTransformer as cls
    elif network == "text_encoder":
        from diffusers.pipelines.kandinsky.text_encoder import MultilingualCLIP as cls
    elif network in ("unet", "unet_inpaint"):
        from diffusers import UNet2DConditionModel as cls
    else:
        from diffusers import VQModel as cls
    return cls


def load_module(network: str, component_dir: Path) -> nn.Module:
    """The diffusers / transformers model behind ``network``, from a local component folder, fp32, eval."""
    return _model_class(network).from_pretrained(component_dir).float().eval()
