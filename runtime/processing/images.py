"""Host-side image pre- and post-processing for the Kandinsky 2.1 pipelines (numpy + PIL only).

Each function reproduces one step of the diffusers / transformers code (kandinsky_map §1.2-§1.5,
§5.2 item 11) so that the same inputs reach the networks:

* :func:`prepare_img2img_image`: ``VaeImageProcessor(vae_scale_factor=<MoVQ scale factor>,
  resample="bicubic", reducing_gap=1).preprocess`` as called by ``KandinskyImg2ImgPipeline``.
* :func:`prepare_inpaint_inputs`: ``prepare_mask_and_masked_image`` of ``KandinskyInpaintPipeline``.
* :func:`latent_keep_mask`: the pipeline's ``F.interpolate(mode="nearest")`` + ``prepare_mask``.
* :func:`clip_image_preprocess`: ``CLIPImageProcessor`` (transformers' PIL backend) for ``interpolate``.
* :func:`postprocess`: decoder output to ``np`` / ``pil`` images.

One decoder for every entry (issue 18 §1.8): :func:`load_image_file` reads a file the way the CLI
and ``kandinsky-trt client`` both do (images as RGB, masks as L), and :func:`image_from_array` /
:func:`mask_from_array` turn the uint8 arrays a client sends (and the server receives) back into
the same PIL images. uint8 ``HxWx3`` arrays given to the pipelines take that PIL path too, so an
image of any size is resized as diffusers resizes PIL images (bicubic, ``reducing_gap=1``; masks
LANCZOS) whether it came from a file, the Python API or the server.

Deliberate divergences from diffusers (all documented where they happen):

1. img2img resizes to ``(width, height)`` as asked; diffusers swaps the two (a bug that makes every
   non-square size fail). Square sizes give identical results.
2. Images of any PIL mode are converted to RGB after resizing (the inpaint pipeline's order);
   diffusers' img2img keeps RGBA/L inputs as 4/1-channel tensors, which then fail in the encoder.
3. numpy images: uint8 ``HxWx3`` is an RGB image (0..255) and goes through PIL like an image file
   (bicubic resize to any size); float means 0..1 (values outside raise), resized nearest as
   diffusers' ``VaeImageProcessor`` resizes arrays (img2img) and not resized (inpaint). diffusers'
   img2img would feed uint8 arrays through ``2x-1`` unscaled and its inpaint path divides floats by
   127.5 and never resizes arrays. uint8 inpaint arrays of the output size and float img2img arrays
   match diffusers exactly.
4. Out-of-range, non-finite, wrongly shaped inputs raise :class:`ImageInputError` here instead of
   failing later inside a network, and sizes must be multiples of the MoVQ scale factor (8 for
   Kandinsky 2.1; diffusers floors or fails).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from PIL import Image
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError, NonFiniteOutputError, require_finite

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# diffusers prepare_mask: a pixel stays "keep" only if it and these neighbours are all "keep"
# (cross-correlation offsets rows -1..1 x cols -1..1; the (-1,+1) and (+1,-1) diagonals are absent).
EROSION_KERNEL = ((1, 1, 0), (1, 1, 1), (0, 1, 1))
OUTPUT_TYPES = ("np", "pil")


class ImageInputError(KandinskyTrtError, ValueError):
    """An image or mask of the wrong type, shape, size or value range."""


__all__ = ["ImageInputError", "NonFiniteOutputError", "clip_image_preprocess", "latent_keep_mask", "postprocess",
           "image_from_array", "load_image_file", "mask_from_array", "prepare_img2img_image",
           "prepare_inpaint_inputs"]  # NonFiniteOutputError: its old home


def _pil(image: Image.Image, name: str) -> Image.Image:
    """A PIL image with its pixels read (PIL opens files lazily) and a non-empty size."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as err:  # truncated or corrupt files surface only here
        raise ImageInputError(f"{name}: expected a readable image, found a broken one ({err})") from None
    if image.width < 1 or image.height < 1:
        raise ImageInputError(f"{name}: expected an image of at least 1x1 pixels, found {image.width}x{image.height}")
    return image


IMAGE_FILE_MODES = ("RGB", "L")  # an image, a mask


def load_image_file(path, mode: str = "RGB", name: str = "image") -> Image.Image:
    """The one image-file decoder of the CLI and the client: the file's pixels (read now, not lazily)
    as ``mode`` (``"RGB"`` for images, ``"L"`` for masks, 255 = repaint)."""
    if mode not in IMAGE_FILE_MODES:
        raise ValueError(f"mode: expected one of {IMAGE_FILE_MODES}, found {mode!r}")
    try:
        with Image.open(path) as image:
            image.load()  # a truncated file fails here, not deep in a pipeline
            return _pil(image.convert(mode), name)
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageInputError(f"{name}: expected a readable image file, found {str(path)!r} ({err})") from None


