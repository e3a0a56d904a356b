"""Load Kandinsky 2.1 networks from local diffusers-format checkpoints, and read their widths.

Uses the real ``from_pretrained`` code on local directories (no hub). Every dim the spec treats as
symbolic (``E``, ``X``, ``S``, the MoVQ scale factor ``f``) is read from one config and cross-checked
against every other config that must agree; the fixed dims (4 latent channels, 8 UNet outputs, 9
inpaint UNet inputs, text length 77) are checked too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kandinsky_trt.runtime.contract import spec
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.contract.spec import ModelDims, SpecError

# Weights that unpickle (and so can run code) when loaded: refused, safetensors expected.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(KandinskyTrtError, ValueError):
    """A checkpoint folder whose weights are missing or not in safetensors format."""


@dataclass(frozen=True)
class CheckpointDirs:
    """The three checkpoint roots (``inpaint`` optional), laid out like the public repos."""

    prior: Path
    decoder: Path
    inpaint: Path | None = None

    def root(self, which: str) -> Path:
        path = getattr(self, which)
        if path is None:
            raise SpecError(f"--{which}: expected a checkpoint directory for this network, found none")
        return Path(path)

    def component(self, network: str) -> Path:
        which, subfolder = spec.NETWORK_SOURCE[network]
        path = self.root(which) / subfolder
        if not (path / "config.json").is_file():
            raise SpecError(f"--{which}: expected {path}/config.json (a diffusers checkpoint), found no such file")
        return path


def networks_for(dirs: CheckpointDirs) -> list[str]:
    """The spec networks these checkpoints provide, in spec order."""
    return [n for n in spec.NETWORKS if n != "unet_inpaint" or dirs.inpaint is not None]


def check_weights(network: str, dirs: CheckpointDirs) -> Path:
    """``network``'s component folder, once it holds safetensors weights.

    Raises:
        CheckpointError: the folder holds only pickle weights (``*.bin`` ...), or no weights at all.
    """
    folder = dirs.component(network)
    if any(folder.glob("*.safetensors")):
        return folder
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder / pickles[0]}: expected safetensors weights (e.g. diffusion_pytorch_model.safetensors or "
            f"model.safetensors) for {network}, found a pickle file; re-save the checkpoint with "
            f"save_pretrained(..., safe_serialization=True) (pickles can run code when loaded)")
    raise CheckpointError(f"{folder}: expected safetensors weights for {network}, found no *.safetensors file")


def load_network(network: str, dirs: CheckpointDirs):
    """Load the torch module behind ``network`` in fp32, eval mode (safetensors weights only)."""
    from kandinsky_trt.export.torch_modules import load_module

    return load_module(network, check_weights(network, dirs))


def _config(dirs: CheckpointDirs, network: str) -> dict:
    return json.loads((dirs.component(network) / "config.json").read_text())


def _agree(what: str, expected: int, found: dict[str, int]) -> None:
    wrong = {k: v for k, v in found.items() if v != expected}
    if wrong:
        raise SpecError(f"{what}: expected {expected} everywhere, found " + ", ".join(f"{k}={v}" for k, v in wrong.items()))


def read_model_dims(dirs: CheckpointDirs) -> ModelDims:
    """Read the dims from the configs and fail loudly on any disagreement.

    Raises:
        SpecError: naming the config field, the expected value and the value found.
    """
    prior, unet, movq = _config(dirs, "prior"), _config(dirs, "unet"), _config(dirs, "movq_decoder")
    clip_text, clip_vision = _config(dirs, "prior_text_encoder"), _config(dirs, "image_encoder")
    mclip = _config(dirs, "text_encoder")
    dims = ModelDims(
        clip_dim=prior.get("embedding_dim", 768),
        text_dim=mclip["transformerDimensions"],
        image_size=clip_vision["image_size"],
        text_len=prior.get("num_embeddings", 77),
        # diffusers' movq_scale_factor: each MoVQ level after the first halves the image
        latent_scale=2 ** (len(movq["block_out_channels"]) - 1),
    )
    _agree("CLIP embedding width (E)", dims.clip_dim, {
        "prior_text_encoder.projection_dim": clip_text["projection_dim"],
        "image_encoder.projection_dim": clip_vision["projection_dim"],
        "text_encoder.numDims": mclip["numDims"],
        "unet.cross_attention_dim": unet["cross_attention_dim"],
    })
    _agree("XLM-R width (X)", dims.text_dim, {"unet.encoder_hid_dim": unet["encoder_hid_dim"]})
    _agree("text length (L)", 77, {"prior.num_embeddings": dims.text_len})
    _agree("latent channels", spec.LATENT_CHANNELS, {
        "movq.latent_channels": movq["latent_channels"], "unet.in_channels": unet["in_channels"]})
    _agree("UNet output channels", spec.UNET_OUT_CHANNELS, {"unet.out_channels": unet["out_channels"]})
    if dirs.inpaint is not None:
        inpaint = _config(dirs, "unet_inpaint")
        _agree("inpaint UNet input channels", spec.INPAINT_IN_CHANNELS, {"unet.in_channels": inpaint["in_channels"]})
        _agree("inpaint UNet output channels", spec.UNET_OUT_CHANNELS, {"unet.out_channels": inpaint["out_channels"]})
    return dims
