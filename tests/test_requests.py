"""The typed requests (runtime/pipelines/requests.py) and the Components split (loaded vs run).

A request built by hand from the settings dataclasses and run by a pipeline's ``run`` is the
pipeline's ``__call__`` with the same arguments, bit for bit (the CLI and the server rely on it);
a request is checked once, frozen, and the decoder's request is one type before and after its image
embeddings are attached.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kandinsky_trt.runtime import (Components, KandinskyCombinedPipeline, KandinskyInpaintCombinedPipeline,
                                   KandinskyPipeline, PipelineInputError)
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines import requests as rq
from kandinsky_trt.runtime.pipelines.loaded import LoadedArtifacts

SMALL = dict(num_inference_steps=2, prior_num_inference_steps=2)


@pytest.fixture(scope="module")
def components(artifacts_fp32):
    with Components(artifacts_fp32[0]) as c:
        yield c


def test_components_split_loaded_from_run(components):
    """What is loaded (sessions, tables) lives on ``components.loaded``; the run side shares it."""
    assert isinstance(components.loaded, LoadedArtifacts)
    assert components.manifest is components.loaded.manifest and components.backend is components.loaded.backend
    assert components.session("text_encoder") is components.loaded.session("text_encoder")
    assert components.loaded.scheduler("decoder", 3) is components.loaded.scheduler("decoder", 3)  # cached
    for run_side in ("run", "denoise", "chunks", "should_stop"):
        assert not hasattr(components.loaded, run_side), run_side


def test_built_request_runs_as_the_call(components):
    """combined_request + run == KandinskyCombinedPipeline.__call__ (what the CLI and the server do)."""
    pipe = KandinskyCombinedPipeline(components=components)
    expected = pipe(["a cat", "a dog"], num_images_per_prompt=2, generator=3, output_type="np", **SMALL).images
    prompts = args.check_prompts(["a cat", "a dog"], None, 2)
    request = rq.combined_request(components.loaded, prompts, rq.PriorSettings(num_inference_steps=2),
                                  rq.DecoderSettings(num_inference_steps=2, output_type="np"), args.rng(3))
    assert request.prior.rng is request.decoder.rng  # one generator for both halves, in diffusers' order
    np.testing.assert_array_equal(pipe.run(request).images, expected)


def test_decoder_request_is_one_type_before_and_after_the_embeddings(components):
    loaded = components.loaded
    request = rq.decoder_request(loaded, args.check_prompts("a cat", None, 2), rq.DecoderSettings(num_inference_steps=2),
                                 args.rng(0))
    assert request.image_embeds is None and request.latent_shape[0] == 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.steps = 3  # type: ignore[misc]
    with pytest.raises(PipelineInputError, match="^image_embeds: expected embeddings attached"):
        KandinskyPipeline(components=components).run(request)
    width = loaded.embedding_width
    ready = rq.with_embeddings(loaded, request, np.ones((1, width)), np.zeros((1, width)))
    assert type(ready) is type(request) and ready.image_embeds.shape == (2, width)  # repeated per image
    assert dataclasses.replace(ready, image_embeds=None, negative_image_embeds=None) == request
    with pytest.raises(PipelineInputError, match=r"^negative_image_embeds: expected shape \(1, "):
        rq.with_embeddings(loaded, request, np.ones((1, width)), np.zeros((1, width + 1)))


@pytest.mark.parametrize("settings, message", [
    (rq.PriorSettings(guidance_scale="x"), "prior_guidance_scale: expected a finite number"),
    (rq.PriorSettings(num_inference_steps=0), "prior_num_inference_steps: expected an integer >= 1"),
    (rq.PriorSettings(step_noise=np.zeros(3)), "prior_step_noise: expected shape"),
])
def test_combined_request_names_the_combined_arguments(components, settings, message):
    """The builders are given the public names (no renaming of caught errors)."""
    prompts = args.check_prompts("a cat", None, 1)
    with pytest.raises(PipelineInputError, match="^" + message):
        rq.combined_request(components.loaded, prompts, settings, rq.DecoderSettings(), args.rng(0))


def test_inpaint_request_checks_before_any_network(components, monkeypatch):
    """Every decoder input is checked by the builder, before the prior runs."""
    monkeypatch.setattr(components, "session", lambda *a: pytest.fail("a network was loaded"))
    pipe = KandinskyInpaintCombinedPipeline(components=components)
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(PipelineInputError, match=r"^decoder_latents: expected shape"):
        pipe("a cat", image, np.zeros((64, 64), np.float32), decoder_latents=np.zeros((1, 2)), **SMALL)