def _uint8_array(array, ndim: int, name: str, shape: str) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype != np.uint8 or array.ndim != ndim or (ndim == 3 and array.shape[-1] != 3):
        raise ImageInputError(f"{name}: expected a uint8 {shape} array, found {array.dtype} {array.shape}")
    _check_not_empty(array, name)
    return np.ascontiguousarray(array)


def image_from_array(array: np.ndarray, name: str = "image") -> Image.Image:
    """A uint8 ``HxWx3`` array (as ``kandinsky-trt client`` sends an image file) as its RGB PIL image."""
    return Image.fromarray(_uint8_array(array, 3, name, "HxWx3"), "RGB")


def mask_from_array(array: np.ndarray, name: str = "mask") -> Image.Image:
    """A uint8 ``HxW`` mask (255 = repaint, as the client sends a mask file) as its L PIL image."""
    return Image.fromarray(_uint8_array(array, 2, name, "HxW"), "L")


def _as_pil_if_uint8_rgb(image, name: str):
    """uint8 ``HxWx3`` arrays become PIL images (the file path's resampling); anything else unchanged."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3:
        return image_from_array(image, name)
    return image


def _check_not_empty(array: np.ndarray, name: str) -> None:
    if array.ndim >= 2 and min(array.shape[:2]) < 1:
        raise ImageInputError(f"{name}: expected an image of at least 1x1 pixels, found shape {array.shape}")


def _check_size(height: int, width: int, scale_factor: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, (int, np.integer)) or value <= 0 or value % scale_factor:
            raise ImageInputError(f"{name}: expected a positive multiple of {scale_factor} (the MoVQ scale factor), "
                                  f"found {value!r}")


def _resize_pil_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """PIL bicubic resize with ``reducing_gap=1`` (diffusers' setting), then RGB, as uint8 HWC."""
    resized = _pil(image, "image").resize((width, height), resample=Image.BICUBIC, reducing_gap=1)
    return np.asarray(resized.convert("RGB"))


def _describe_range(values: np.ndarray) -> str:
    """``[min, max]`` of the finite values, noting NaN/Inf (for error messages)."""
    finite = values[np.isfinite(values)]
    text = f"[{finite.min()}, {finite.max()}]" if finite.size else "no finite values"
    return text if finite.size == values.size else f"{text} and {values.size - finite.size} NaN/Inf"


def _numpy_image_01(image: np.ndarray, name: str) -> np.ndarray:
    """Validate an HWC RGB array and return it as float32 in [0, 1] (uint8 is divided by 255)."""
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ImageInputError(f"{name}: expected an HxWx3 RGB array, found shape {image.shape}")
    _check_not_empty(image, name)
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if not np.issubdtype(image.dtype, np.floating):
        raise ImageInputError(f"{name}: expected a uint8 or float array, found dtype {image.dtype}")
    if not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
        raise ImageInputError(
            f"{name}: expected float values in [0, 1] (pass uint8 for 0..255), found {_describe_range(image)}"
        )
    return image.astype(np.float32)


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source indices of ``torch.nn.functional.interpolate(mode="nearest")`` along one axis.

    torch computes ``min(floor(dst * (float32(in) / out)), in - 1)`` in float32 (no half-pixel
    offset, unlike ``nearest-exact``); the same arithmetic is done here.
    """
    if out_size == in_size:
        return np.arange(out_size, dtype=np.int64)
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.floor(np.arange(out_size, dtype=np.int64).astype(np.float32) * scale).astype(np.int64)
    return np.minimum(src, in_size - 1)


def _resize_nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest resize of the last two axes with torch's index rule."""
    rows = nearest_indices(array.shape[-2], height)
    cols = nearest_indices(array.shape[-1], width)
    return array[..., rows[:, None], cols[None, :]]


def prepare_img2img_image(image: Image.Image | np.ndarray, height: int, width: int,
                          scale_factor: int = 8) -> np.ndarray:
    """Image for the MoVQ encoder: float32 ``[1, 3, height, width]`` in [-1, 1].

    ``scale_factor`` is the MoVQ's (diffusers' ``vae_scale_factor``, 8 for Kandinsky 2.1).

    PIL, and uint8 HxWx3 arrays: bicubic resize (``reducing_gap=1``) to ``width x height``, RGB,
    ``/255``, ``2x-1``. float HWC arrays in [0, 1]: nearest resize with torch's rule, then ``2x-1``.
    Unlike diffusers, height and width are not swapped (identical for square sizes).
    """
    _check_size(height, width, scale_factor)
    image = _as_pil_if_uint8_rgb(image, "image")
    if isinstance(image, Image.Image):
        pixels = _resize_pil_rgb(image, height, width).astype(np.float32) / np.float32(255.0)
        chw = pixels.transpose(2, 0, 1)
    elif isinstance(image, np.ndarray):
        chw = _resize_nearest(_numpy_image_01(image, "image").transpose(2, 0, 1), height, width)
    else:
        raise ImageInputError(f"image: expected a PIL.Image or an HxWx3 numpy array, found {type(image).__name__}")
    return np.ascontiguousarray(2.0 * chw[None] - 1.0, dtype=np.float32)


def _inpaint_image(image: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """One inpaint image as float32 [3, H, W] in [-1, 1]."""
    image = _as_pil_if_uint8_rgb(image, "image")
    if isinstance(image, Image.Image):
        # diffusers: torch.from_numpy(uint8).float() / 127.5 - 1 (true division, same float32 result)
        return _resize_pil_rgb(image, height, width).transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - 1
    if isinstance(image, np.ndarray):
        return 2.0 * _numpy_image_01(image, "image").transpose(2, 0, 1) - 1.0
    raise ImageInputError(f"image: expected a PIL.Image or an HxWx3 numpy array, found {type(image).__name__}")


def _inpaint_repaint_mask(mask: Image.Image | np.ndarray, height: int, width: int) -> np.ndarray:
    """One user mask (white / 1 = repaint) as binary float32 [H, W]."""
    if isinstance(mask, Image.Image):
        resized = _pil(mask, "mask").resize((width, height), resample=Image.LANCZOS)
        values = np.asarray(resized.convert("L")).astype(np.float32) / np.float32(255.0)
    elif isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim != 2:
            raise ImageInputError(f"mask: expected an HxW array, found shape {mask.shape}")
        _check_not_empty(mask, "mask")
        if mask.dtype != np.bool_ and not np.issubdtype(mask.dtype, np.number):
            raise ImageInputError(f"mask: expected a bool or numeric array, found dtype {mask.dtype}")
        values = mask.astype(np.float32)
        if not np.isfinite(values).all() or values.min() < 0.0 or values.max() > 1.0:
            raise ImageInputError(
                f"mask: expected values in [0, 1] (divide a 0..255 mask by 255), found {_describe_range(values)}"
            )
    else:
        raise ImageInputError(f"mask: expected a PIL.Image or an HxW numpy array, found {type(mask).__name__}")
    return (values >= 0.5).astype(np.float32)


def prepare_inpaint_inputs(
    image: Image.Image | np.ndarray | Sequence,
    mask: Image.Image | np.ndarray | Sequence,
    height: int,
    width: int,
    scale_factor: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Inpaint image and keep-mask: ``(float32 [n,3,H,W] in [-1,1], float32 [n,1,H,W] with 1 = keep)``.

    The user mask marks the region to repaint with white / 1 (diffusers >= 0.19 convention); it is
    binarised at 0.5 and inverted, as diffusers does. PIL images and uint8 HxWx3 arrays are resized
    bicubic (``reducing_gap=1``), PIL masks LANCZOS (a served uint8 mask arrives as a PIL image:
    :func:`mask_from_array`); float images and numpy masks are not resized and must already be
    ``height x width``. Lists give a batch (one mask per image). ``scale_factor`` is the MoVQ's
    (8 for Kandinsky 2.1): sizes must be multiples of it.
    """
    _check_size(height, width, scale_factor)
    images = list(image) if isinstance(image, (list, tuple)) else [image]
    masks = list(mask) if isinstance(mask, (list, tuple)) else [mask]
    if not images:
        raise ImageInputError("image: expected at least one image, found an empty list")
    if len(images) != len(masks):
        raise ImageInputError(f"mask: expected one mask per image ({len(images)}), found {len(masks)}")
    pixels = np.stack([_inpaint_image(i, height, width) for i in images])
    repaint = np.stack([_inpaint_repaint_mask(m, height, width) for m in masks])[:, None]
    if pixels.shape[-2:] != (height, width) or repaint.shape[-2:] != (height, width):
        raise ImageInputError(
            f"image/mask: expected {height}x{width} (float images and numpy masks are not resized), "
            f"found image {pixels.shape[-2]}x{pixels.shape[-1]} and mask {repaint.shape[-2]}x{repaint.shape[-1]}"
        )
    return pixels.astype(np.float32, copy=False), (1.0 - repaint).astype(np.float32)


def erode_keep_mask(keep: np.ndarray) -> np.ndarray:
    """diffusers' ``prepare_mask`` loop as a 3x3 erosion: ``keep' = conv2d(1-keep, K, pad=1) == 0``.

    ``keep`` is binary ``[..., h, w]``; outside the border counts as "keep".
    """
    hole = np.pad(1.0 - keep, [(0, 0)] * (keep.ndim - 2) + [(1, 1), (1, 1)])
    h, w = keep.shape[-2:]
    total = np.zeros(keep.shape, dtype=np.float32)
    for dy, row in enumerate(EROSION_KERNEL):
        for dx, weight in enumerate(row):
            if weight:
                total += hole[..., dy : dy + h, dx : dx + w]
    return (total == 0).astype(np.float32)


def latent_keep_mask(keep_mask: np.ndarray, latent_hw: tuple[int, int]) -> np.ndarray:
    """Keep-mask at latent size: nearest resize (torch's rule), then the diffusers erosion.

    ``keep_mask``: binary float ``[n, 1, H, W]`` from :func:`prepare_inpaint_inputs`.
    Returns float32 ``[n, 1, h, w]``.
    """
    keep_mask = np.asarray(keep_mask)
    if keep_mask.ndim != 4 or keep_mask.shape[1] != 1:
        raise ImageInputError(f"keep_mask: expected shape [n, 1, H, W], found {keep_mask.shape}")
    if not np.isin(keep_mask, (0.0, 1.0)).all():
        raise ImageInputError("keep_mask: expected only 0 and 1 values (binarise first), found others")
    h, w = latent_hw
    if min(h, w) <= 0:
        raise ImageInputError(f"latent_hw: expected positive sizes, found {latent_hw}")
    small = _resize_nearest(keep_mask.astype(np.float32), int(h), int(w))
    return erode_keep_mask(small)


def _clip_target_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' ``get_resize_output_image_size(shortest_edge=size, default_to_square=False)``."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    return (new_long, size) if width <= height else (size, new_long)


def _to_rgb_white_background(image: Image.Image) -> Image.Image:
    """transformers' ``convert_to_rgb``: transparency is composited onto white."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def clip_image_preprocess(
    image: Image.Image | np.ndarray,
    size: int = 224,
    mean: Sequence[float] = OPENAI_CLIP_MEAN,
    std: Sequence[float] = OPENAI_CLIP_STD,
) -> np.ndarray:
    """CLIP vision input, float32 ``[1, 3, size, size]``, as transformers' ``CLIPImageProcessor``
    (PIL backend, used when torchvision is absent): RGB on white, bicubic resize of the shortest
    edge to ``size``, centre crop, ``/255``, ``(x - mean) / std``. A uint8 HWC array is read as RGB.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (3, 4):
            raise ImageInputError(f"image: expected a uint8 HxWx3/4 array, found {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise ImageInputError(f"image: expected a PIL.Image, found {type(image).__name__}")
    _pil(image, "image")
    if len(mean) != 3 or len(std) != 3:
        raise ImageInputError(f"mean/std: expected 3 values each, found {len(mean)} and {len(std)}")
    rgb = _to_rgb_white_background(image)
    new_h, new_w = _clip_target_size(rgb.height, rgb.width, size)
    pixels = np.asarray(rgb.resize((new_w, new_h), resample=Image.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    crop = pixels[top : top + size, left : left + size].transpose(2, 0, 1)
    # transformers rescales in float64 then casts, and normalises in float32.
    scaled = (crop.astype(np.float64) * (1 / 255)).astype(np.float32)
    mean32 = np.asarray(mean, dtype=np.float32)[:, None, None]
    std32 = np.asarray(std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray(((scaled - mean32) / std32)[None], dtype=np.float32)


def postprocess(images: np.ndarray, output_type: str = "pil") -> np.ndarray | list[Image.Image]:
    """Raw decoder output ``[n, 3, H, W]`` to ``np`` (float32 NHWC in [0, 1]) or a list of PIL images.

    ``x*0.5+0.5``, clipped to [0, 1]; PIL uses ``round(x*255)``. NaN/Inf raise
    :class:`NonFiniteOutputError` instead of silently becoming black pixels.
    """
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {OUTPUT_TYPES}, found {output_type!r}")
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[1] != 3:
        raise ImageInputError(f"images: expected decoder output [n, 3, H, W], found shape {images.shape}")
    require_finite(images, "images", "image(s)", "fp16 overflow in the decoder?")
    nhwc = np.clip(images.astype(np.float32) * 0.5 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
    nhwc = np.ascontiguousarray(nhwc)
    if output_type == "np":
        return nhwc
    return [Image.fromarray(img) for img in (nhwc * 255).round().astype(np.uint8)]
