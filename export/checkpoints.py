"""Generate tiny random-weight Kandinsky 2.1 checkpoints in diffusers format, offline.

Real checkpoints cannot be downloaded here, so this writes three folders laid out like the public
repos and loadable with the real ``from_pretrained`` code:

* ``prior/``   like ``kandinsky-community/kandinsky-2-1-prior``: model_index.json, prior,
  text_encoder, image_encoder, tokenizer, scheduler, image_processor;
* ``decoder/`` like ``kandinsky-community/kandinsky-2-1``: model_index.json, text_encoder
  (MultilingualCLIP), tokenizer, unet, movq, scheduler (DDIM), plus ``ddpm_scheduler``;
* ``inpaint/`` like ``kandinsky-community/kandinsky-2-1-inpaint``: as the decoder, UNet with 9 inputs.

Every network is the real architecture (:func:`kandinsky_trt.export.full_size.full_size_configs`)
with only its widths and depths scaled down (:func:`tiny_configs`); block types, conditioning types,
the MoVQ's four levels (scale factor 8) and the scheduler configs are the real ones; ``movq_levels=2``
gives the two-level MoVQ of diffusers' own Kandinsky test configuration (scale factor 2, latents of
pixels / 2), the other networks unchanged. Tokenizers are
trained locally (:mod:`kandinsky_trt.export.tokenizer_training`). Weights come from the modules'
own initialisation under ``torch.manual_seed(seed)`` (the caller's RNG state is left untouched), so
a seed always gives identical files.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kandinsky_trt.export.checkpoint_loading import CheckpointError
from kandinsky_trt.export.full_size import full_size_configs, instantiate
from kandinsky_trt.export.tokenizer_training import write_clip_tokenizer, write_xlmr_tokenizer

logger = logging.getLogger(__name__)

CLIP_DIM = 32  # E: CLIP embedding width (768 real)
TEXT_DIM = 48  # X: XLM-R hidden width (1024 real)
CHECKPOINTS = ("prior", "decoder", "inpaint")
OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinyCheckpoint:
    """The three checkpoint roots written by :func:`write_tiny_checkpoint`."""

    prior: Path
    decoder: Path
    inpaint: Path


def tiny_configs(clip_vocab: int, xlmr_vocab: int, movq_levels: int = 4) -> dict[str, dict]:
    """The full-size configs with widths/depths scaled down; everything else is the real value."""
    full = full_size_configs()
    small_transformer = {"intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4}
    return {
        # The prior reads last_hidden_state, so the CLIP text width must equal E (as 768 does).
        "prior_text_encoder": {**full["prior_text_encoder"], **small_transformer,
                               "vocab_size": clip_vocab, "hidden_size": CLIP_DIM, "projection_dim": CLIP_DIM},
        # Vision width differs from E as in the real model (1024 vs 768); 224 px / patch 14 kept.
        "image_encoder": {**full["image_encoder"], **small_transformer, "hidden_size": 40,
                          "projection_dim": CLIP_DIM},
        "prior": {**full["prior"], "num_attention_heads": 2, "attention_head_dim": 12,
                  "embedding_dim": CLIP_DIM, "num_layers": 1},
        "text_encoder": {**full["text_encoder"], **small_transformer, "vocab_size": xlmr_vocab,
                         "hidden_size": TEXT_DIM, "transformerDimensions": TEXT_DIM, "numDims": CLIP_DIM},
        "unet": {**full["unet"], **_tiny_unet()},
        "unet_inpaint": {**full["unet_inpaint"], **_tiny_unet()},
        "movq": {**full["movq"], **_tiny_movq(movq_levels)},
    }


def _tiny_movq(levels: int) -> dict:
    """The real level layout (attention at the deepest level) with ``levels`` levels: scale 2**(levels-1)."""
    return {
        "block_out_channels": [32] * (levels - 1) + [64], "layers_per_block": 1,
        "down_block_types": ["DownEncoderBlock2D"] * (levels - 1) + ["AttnDownEncoderBlock2D"],
        "up_block_types": ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * (levels - 1),
        "norm_num_groups": 8, "num_vq_embeddings": 12,
    }


def _tiny_unet() -> dict:
    return {
        "sample_size": 8, "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1,
        "norm_num_groups": 8, "attention_head_dim": 8, "cross_attention_dim": CLIP_DIM,
        "encoder_hid_dim": TEXT_DIM,
    }


def scheduler_configs() -> dict[str, dict]:
    """Constructor arguments of the three schedulers (kandinsky_map.md §2)."""
    linear = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 0.00085, "beta_end": 0.012}
    return {
        "prior": {"num_train_timesteps": 1000, "variance_type": "fixed_small_log", "prediction_type": "sample",
                  "clip_sample": True, "clip_sample_range": 10.0, "beta_schedule": "squaredcos_cap_v2"},
        "ddim": {**linear, "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1,
                 "prediction_type": "epsilon", "thresholding": False},
        # Unverified: the hub's ddpm_scheduler/scheduler_config.json could not be read; these are the
        # values proposed in diffusers PR #3783 (thresholding there: True; kept False as in DDIM).
        "ddpm": {**linear, "variance_type": "learned_range", "clip_sample": True, "clip_sample_range": 2.0,
                 "prediction_type": "epsilon", "thresholding": False},
    }


def _build_networks(configs: dict[str, dict]) -> dict:
    """Every network, in a fixed order (the weights depend on it)."""
    modules = {key: instantiate(key, configs[key]) for key in (
        "prior_text_encoder", "image_encoder", "prior", "text_encoder", "unet", "unet_inpaint", "movq")}
    prior = modules["prior"]
    with torch.no_grad():
        # The real CLIP statistics are not (0, 1): make the post-processing x*std + mean matter, and
        # give the (zero-initialised) learned embeddings values so an export that drops them shows.
        prior.clip_mean.copy_(0.5 * torch.randn_like(prior.clip_mean))
        prior.clip_std.copy_(0.5 + torch.rand_like(prior.clip_std))
        prior.positional_embedding.normal_(0.0, 0.02)
        prior.prd_embedding.normal_(0.0, 0.02)
    return modules


def _save_prior(folder: Path, modules: dict, tokenizer) -> None:
    from diffusers import KandinskyPriorPipeline, UnCLIPScheduler
    from transformers.utils import is_torchvision_available

    # Without torchvision transformers would substitute the PIL backend anyway (with a warning).
    if is_torchvision_available():
        from transformers import CLIPImageProcessor
    else:
        from transformers import CLIPImageProcessorPil as CLIPImageProcessor
    image_processor = CLIPImageProcessor(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
        crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD, do_convert_rgb=True,
    )
    pipe = KandinskyPriorPipeline(
        prior=modules["prior"], text_encoder=modules["prior_text_encoder"],
        image_encoder=modules["image_encoder"], tokenizer=tokenizer,
        scheduler=UnCLIPScheduler(**scheduler_configs()["prior"]), image_processor=image_processor,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _normalise_model_index(folder)


def _save_decoder(folder: Path, modules: dict, tokenizer, inpaint: bool) -> None:
    from diffusers import DDIMScheduler, DDPMScheduler, KandinskyInpaintPipeline, KandinskyPipeline

    pipeline_class = KandinskyInpaintPipeline if inpaint else KandinskyPipeline
    pipe = pipeline_class(
        text_encoder=modules["text_encoder"], tokenizer=tokenizer,
        unet=modules["unet_inpaint" if inpaint else "unet"], movq=modules["movq"],
        scheduler=DDIMScheduler(**scheduler_configs()["ddim"]),
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    # Not a pipeline component (absent from model_index.json): loaded explicitly with subfolder=.
    DDPMScheduler(**scheduler_configs()["ddpm"]).save_pretrained(folder / "ddpm_scheduler")


def _normalise_model_index(folder: Path) -> None:
    """Record the hub's class names where transformers substituted a backend-specific class.

    Without torchvision, ``CLIPImageProcessor`` constructs a ``CLIPImageProcessorPil``; the hub's
    model_index.json names ``CLIPImageProcessor``, which loads on either backend.
    """
    path = folder / "model_index.json"
    index = json.loads(path.read_text())
    entry = index.get("image_processor")
    if entry and entry[1] != "CLIPImageProcessor":
        index["image_processor"] = [entry[0], "CLIPImageProcessor"]
        path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _write_all(staging: Path, seed: int, movq_levels: int) -> None:
    # Tokenizers first: the embedding tables are sized from them. They do not touch torch's RNG.
    clip_tokenizer = write_clip_tokenizer(staging / "prior" / "tokenizer", seed)
    xlmr = {name: write_xlmr_tokenizer(staging / name / "tokenizer", seed) for name in ("decoder", "inpaint")}
    configs = tiny_configs(len(clip_tokenizer), len(xlmr["decoder"]), movq_levels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        modules = _build_networks(configs)
    _save_prior(staging / "prior", modules, clip_tokenizer)
    # The inpaint checkpoint shares the text encoder and MoVQ weights, as the real repos do.
    _save_decoder(staging / "decoder", modules, xlmr["decoder"], inpaint=False)
    _save_decoder(staging / "inpaint", modules, xlmr["inpaint"], inpaint=True)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Move each finished checkpoint into ``out_dir``, replacing an existing one only now."""
    for name in CHECKPOINTS:
        target, old = out_dir / name, staging / f"{name}.replaced"
        if target.exists():
            target.rename(old)
        try:
            (staging / name).rename(target)
        except OSError:
            if old.exists():
                old.rename(target)  # put the previous checkpoint back
            raise


