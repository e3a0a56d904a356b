"""Several profiles in one artifacts set: export, weights once, profile selection, refusals, CLI flags.

``artifacts_fp32_multi`` holds 4 profiles (sizes 64x64 and 64x128, height x width, x batches 1 and 2);
``artifacts_fp32`` (64x64, batch 1) and ``artifacts_fp32_b2_wide`` (64x128, batch 2) are single-profile
exports of the same sizes. Each pipeline's output at every profile of the set must equal theirs.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest

from kandinsky_trt.export.commands import _profiles, add_commands
from kandinsky_trt.export.onnx_export import ExportError
from kandinsky_trt.runtime import (
    KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline, KandinskyInpaintCombinedPipeline,
    KandinskyInpaintPipeline, KandinskyPriorPipeline)
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.spec import BRIDGE_NETWORKS, NETWORKS, STEP_NETWORKS, Profile
from kandinsky_trt.runtime.pipelines.components import Components, split_rows

FP32 = 1e-6  # max abs difference, images in [0, 1]; embeddings unscaled
SMALL = dict(num_inference_steps=3, prior_num_inference_steps=3, output_type="np")
SINGLE = {(64, 64): "artifacts_fp32", (64, 128): "artifacts_fp32_b2_wide"}  # (height, width) -> fixture


def _plan(rows: int, batches: list[int]) -> list[tuple[int, int, int]]:
    return [(s.start, s.stop, b) for s, b in split_rows(rows, batches)]


def test_rows_split_with_the_fewest_padded_rows_then_the_fewest_calls():
    assert _plan(3, [1, 2]) == [(0, 2, 2), (2, 3, 1)]
    assert _plan(3, [1, 4]) == [(0, 1, 1), (1, 2, 1), (2, 3, 1)]  # 3 exact calls beat 1 padded one
    assert _plan(9, [1, 4]) == [(0, 4, 4), (4, 8, 4), (8, 9, 1)]
    assert _plan(5, [4]) == [(0, 4, 4), (4, 5, 4)]  # padded: the only batch
    assert _plan(7, [2, 4]) == [(0, 4, 4), (4, 7, 4)]  # 1 padded row either way: 2 calls beat 3
    assert _plan(6, [3, 4]) == [(0, 3, 3), (3, 6, 3)]


def test_export_checks_every_profile_and_stores_weights_once(artifacts_fp32_multi, artifacts_fp32):
    out, report = artifacts_fp32_multi
    assert report.passed
    shapes = {(p.network, p.profile) for p in report.parity}
    sized = {"unet", "unet_inpaint", "movq_decoder", "movq_encoder"}  # 4 shapes; the others 2 (batch), 1 (image_encoder)
    assert len(shapes) == 4 * len(sized) + 2 * (len(NETWORKS) - len(sized) - 1) + 1
    manifest = mf.load_manifest(out)
    assert manifest.sizes() == [(64, 64), (64, 128)] and manifest.batches() == [1, 2]
    onnx_files = sorted(e.onnx for e in manifest.networks.values())
    assert len(onnx_files) == len(set(onnx_files)) == len(NETWORKS) + len(STEP_NETWORKS) + len(BRIDGE_NETWORKS)  # one graph each
    single = mf.load_manifest(artifacts_fp32[0])
    multi_bytes = sum(r.size for r in manifest.files.values())
    assert multi_bytes <= 1.01 * sum(r.size for r in single.files.values())  # measured: equal up to the graph text


def test_one_session_per_network_serves_every_profile(artifacts_fp32_multi, monkeypatch):
    import onnxruntime

    created, real = [], onnxruntime.InferenceSession
    monkeypatch.setattr(onnxruntime, "InferenceSession", lambda path, *a, **k: created.append(path) or real(path, *a, **k))
    with Components(artifacts_fp32_multi[0]) as c:
        pipe = KandinskyCombinedPipeline(components=c)
        for height, width in c.loaded.sizes:
            for n in (1, 2, 3):  # batch 1, batch 2, batch 2 + batch 1
                pipe("a cat", height=height, width=width, num_images_per_prompt=n, generator=0, **SMALL)
        assert len(c._loops.values()) == 2 + 4  # prior loops per batch, UNet loops per (batch, size)
    assert len(created) == len(set(created)) == 7  # prior_text_encoder, prior, prior_step, text_encoder, unet, ...


@pytest.mark.parametrize("size", sorted(SINGLE))
@pytest.mark.parametrize("images", [1, 2, 3])  # batch 1, batch 2, batch 2 + batch 1
def test_every_profile_equals_a_single_profile_export(size, images, artifacts_fp32_multi, request):
    single = request.getfixturevalue(SINGLE[size])[0]
    height, width = size
    picture = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
    mask = np.zeros((height, width), np.float32)
    mask[: height // 2] = 1
    results = []
    for artifacts in (artifacts_fp32_multi[0], single):
        with Components(artifacts) as c:
            common = dict(height=height, width=width, num_images_per_prompt=images, generator=3, **SMALL)
            results.append({
                "prior": KandinskyPriorPipeline(components=c)("a cat", num_images_per_prompt=images,
                                                              num_inference_steps=3, generator=3).image_embeds,
                "text2img": KandinskyCombinedPipeline(components=c)("a cat", **common).images,
                "img2img": _img2img(c, picture, common),
                "inpaint": _inpaint(c, picture, mask, common),
            })
    for name in results[0]:
        difference = float(np.max(np.abs(np.asarray(results[0][name]) - np.asarray(results[1][name]))))
        assert difference <= FP32, f"{name} at {height}x{width}, {images} image(s): {difference:.2e}"


def _img2img(c: Components, picture, common: dict):
    return KandinskyImg2ImgCombinedPipeline(components=c)("a cat", picture, strength=0.7, **common).images


def _inpaint(c: Components, picture, mask, common: dict):
    return KandinskyInpaintCombinedPipeline(components=c)("a hat", picture, mask, **common).images


def test_a_size_the_artifacts_lack_is_refused_before_any_work(artifacts_fp32_multi, monkeypatch):
    with Components(artifacts_fp32_multi[0]) as c:
        monkeypatch.setattr(c, "session", lambda name, profile=0: pytest.fail(f"{name} ran"))
        message = (r"^height/width: expected a size these artifacts hold \(width x height: 64x64, 128x64\), found "
                   r"width 100 x height 128 \(served as 128x128\)\. Export it with `kandinsky-trt export --size 128x128`")
        with pytest.raises(PipelineInputError, match=message):
            KandinskyCombinedPipeline(components=c)("a cat", height=128, width=100, **SMALL)
        with pytest.raises(PipelineInputError, match="height/width: expected a size these artifacts hold"):
            KandinskyInpaintPipeline(components=c)("a", np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64)),
                                                   np.zeros((1, 32)), np.zeros((1, 32)), height=192, width=64)


def test_the_first_size_is_the_default(artifacts_fp32_multi):
    with Components(artifacts_fp32_multi[0]) as c:
        images = KandinskyCombinedPipeline(components=c)("a cat", generator=0, **SMALL).images
    assert np.asarray(images).shape == (1, 64, 64, 3)


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers(dest="command"))
    return parser.parse_args(["export", "--prior", "p", "--decoder", "d", "--out", "o", *argv])


def test_export_flags_make_every_size_times_batch_a_profile():
    profiles = _profiles(_parse("--size", "512x512", "--size", "768x512", "--batch", "1", "4"))
    assert profiles == (Profile(1, 512, 512), Profile(4, 512, 512), Profile(1, 512, 768), Profile(4, 512, 768))
    assert _profiles(_parse("--height", "768", "--width", "512")) == (Profile(1, 768, 512),)
    assert _profiles(_parse()) == (Profile(1, 512, 512),)
    assert _profiles(_parse("--no-cfg", "--batch", "2")) == (Profile(2, 512, 512, cfg=False),)
    with pytest.raises(ExportError, match="--size: expected either --size .* or --height/--width, found both"):
        _profiles(_parse("--size", "512x512", "--height", "768"))


@pytest.mark.parametrize("text", ["512", "512x", "ax512", "512x512x3", "512*512"])
def test_a_malformed_size_flag_is_refused(text, capsys):
    with pytest.raises(SystemExit):
        _parse("--size", text)
    assert "expected WIDTHxHEIGHT in pixels, e.g. 768x512" in capsys.readouterr().err
