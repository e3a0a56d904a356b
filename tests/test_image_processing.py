"""runtime.image_processing against the diffusers / transformers code it mirrors.

Tolerances: every comparison below is exact (max abs diff 0) unless stated; the functions repeat
the same float32 operations in the same order, so any difference is a real divergence.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime.processing import images as ip

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
F = torch.nn.functional


def _rand_image(rng: np.random.Generator, h: int, w: int, mode: str = "RGB") -> Image.Image:
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode=mode)


def _rand_mask_pil(rng: np.random.Generator, h: int, w: int) -> Image.Image:
    """Smooth-ish random greyscale mask (a blocky field upsampled), so LANCZOS has edges to ring on."""
    coarse = rng.integers(0, 256, size=(max(h // 8, 1), max(w // 8, 1)), dtype=np.uint8)
    return Image.fromarray(coarse, mode="L").resize((w, h), Image.NEAREST)


@pytest.fixture(scope="module")
def vae_processor():
    from diffusers.image_processor import VaeImageProcessor

    # KandinskyImg2ImgPipeline's own settings (pipeline_kandinsky_img2img.py)
    return VaeImageProcessor(vae_scale_factor=8, vae_latent_channels=4, resample="bicubic", reducing_gap=1)


# ---------------------------------------------------------------- img2img


@pytest.mark.parametrize("src_hw, size", [((300, 300), 64), ((97, 131), 128), ((512, 384), 256), ((40, 40), 96)])
def test_img2img_pil_square_matches_diffusers(vae_processor, src_hw, size):
    image = _rand_image(np.random.default_rng(size), *src_hw)
    # The pipeline calls preprocess(image, width, height); for square sizes the swap is harmless.
    expected = vae_processor.preprocess(image, size, size).numpy()
    ours = ip.prepare_img2img_image(image, size, size)
    assert ours.dtype == np.float32 and ours.shape == (1, 3, size, size)
    assert np.array_equal(ours, expected)


def test_img2img_reducing_gap_matters_and_is_reproduced(vae_processor):
    """A 6x downscale where PIL's reducing_gap=1 (a box pre-reduction) changes pixels."""
    image = _rand_image(np.random.default_rng(1), 384, 384)
    ours = ip.prepare_img2img_image(image, 64, 64)
    assert np.array_equal(ours, vae_processor.preprocess(image, 64, 64).numpy())
    plain = np.asarray(image.resize((64, 64), Image.BICUBIC)).astype(np.float32) / 255 * 2 - 1
    assert np.abs(ours[0].transpose(1, 2, 0) - plain).max() > 1e-3  # the test can tell them apart


def test_img2img_non_square_fixes_the_swap(vae_processor):
    image = _rand_image(np.random.default_rng(2), 200, 300)
    ours = ip.prepare_img2img_image(image, 64, 128)  # height 64, width 128
    assert ours.shape == (1, 3, 64, 128)
    # diffusers' preprocess called with the right argument order gives the same tensor ...
    assert np.array_equal(ours, vae_processor.preprocess(image, 64, 128).numpy())
    # ... while the pipeline's swapped call produces the transposed size (kandinsky_map §1.4).
    assert tuple(vae_processor.preprocess(image, 128, 64).shape) == (1, 3, 128, 64)


@pytest.mark.parametrize("src_hw", [(64, 64), (50, 70), (33, 128)])
def test_img2img_numpy_float_matches_diffusers(vae_processor, src_hw):
    array = np.random.default_rng(3).random((*src_hw, 3), dtype=np.float32)
    expected = vae_processor.preprocess(array, 64, 64).numpy()
    assert np.array_equal(ip.prepare_img2img_image(array, 64, 64), expected)


