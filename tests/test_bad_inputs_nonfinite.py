"""Non-finite values (issue 8, kind 5): checked once at every stage boundary, the stage named.

Bad inputs (NaN latents, ``guidance_scale=nan``, a NaN interpolate weight) are input errors before
any network runs (tests/test_bad_inputs_arguments.py). What remains is a stage that overflows
(fp16 range, an extreme but finite guidance scale): each network is made to return Inf in turn, and
the error must name that stage rather than blame the decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime import (
    KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline)
from kandinsky_trt.runtime.pipelines.components import Components, PipelineInputError
from kandinsky_trt.runtime.processing.images import NonFiniteOutputError, postprocess

E = 32
EMB = np.zeros((1, E), np.float32)
PICTURE = Image.new("RGB", (64, 64), (10, 200, 90))
SMALL = dict(height=64, width=64, num_inference_steps=2, output_type="np")


class _Overflowing:
    """A session whose first output is Inf in one element (what an fp16 overflow looks like)."""

    def __init__(self, session) -> None:
        self.session, self.network = session, session.network

    def run(self, feeds):
        outputs = dict(self.session.run(feeds))
        name = self.network.output_names[0]
        outputs[name] = outputs[name].copy()
        outputs[name].flat[0] = np.inf
        return outputs


@pytest.fixture(scope="module")
def components(artifacts_fp32):
    with Components(artifacts_fp32[0]) as c:
        yield c


def _overflow_in(components, monkeypatch, network: str) -> None:
    """Stage networks are reached through ``Components.session``, loop networks through the backend's
    ``load`` (``backend.loop`` builds the loop from it): patch both."""
    real = type(components).session.__get__(components)
    monkeypatch.setattr(components, "session",
                        lambda name, profile=0: _Overflowing(real(name, profile)) if name == network else real(name, profile))
    load = components.backend.load
    monkeypatch.setattr(components.backend, "load",
                        lambda name, profile=0: _Overflowing(load(name, profile)) if name == network else load(name, profile))


@pytest.mark.parametrize("network, stage", [
    ("prior_text_encoder", r"prior_text_encoder\.text_embeds"),
    ("prior", r"prior loop \(final latents\)"),
    ("text_encoder", r"text_encoder\.text_embeds"),
    ("unet", r"unet loop \(final latents\)"),
    ("movq_decoder", r"movq_decoder\.image"),
])
def test_combined_names_the_stage_that_overflowed(network, stage, artifacts_fp32, monkeypatch):
    components = Components(artifacts_fp32[0])  # fresh: its loops are built from the patched backend
    _overflow_in(components, monkeypatch, network)
    with components, pytest.raises(NonFiniteOutputError, match=rf"^{stage}: expected finite output, found \d+ NaN/Inf values "
                                                   rf"in row\(s\) \[0\] \(overflow inside"):
        KandinskyCombinedPipeline(components=components)("a cat", prior_num_inference_steps=2, generator=0, **SMALL)


def test_image_encoder_and_movq_encoder_are_checked(components, monkeypatch):
    _overflow_in(components, monkeypatch, "movq_encoder")
    with pytest.raises(NonFiniteOutputError, match=r"^movq_encoder\.latents: expected finite output"):
        KandinskyImg2ImgCombinedPipeline(components=components)("a", PICTURE, prior_num_inference_steps=2,
                                                                strength=0.5, generator=0, **SMALL)
    _overflow_in(components, monkeypatch, "image_encoder")
    with pytest.raises(NonFiniteOutputError, match=r"^image_encoder\.image_embeds: expected finite output"):
        KandinskyPriorPipeline(components=components).interpolate([PICTURE], [1.0], num_inference_steps=2)


def test_extreme_finite_guidance_overflows_in_the_unet_loop(components):
    """A finite scale is valid input; if it overflows float32, the loop that overflowed is named."""
    with pytest.raises(NonFiniteOutputError, match=r"^unet loop \(final latents\): expected finite output"):
        KandinskyPipeline(components=components)("a", EMB + 1, EMB - 1, guidance_scale=1e38, generator=0, **SMALL)


def test_interpolate_weights_that_overflow_float32(components):
    with pytest.raises(NonFiniteOutputError, match=r"^interpolate \(weighted sum of the conditions\): .*weights too large"):
        KandinskyPriorPipeline(components=components).interpolate(
            ["a cat", "a dog"], [3e38, 3e38], num_inference_steps=2, generator=0)


@pytest.mark.parametrize("call", [
    lambda c: KandinskyPipeline(components=c)("a", EMB, EMB, latents=np.full((1, 4, 8, 8), np.nan), **SMALL),
    lambda c: KandinskyPipeline(components=c)("a", EMB, EMB, guidance_scale=float("nan"), **SMALL),
    lambda c: KandinskyPriorPipeline(components=c).interpolate(["a", "b"], [float("nan"), 1.0], num_inference_steps=2),
    lambda c: KandinskyPipeline(components=c)("a", np.full((1, E), np.nan), EMB, **SMALL),
])
def test_non_finite_inputs_are_input_errors_not_decoder_overflow(call, components):
    """Issue 8's reproductions: these used to end in "fp16 overflow in the decoder?"."""
    with pytest.raises(PipelineInputError, match=r": expected (a )?finite"):
        call(components)


def test_non_finite_output_is_an_error_not_a_black_image():
    images = np.zeros((2, 3, 8, 8), np.float32)
    images[1, 0, 0, 0] = np.nan
    with pytest.raises(NonFiniteOutputError, match=r"NaN/Inf values in image\(s\) \[1\]"):
        postprocess(images, "pil")
