"""Tiny checkpoints, local tokenizers and full-size configs.

The tiny checkpoints must load through diffusers' own ``from_pretrained`` offline and run every
Kandinsky 2.1 pipeline; the tokenizers' ``tokenizer.json`` must give the transformers ids with the
plain ``tokenizers`` package (what the runtime uses); the full-size networks must have the published
parameter counts (checked on the meta device, no memory).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kandinsky_trt.export import checkpoints
from kandinsky_trt.export.full_size import (
    WEIGHTED_NETWORKS,
    build_full_size_model,
    full_size_configs,
    parameter_count,
)
from kandinsky_trt.export.tokenizer_training import CLIP_VOCAB_SIZE, XLMR_VOCAB_SIZE

E, X = checkpoints.CLIP_DIM, checkpoints.TEXT_DIM
STEPS = 2
LONG_PROMPT = "a very long prompt about a red cat, " * 20  # ~180 tokens: truncation at 77
PROMPTS = ["", "a red cat in the rain, oil painting", "кошка на крыше 猫 🙂 Ελληνικά", LONG_PROMPT]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield checkpoints.write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


def _config(path) -> dict:
    return json.loads(path.read_text())


def _generator():
    return torch.Generator().manual_seed(0)


# --- layout and configs ----------------------------------------------------------------------


def test_layout_matches_the_hub_repos(ckpt):
    subfolders = {
        ckpt.prior: {"prior", "text_encoder", "image_encoder", "tokenizer", "scheduler", "image_processor"},
        ckpt.decoder: {"text_encoder", "tokenizer", "unet", "movq", "scheduler", "ddpm_scheduler"},
        ckpt.inpaint: {"text_encoder", "tokenizer", "unet", "movq", "scheduler", "ddpm_scheduler"},
    }
    for root, expected in subfolders.items():
        assert {p.name for p in root.iterdir() if p.is_dir()} == expected
        assert (root / "model_index.json").is_file()
    assert _config(ckpt.prior / "model_index.json")["image_processor"] == ["transformers", "CLIPImageProcessor"]
    assert _config(ckpt.decoder / "model_index.json")["text_encoder"] == ["kandinsky", "MultilingualCLIP"]
    for name in ("prior", "unet", "movq"):
        root = ckpt.prior if name == "prior" else ckpt.decoder
        assert (root / name / "diffusion_pytorch_model.safetensors").is_file()
    assert {p.name for p in (ckpt.prior / "tokenizer").iterdir()} == {
        "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
    assert {p.name for p in (ckpt.decoder / "tokenizer").iterdir()} == {
        "sentencepiece.bpe.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}


def test_tiny_configs_keep_the_real_architecture(ckpt):
    full = full_size_configs()
    unet, inpaint = _config(ckpt.decoder / "unet/config.json"), _config(ckpt.inpaint / "unet/config.json")
    for key in ("down_block_types", "mid_block_type", "up_block_types", "addition_embed_type",
                "encoder_hid_dim_type", "resnet_time_scale_shift", "out_channels", "flip_sin_to_cos"):
        assert unet[key] == full["unet"][key], key
    assert (unet["in_channels"], inpaint["in_channels"]) == (4, 9)
    assert (unet["cross_attention_dim"], unet["encoder_hid_dim"]) == (E, X)
    movq = _config(ckpt.decoder / "movq/config.json")
    assert 2 ** (len(movq["block_out_channels"]) - 1) == 8
    assert movq["norm_type"] == "spatial" and movq["down_block_types"] == full["movq"]["down_block_types"]
    mclip = _config(ckpt.decoder / "text_encoder/config.json")
    assert (mclip["transformerDimensions"], mclip["numDims"], mclip["vocab_size"]) == (X, E, XLMR_VOCAB_SIZE)
    clip_text = _config(ckpt.prior / "text_encoder/config.json")
    assert (clip_text["hidden_size"], clip_text["projection_dim"], clip_text["vocab_size"]) == (E, E, CLIP_VOCAB_SIZE)
    vision = _config(ckpt.prior / "image_encoder/config.json")
    assert (vision["image_size"], vision["patch_size"], vision["projection_dim"]) == (224, 14, E)
    ddim = _config(ckpt.decoder / "scheduler/scheduler_config.json")
    assert (ddim["_class_name"], ddim["steps_offset"], ddim["set_alpha_to_one"]) == ("DDIMScheduler", 1, False)


# --- diffusers pipelines load offline and run --------------------------------------------------


@pytest.fixture(scope="module")
def image_embeds(ckpt):
    from diffusers import KandinskyPriorPipeline

    pipe = KandinskyPriorPipeline.from_pretrained(ckpt.prior, local_files_only=True)
    std = pipe.prior.clip_std.detach()
    assert bool((std > 0).all()) and not torch.allclose(std, torch.ones_like(std))
    out = pipe("a red cat", num_inference_steps=STEPS, generator=_generator(), output_type="pt")
    return out.image_embeds, out.negative_image_embeds


def test_prior_pipeline(image_embeds):
    positive, negative = image_embeds
    assert positive.shape == negative.shape == (1, E)
    assert torch.isfinite(positive).all() and torch.isfinite(negative).all()
    assert not torch.equal(positive, negative)


def _check_images(images: np.ndarray) -> None:
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.float32
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0


def _latent_shapes() -> tuple[list, callable]:
    shapes = []
    return shapes, lambda step, t, latents: shapes.append(tuple(latents.shape))


def _decoder_call(image_embeds, callback, **kwargs):
    positive, negative = image_embeds
    return dict(prompt="a red cat", image_embeds=positive, negative_image_embeds=negative, height=64,
                width=64, num_inference_steps=STEPS, generator=_generator(), output_type="np",
                callback=callback, **kwargs)


def test_text2img_pipeline(ckpt, image_embeds):
    from diffusers import KandinskyPipeline

    pipe = KandinskyPipeline.from_pretrained(ckpt.decoder, local_files_only=True)
    shapes, callback = _latent_shapes()
    _check_images(pipe(**_decoder_call(image_embeds, callback)).images)
    assert shapes == [(1, 4, 8, 8)] * STEPS  # 64 px / MoVQ scale factor 8


def test_text2img_with_ddpm_scheduler(ckpt, image_embeds):
    """The learned-range DDPM path keeps all 8 UNet channels; its hub config is unverified."""
    from diffusers import DDPMScheduler, KandinskyPipeline

    scheduler = DDPMScheduler.from_pretrained(ckpt.decoder, subfolder="ddpm_scheduler", local_files_only=True)
    assert scheduler.config.variance_type == "learned_range"
    pipe = KandinskyPipeline.from_pretrained(ckpt.decoder, scheduler=scheduler, local_files_only=True)
    _check_images(pipe(**_decoder_call(image_embeds, None)).images)


def _pil_image():
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_img2img_pipeline(ckpt, image_embeds):
    from diffusers import KandinskyImg2ImgPipeline

    pipe = KandinskyImg2ImgPipeline.from_pretrained(ckpt.decoder, local_files_only=True)
    shapes, callback = _latent_shapes()
    _check_images(pipe(**_decoder_call(image_embeds, callback, image=_pil_image(), strength=0.5)).images)
    assert shapes == [(1, 4, 8, 8)]  # strength 0.5 of 2 steps


def test_inpaint_pipeline(ckpt, image_embeds):
    from diffusers import KandinskyInpaintPipeline

    pipe = KandinskyInpaintPipeline.from_pretrained(ckpt.inpaint, local_files_only=True)
    assert pipe.unet.config.in_channels == 9
    mask = np.zeros((64, 64), dtype=np.float32)
    mask[:32, :32] = 1.0
    shapes, callback = _latent_shapes()
    _check_images(pipe(**_decoder_call(image_embeds, callback, image=_pil_image(), mask_image=mask)).images)
    assert shapes == [(1, 4, 8, 8)] * STEPS


# --- determinism and atomic writes -------------------------------------------------------------


def _files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_differs(ckpt, tmp_path):
    again = checkpoints.write_tiny_checkpoint(tmp_path / "again", seed=0)
    for first, second in zip((ckpt.prior, ckpt.decoder, ckpt.inpaint), (again.prior, again.decoder, again.inpaint)):
        assert _files(first) == _files(second)
    from safetensors.torch import load_file

    other = checkpoints.write_tiny_checkpoint(tmp_path / "other", seed=1)
    weights = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(ckpt.decoder / weights), load_file(other.decoder / weights)
    assert a.keys() == b.keys() and not torch.equal(a["conv_in.weight"], b["conv_in.weight"])
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["decoder", "inpaint", "prior"]


def test_failed_write_keeps_the_previous_checkpoint(ckpt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    first = checkpoints.write_tiny_checkpoint(out, seed=0)
    before = _files(first.decoder)

    def fail(*args, **kwargs):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(checkpoints, "_save_decoder", fail)
    with pytest.raises(RuntimeError, match="simulated failure"):
        checkpoints.write_tiny_checkpoint(out, seed=1)
    assert _files(first.decoder) == before
    assert sorted(p.name for p in out.iterdir()) == ["decoder", "inpaint", "prior"]  # no staging left


def test_bad_seed_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="seed"):
        checkpoints.write_tiny_checkpoint(tmp_path, seed=-1)


# --- tokenizers ---------------------------------------------------------------------------------


def _both(folder):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True), Tokenizer.from_file(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("which", ["prior", "decoder"])
def test_tokenizer_json_gives_the_transformers_ids(ckpt, which):
    hf, fast = _both(getattr(ckpt, which) / "tokenizer")
    for prompt in PROMPTS:
        assert fast.encode(prompt).ids == hf(prompt)["input_ids"], prompt
    # The pipelines' call: pad to 77 with the pad token, truncate keeping the end token.
    fast.enable_truncation(max_length=77)
    fast.enable_padding(length=77, pad_id=hf.pad_token_id, pad_token=hf.pad_token)
    for prompt in PROMPTS:
        expected = hf(prompt, padding="max_length", max_length=77, truncation=True)
        encoding = fast.encode(prompt)
        assert encoding.ids == expected["input_ids"] and encoding.attention_mask == expected["attention_mask"]
    long = fast.encode(LONG_PROMPT)
    assert long.ids[0] == hf.bos_token_id and long.ids[-1] == hf.eos_token_id and sum(long.attention_mask) == 77


def test_clip_tokenizer_layout(ckpt):
    from transformers import CLIPTokenizer

    hf, _ = _both(ckpt.prior / "tokenizer")
    assert isinstance(hf, CLIPTokenizer) and len(hf) == CLIP_VOCAB_SIZE and hf.model_max_length == 77
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == ("<|startoftext|>", "<|endoftext|>", "<|endoftext|>")
    assert (hf.bos_token_id, hf.eos_token_id) == (CLIP_VOCAB_SIZE - 2, CLIP_VOCAB_SIZE - 1)  # eot is argmax
    ids = hf("Кошка 猫 🙂")["input_ids"]
    assert hf.eos_token_id not in ids[1:-1]  # byte-level: no unknown token, even for emoji
    assert hf("A Red CAT")["input_ids"] == hf("a red cat")["input_ids"]  # lowercased
    assert hf.convert_ids_to_tokens(hf("cat dog")["input_ids"])[-2].endswith("</w>")  # end-of-word suffix


def test_xlmr_tokenizer_layout(ckpt):
    import sentencepiece
    from transformers import XLMRobertaTokenizer

    folder = ckpt.decoder / "tokenizer"
    hf, _ = _both(folder)
    assert isinstance(hf, XLMRobertaTokenizer) and len(hf) == XLMR_VOCAB_SIZE
    assert hf.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>", "<mask>"]) == [0, 1, 2, 3, XLMR_VOCAB_SIZE - 1]
    spm = sentencepiece.SentencePieceProcessor(model_file=str(folder / "sentencepiece.bpe.model"))
    for prompt in ("a red cat in the rain", "кошка сидит на крыше старого дома", "一只可爱的小狗在花园里"):
        assert hf(prompt)["input_ids"] == [0] + [i + 1 for i in spm.encode(prompt)] + [2]  # fairseq offset
    assert 3 in hf("🙂")["input_ids"]  # a character absent from the corpus is <unk>


# --- full-size networks -------------------------------------------------------------------------

FULL_SIZE_PARAMETERS = {  # kandinsky_map.md §3, matching the Kandinsky-2 README (560M/1B/427M/1.22B/67M)
    "prior_text_encoder": 123_650_304, "prior": 1_022_030_080, "image_encoder": 303_966_208,
    "text_encoder": 560_677_632, "unet": 1_228_661_768, "unet_inpaint": 1_228_679_048,
    "movq_decoder": 67_832_495, "movq_encoder": 67_832_495,
}


@pytest.mark.parametrize("network", WEIGHTED_NETWORKS)
def test_full_size_parameter_counts_on_meta(network):
    model = build_full_size_model(network, device="meta")
    assert parameter_count(model) == FULL_SIZE_PARAMETERS[network]
    assert all(p.device.type == "meta" for p in model.parameters())


def test_full_size_random_init_is_real_and_seeded():
    """The materialised MoVQ (67M) decodes to finite values; same seed, same weights; buffers real."""
    movq = build_full_size_model("movq_decoder", seed=0)
    assert movq.decoder.conv_norm_out.norm_layer.weight.eq(1).all()
    with torch.no_grad():
        image = movq.decode(torch.randn(1, 4, 8, 8, generator=_generator()), force_not_quantize=True).sample
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    again = build_full_size_model("movq_decoder", seed=0).state_dict()
    assert all(torch.equal(v, again[k]) for k, v in movq.state_dict().items())
    clip = build_full_size_model("prior_text_encoder", seed=1)
    assert torch.equal(clip.text_model.embeddings.position_ids[0], torch.arange(77))


def test_unknown_network_is_rejected():
    with pytest.raises(ValueError, match="prior_step"):
        build_full_size_model("prior_step", device="meta")