def test_img2img_numpy_uint8_is_scaled_and_rgba_converted():
    rng = np.random.default_rng(4)
    array = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    out = ip.prepare_img2img_image(array, 64, 64)
    assert np.array_equal(out[0].transpose(1, 2, 0), array.astype(np.float32) / np.float32(255) * 2 - 1)
    rgba = _rand_image(rng, 64, 64, "RGBA")
    assert ip.prepare_img2img_image(rgba, 64, 64).shape == (1, 3, 64, 64)  # divergence: RGB, not 4 channels
    grey = _rand_image(rng, 64, 64, "L")
    out = ip.prepare_img2img_image(grey, 64, 64)
    assert np.array_equal(out[0, 0], out[0, 2])


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((64, 64), np.float32), "HxWx3"),
        (np.zeros((64, 64, 4), np.uint8), "HxWx3"),
        (np.full((64, 64, 3), 2.0, np.float32), r"\[0, 1\]"),
        (np.full((64, 64, 3), np.nan, np.float32), r"\[0, 1\]"),
        (np.zeros((64, 64, 3), np.int32), "dtype"),
        ("image.png", "PIL.Image"),
    ],
)
def test_img2img_bad_inputs(bad, match):
    with pytest.raises(ip.ImageInputError, match=match):
        ip.prepare_img2img_image(bad, 64, 64)


def test_bad_sizes():
    image = Image.new("RGB", (64, 64))
    with pytest.raises(ip.ImageInputError, match="height"):
        ip.prepare_img2img_image(image, 60, 64)
    with pytest.raises(ip.ImageInputError, match="width"):
        ip.prepare_inpaint_inputs(image, image, 64, 0)


# ---------------------------------------------------------------- nearest + erosion


def test_nearest_indices_match_torch():
    for src in (7, 16, 33, 64, 100, 512, 768):
        for dst in (1, 4, 8, 9, 16, 31, 64, 96, 200):
            x = torch.arange(src, dtype=torch.float32).reshape(1, 1, 1, src)
            expected = F.interpolate(x, size=(1, dst), mode="nearest").reshape(-1).long().numpy()
            assert np.array_equal(ip.nearest_indices(src, dst), expected), (src, dst)


def test_erosion_equals_diffusers_prepare_mask_on_50_random_masks():
    from diffusers.pipelines.kandinsky.pipeline_kandinsky_inpaint import prepare_mask

    rng = np.random.default_rng(5)
    for k in range(50):
        h, w = rng.integers(1, 20, size=2)
        keep = (rng.random((2, 1, h, w)) < rng.uniform(0.3, 0.97)).astype(np.float32)
        expected = prepare_mask(torch.from_numpy(keep.copy())).numpy()
        assert np.array_equal(ip.erode_keep_mask(keep), expected), f"mask {k} ({h}x{w})"


def test_latent_keep_mask_matches_pipeline():
    """The inpaint pipeline: F.interpolate(mask, latent_hw, 'nearest') then prepare_mask."""
    from diffusers.pipelines.kandinsky.pipeline_kandinsky_inpaint import prepare_mask

    rng = np.random.default_rng(6)
    for (h, w), latent in [((64, 64), (8, 8)), ((128, 64), (16, 8)), ((96, 160), (12, 20)), ((64, 64), (9, 7))]:
        keep = 1 - (np.asarray(_rand_mask_pil(rng, h, w)) >= 128).astype(np.float32)[None, None]
        expected = prepare_mask(F.interpolate(torch.from_numpy(keep), size=latent, mode="nearest")).numpy()
        ours = ip.latent_keep_mask(keep, latent)
        assert ours.dtype == np.float32 and np.array_equal(ours, expected)


def test_latent_keep_mask_bad_inputs():
    with pytest.raises(ip.ImageInputError, match=r"\[n, 1, H, W\]"):
        ip.latent_keep_mask(np.ones((1, 64, 64), np.float32), (8, 8))
    with pytest.raises(ip.ImageInputError, match="0 and 1"):
        ip.latent_keep_mask(np.full((1, 1, 64, 64), 0.5, np.float32), (8, 8))


# ---------------------------------------------------------------- inpaint


def _diffusers_inpaint(image, mask, height, width):
    from diffusers.pipelines.kandinsky.pipeline_kandinsky_inpaint import prepare_mask_and_masked_image

    keep, pixels = prepare_mask_and_masked_image(image, mask, height, width)
    return pixels.numpy(), keep.numpy().astype(np.float32)