def _check_out_dir(out_dir: Path) -> None:
    """Refuse a file where a folder must go, and a non-checkpoint folder that the swap would replace."""
    blocking = next((p for p in (out_dir, *out_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise CheckpointError(f"out: expected a directory (or a path to create), found {blocking} is a file")
    for name in CHECKPOINTS:
        target = out_dir / name
        if (target.exists() or target.is_symlink()) and not (target.is_dir() and (target / "model_index.json").is_file()):
            raise CheckpointError(f"out: expected {target} to be absent or an earlier checkpoint (with "
                                  f"model_index.json), found something else; it would be replaced")


def write_tiny_checkpoint(out_dir: Path, seed: int = 0, movq_levels: int = 4) -> TinyCheckpoint:
    """Write ``out_dir/{prior,decoder,inpaint}`` (tiny, random, deterministic for ``seed``).

    ``movq_levels`` sets the MoVQ's depth, so its scale factor ``2 ** (movq_levels - 1)`` (4: the real
    8; 2: diffusers' test configuration). The MoVQ is built last: the other weights do not depend on it.

    The checkpoints are written into a temporary directory inside ``out_dir`` and renamed into
    place only once all three are complete, so a failed run never leaves a partial checkpoint
    (a failure between the three renames could leave checkpoints of two generations, each whole).
    """
    out_dir = Path(out_dir)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CheckpointError(f"seed: expected a non-negative integer, found {seed!r}")
    if not isinstance(movq_levels, int) or isinstance(movq_levels, bool) or not 1 <= movq_levels <= 4:
        raise CheckpointError(f"movq_levels: expected an integer from 1 to 4, found {movq_levels!r}")
    _check_out_dir(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".tiny-checkpoint-", dir=out_dir))
    try:
        _write_all(staging, seed, movq_levels)
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("tiny checkpoint (seed %d) written to %s in %.1f s", seed, out_dir, time.perf_counter() - start)
    return TinyCheckpoint(*(out_dir / name for name in CHECKPOINTS))
