"""Helpers of the serving tests: the Python API's reference results and request fields."""

from __future__ import annotations

import numpy as np
from PIL import Image

STEPS = dict(num_inference_steps=3, prior_steps=2)


def make_image(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return mask


def task_fields(task: str, seed: int, height: int, width: int, prompt: str = "a red cat") -> dict:
    """Request fields of one item of ``task`` (small step counts, the artifacts' size)."""
    fields = dict(task=task, prompt=prompt, seed=seed, height=height, width=width, **STEPS)
    if task == "prior":
        fields = dict(task=task, prompt=prompt, seed=seed, prior_steps=2, negative_prompt="blurry")
    if task in ("img2img", "inpaint", "interpolate"):
        fields["image"] = make_image(height, width, seed)
    if task == "img2img":
        fields["strength"] = 0.6
    if task == "inpaint":
        fields["mask"] = make_mask(height, width)
    return fields


def python_api(components, fields: dict) -> dict[str, np.ndarray]:
    """What a Python user gets for the same arguments and ``generator=seed`` (the public API only)."""
    from kandinsky_trt.runtime import (KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline,
                                       KandinskyInpaintCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline)

    f = fields
    if f["task"] == "prior":
        out = KandinskyPriorPipeline(components=components)(
            f["prompt"], negative_prompt=f.get("negative_prompt"), num_inference_steps=f["prior_steps"],
            generator=f["seed"])
        return {"image_embeds": out.image_embeds[None], "negative_image_embeds": out.negative_image_embeds[None]}
    common = dict(height=f["height"], width=f["width"], num_inference_steps=f["num_inference_steps"],
                  generator=f["seed"])
    if f["task"] == "interpolate":
        prior = KandinskyPriorPipeline(components=components)
        mix = prior.interpolate([f["prompt"], Image.fromarray(f["image"])], [0.5, 0.5],
                                num_inference_steps=f["prior_steps"], generator=f["seed"])
        images = KandinskyPipeline(components=components)("", mix.image_embeds, mix.negative_image_embeds,
                                                          **common).images
    else:
        common["prior_num_inference_steps"] = f["prior_steps"]
        if f["task"] == "text2img":
            images = KandinskyCombinedPipeline(components=components)(f["prompt"], **common).images
        elif f["task"] == "img2img":
            images = KandinskyImg2ImgCombinedPipeline(components=components)(
                f["prompt"], f["image"], strength=f["strength"], **common).images
        else:
            images = KandinskyInpaintCombinedPipeline(components=components)(
                f["prompt"], f["image"], f["mask"] / 255.0, **common).images
    return {"images": np.stack([np.asarray(i) for i in images])[None]}


def assert_same(served: dict, expected: dict) -> None:
    assert sorted(served) == sorted(expected)
    for name, value in expected.items():
        assert served[name].dtype == value.dtype and served[name].shape == value.shape, name
        np.testing.assert_array_equal(served[name], value, err_msg=name)