@pytest.mark.parametrize("size", [(64, 64), (64, 128), (96, 64)])
def test_inpaint_pil_matches_diffusers(size):
    rng = np.random.default_rng(sum(size))
    for trial in range(4):
        image = _rand_image(rng, 150 + 17 * trial, 120, "RGBA" if trial == 3 else "RGB")
        mask = _rand_mask_pil(rng, 150 + 17 * trial, 120)
        pixels, keep = ip.prepare_inpaint_inputs(image, mask, *size)
        ref_pixels, ref_keep = _diffusers_inpaint(image, mask, *size)
        assert pixels.shape == (1, 3, *size) and keep.shape == (1, 1, *size)
        assert np.array_equal(pixels, ref_pixels)
        assert np.array_equal(keep, ref_keep)


def test_inpaint_numpy_matches_diffusers():
    rng = np.random.default_rng(7)
    for trial in range(5):
        image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
        mask = rng.random((64, 96)).astype(np.float32)
        if trial == 0:
            mask = np.zeros((64, 96), np.float32)
            mask[:32, :32] = 1  # diffusers' own test mask
        pixels, keep = ip.prepare_inpaint_inputs(image, mask, 64, 96)
        ref_pixels, ref_keep = _diffusers_inpaint(image, mask.copy(), 64, 96)
        assert pixels.dtype == keep.dtype == np.float32
        assert np.array_equal(pixels, ref_pixels) and np.array_equal(keep, ref_keep)
        if trial == 0:  # white / 1 = repaint: the masked corner is "not keep"
            assert keep[0, 0, :32, :32].max() == 0 and keep.sum() == 64 * 96 - 32 * 32


def test_inpaint_convention_and_batches():
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    mask = np.zeros((64, 64), bool)
    mask[:16] = True
    pixels, keep = ip.prepare_inpaint_inputs([image, image], [mask, ~mask], 64, 64)
    assert pixels.shape == (2, 3, 64, 64) and keep.shape == (2, 1, 64, 64)
    assert keep[0, 0, :16].max() == 0 and keep[0, 0, 16:].min() == 1
    assert np.array_equal(keep[1], 1 - keep[0])
    assert np.allclose(pixels[0, :, 0, 0], [1, -1, -1])


@pytest.mark.parametrize(
    "image, mask, match",
    [
        (np.zeros((64, 64, 3), np.uint8), np.zeros((32, 32), np.float32), "not resized"),
        (np.zeros((32, 32, 3), np.uint8), np.zeros((32, 32), np.float32), "not resized"),
        (Image.new("RGB", (64, 64)), np.zeros((48, 64), np.float32), "not resized"),
        (np.zeros((64, 64, 4), np.uint8), np.zeros((64, 64), np.float32), "HxWx3"),
        (np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64, 3), np.float32), "HxW array"),
        (np.zeros((64, 64, 3), np.uint8), np.full((64, 64), 255.0, np.float32), "divide a 0..255"),
        (np.full((64, 64, 3), 300.0, np.float32), np.zeros((64, 64), np.float32), r"\[0, 1\]"),
        (np.zeros((64, 64, 3), np.uint8), np.full((64, 64), np.inf, np.float32), r"\[0, 1\]"),
        ([Image.new("RGB", (64, 64))] * 2, [np.zeros((64, 64))], "one mask per image"),
        (np.zeros((64, 64, 3), np.uint8), "mask.png", "PIL.Image"),
    ],
)
def test_inpaint_bad_inputs(image, mask, match):
    with pytest.raises(ip.ImageInputError, match=match):
        ip.prepare_inpaint_inputs(image, mask, 64, 64)


# ---------------------------------------------------------------- CLIP image processor


@pytest.fixture(scope="module")
def clip_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        crop_size=224,
        size={"shortest_edge": 224},
        resample=3,
        image_mean=list(ip.OPENAI_CLIP_MEAN),
        image_std=list(ip.OPENAI_CLIP_STD),
    )


