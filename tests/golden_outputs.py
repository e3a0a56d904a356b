"""Every pipeline's output on fixed inputs, for the bit-identity check of refactors (issue 19).

:func:`run_cases` runs the seven pipelines and ``interpolate`` on one artifacts set with fixed seeds,
images and arguments (several rows, so calls split over the profiles' batches; deterministic and
stochastic schedulers; guidance above and at most 1), and returns each output array by case name.
``tests/test_golden_outputs.py`` compares them with ``tests/golden/outputs.npz``, recorded before the
refactor with ``KTRT_RECORD_GOLDEN=1``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).parent / "golden"
CLOSE = 2e-5  # max abs difference allowed on another class of CPU only
# The CPU features that pick ONNX Runtime's kernels (MLAS): the same class of CPU gives the same bits.
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


def cpu_class() -> list[str]:
    """The :data:`CPU_FLAGS` this machine has (empty where /proc/cpuinfo does not exist)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in CPU_FLAGS if flag in flags]


def digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()


def _image(seed: int, height: int, width: int):
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.float32)
    mask[height // 4: 3 * height // 4, width // 3:] = 1.0
    return mask


def run_cases(artifacts: Path, sizes: list[tuple[int, int]]) -> dict[str, np.ndarray]:
    """Every case on ``artifacts`` at each (height, width) of ``sizes``; outputs by case name."""
    from kandinsky_trt.runtime import (Components, KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline,
                                       KandinskyImg2ImgPipeline, KandinskyInpaintCombinedPipeline,
                                       KandinskyInpaintPipeline, KandinskyPipeline, KandinskyPriorPipeline)

    out: dict[str, np.ndarray] = {}
    with Components(artifacts) as c:
        prior = KandinskyPriorPipeline(components=c)
        text2img = KandinskyPipeline(components=c)
        img2img = KandinskyImg2ImgPipeline(components=c)
        inpaint = KandinskyInpaintPipeline(components=c)
        combined = {"combined": KandinskyCombinedPipeline(components=c),
                    "img2img_combined": KandinskyImg2ImgCombinedPipeline(components=c),
                    "inpaint_combined": KandinskyInpaintCombinedPipeline(components=c)}
        prompts = ["a red cat", "a blue dog"]
        p = prior(prompts, negative_prompt=["blurry", "dark"], num_images_per_prompt=2,
                  num_inference_steps=3, generator=11)
        out["prior"], out["prior_negative"] = p.image_embeds, p.negative_image_embeds
        p1 = prior("a house", num_inference_steps=2, guidance_scale=1.0, generator=12)
        out["prior_unguided"] = p1.image_embeds
        out["interpolate"] = prior.interpolate(["a boat", _image(5, 40, 50), "a tree"], [0.5, 0.3, 0.2],
                                               num_inference_steps=2, generator=13).image_embeds
        embeds, negative = p.image_embeds[::2][:2], p.negative_image_embeds[::2][:2]
        rows3 = np.concatenate([p.image_embeds[:3]]), np.concatenate([p.negative_image_embeds[:3]])
        for height, width in sizes:
            tag = f"{height}x{width}"
            for scheduler in ("ddim", "ddpm", "dpmpp2m"):
                out[f"text2img_{scheduler}_{tag}"] = text2img(
                    ["a", "b", "c"], *rows3, height=height, width=width, num_inference_steps=4,
                    generator=21, scheduler=scheduler, output_type="np").images
            out[f"text2img_unguided_{tag}"] = text2img(
                prompts, embeds, negative, height=height, width=width, num_inference_steps=3,
                guidance_scale=1.0, generator=22, output_type="np").images
            out[f"img2img_{tag}"] = img2img(
                prompts, _image(1, 48, 80), embeds, negative, height=height, width=width, num_inference_steps=5,
                strength=0.6, num_images_per_prompt=2, generator=23, output_type="np").images
            out[f"inpaint_{tag}"] = inpaint(
                prompts, _image(2, height, width), _mask(height, width), embeds, negative, height=height,
                width=width, num_inference_steps=3, generator=24, scheduler="ddpm", output_type="np").images
            out[f"combined_{tag}"] = combined["combined"](
                prompts, negative_prompt="ugly", num_inference_steps=3, prior_num_inference_steps=2,
                height=height, width=width, generator=25, output_type="np").images
            out[f"img2img_combined_{tag}"] = combined["img2img_combined"](
                "a lake", _image(3, height, width), num_inference_steps=4, strength=0.5, num_images_per_prompt=3,
                prior_num_inference_steps=2, height=height, width=width, generator=26, output_type="np").images
            out[f"inpaint_combined_{tag}"] = combined["inpaint_combined"](
                prompts, _image(4, height, width), _mask(height, width), num_inference_steps=3,
                prior_num_inference_steps=2, height=height, width=width, generator=27, output_type="np").images
    return out


def assert_equals_recorded(name: str, outputs: dict[str, np.ndarray], what: str = "the change") -> None:
    """``outputs`` against ``tests/golden/{name}``: the same cases, each finite float32 and, on a CPU
    of the class they were recorded on, bit-identical; on another class (ONNX Runtime's kernels may
    round differently) within :data:`CLOSE`. ``what`` names the path under test in the failure."""
    index = json.loads((GOLDEN / f"{name}.json").read_text())
    assert sorted(outputs) == sorted(index["digests"]), "the cases differ from the recorded ones"
    same_cpu = index["cpu_class"] == cpu_class()
    recorded = np.load(GOLDEN / f"{name}.npz")
    for case, array in sorted(outputs.items()):
        assert array.dtype == np.float32 and np.isfinite(array).all(), case
        if same_cpu:
            if digest(array) != index["digests"][case]:
                diff = float(np.max(np.abs(array - recorded[case]))) if array.shape == recorded[case].shape else None
                raise AssertionError(f"{name}/{case}: {what} is not bit-identical to the recorded output "
                                     f"(max abs diff {diff})")
        else:
            assert array.shape == recorded[case].shape, case
            diff = float(np.max(np.abs(array - recorded[case])))
            assert diff <= CLOSE, f"{name}/{case}: max abs diff {diff:.3e} > {CLOSE} (other CPU class: {cpu_class()})"