def _clip_cases(rng):
    yield _rand_image(rng, 300, 400)  # landscape downscale
    yield _rand_image(rng, 500, 260)  # portrait
    yield _rand_image(rng, 100, 150)  # upscale
    yield _rand_image(rng, 224, 224)  # no-op resize
    yield _rand_image(rng, 230, 231, "RGBA")  # alpha composited onto white
    yield _rand_image(rng, 256, 256, "L")
    palette = _rand_image(rng, 240, 320).convert("P")
    palette.info["transparency"] = 0
    yield palette


def test_clip_preprocess_matches_transformers(clip_processor):
    assert clip_processor.backend == "pil"  # transformers 5 without torchvision (kandinsky_map §0)
    worst = 0.0
    for image in _clip_cases(np.random.default_rng(8)):
        expected = clip_processor(image, return_tensors="np").pixel_values
        ours = ip.clip_image_preprocess(image)
        assert ours.shape == (1, 3, 224, 224) and ours.dtype == np.float32
        worst = max(worst, float(np.abs(ours - expected).max()))
    assert worst == 0.0, f"max abs diff vs CLIPImageProcessorPil: {worst}"


def test_clip_preprocess_matches_tiny_checkpoint_processor(tmp_path_factory):
    """The image processor saved in the tiny checkpoint's prior folder, loaded as the pipeline loads it."""
    from transformers import CLIPImageProcessor

    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint

    out = tmp_path_factory.mktemp("tiny_ckpt")
    write_tiny_checkpoint(out, seed=0)
    processor = CLIPImageProcessor.from_pretrained(out / "prior" / "image_processor")
    size = processor.crop_size["height"]
    for image in _clip_cases(np.random.default_rng(10)):
        expected = processor(image, return_tensors="np").pixel_values
        ours = ip.clip_image_preprocess(image, size, processor.image_mean, processor.image_std)
        assert np.array_equal(ours, expected)


def test_clip_preprocess_bad_inputs():
    with pytest.raises(ip.ImageInputError, match="PIL.Image"):
        ip.clip_image_preprocess("cat.png")
    with pytest.raises(ip.ImageInputError, match="uint8"):
        ip.clip_image_preprocess(np.zeros((10, 10, 3), np.float32))


# ---------------------------------------------------------------- postprocess


def _diffusers_postprocess(raw: np.ndarray, output_type: str):
    """KandinskyPipeline / KandinskyInpaintPipeline.__call__'s own post-processing."""
    from diffusers.utils.pil_utils import numpy_to_pil

    image = torch.from_numpy(raw) * 0.5 + 0.5
    image = image.clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return numpy_to_pil(image) if output_type == "pil" else image


@pytest.mark.parametrize("output_type", ["np", "pil"])
def test_postprocess_matches_diffusers(vae_processor, output_type):
    raw = (np.random.default_rng(9).standard_normal((2, 3, 32, 48)) * 1.5).astype(np.float32)
    ours = ip.postprocess(raw, output_type)
    text2img = _diffusers_postprocess(raw, output_type)
    img2img = vae_processor.postprocess(torch.from_numpy(raw), output_type)  # the img2img pipeline's path
    if output_type == "np":
        assert ours.shape == (2, 32, 48, 3) and ours.dtype == np.float32
        assert np.array_equal(ours, text2img) and np.array_equal(ours, img2img)
    else:
        assert len(ours) == 2 and ours[0].size == (48, 32) and ours[0].mode == "RGB"
        for a, b, c in zip(ours, text2img, img2img):
            assert np.array_equal(np.asarray(a), np.asarray(b)) and np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_postprocess_refuses_non_finite(bad_value):
    raw = np.zeros((2, 3, 8, 8), np.float32)
    raw[1, 2, 3, 4] = bad_value
    with pytest.raises(ip.NonFiniteOutputError, match=r"image\(s\) \[1\]"):
        ip.postprocess(raw, "pil")
    assert issubclass(ip.NonFiniteOutputError, ValueError)


def test_postprocess_bad_arguments():
    with pytest.raises(ValueError, match="output_type"):
        ip.postprocess(np.zeros((1, 3, 8, 8), np.float32), "pt")
    with pytest.raises(ip.ImageInputError, match="n, 3, H, W"):
        ip.postprocess(np.zeros((3, 8, 8), np.float32), "np")
