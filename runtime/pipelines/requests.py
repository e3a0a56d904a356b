"""The request types, one per stage, and the builders that check a caller's arguments into them.

A caller's arguments arrive as a settings dataclass (``PriorSettings``, ``DecoderSettings``: the
values as given, under the pipelines' public names and with their defaults) and are checked once,
by a builder, into a frozen request that the pipelines run without checking again:

- :class:`PriorRequest` (:func:`prior_request`): one prior run, its rows laid out as diffusers does;
- :class:`DecoderRequest` (:func:`decoder_request`): one decoder run; the decoder's own inputs
  (``Text2ImgInputs``, ``Img2ImgInputs``, ``InpaintInputs``) become its ``image`` start; the image
  embeddings are attached last (:func:`with_embeddings`), so a combined pipeline checks every
  argument before its prior runs;
- :class:`CombinedRequest` (:func:`combined_request`): a prior request and a decoder request sharing
  one generator, their errors naming the combined pipelines' arguments (``prior_guidance_scale``,
  ``decoder_latents``).

``interpolate`` has its own request (``interpolate_request``). Builders run no network and draw
nothing; they read the loaded artifacts (sizes, profiles, scheduler tables) to check.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable, img2img_timesteps
from kandinsky_trt.runtime.pipelines import inputs as args
from kandinsky_trt.runtime.pipelines.loaded import LoadedArtifacts
from kandinsky_trt.runtime.processing.images import (clip_image_preprocess, latent_keep_mask, prepare_img2img_image,
                                                   prepare_inpaint_inputs)


@dataclass(frozen=True)
class PriorNames:
    """What the prior's arguments are called where they were given (errors name them so)."""

    num_inference_steps: str = "num_inference_steps"
    guidance_scale: str = "guidance_scale"
    latents: str = "latents"
    step_noise: str = "step_noise"


# The combined pipelines' names for their prior's arguments.
COMBINED_PRIOR_NAMES = PriorNames("prior_num_inference_steps", "prior_guidance_scale", "latents", "prior_step_noise")


@dataclass(frozen=True)
class PriorSettings:
    """The prior's arguments as given (unchecked); defaults: diffusers' ``KandinskyPriorPipeline``."""

    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    latents: object = None  # (rows, E); None: drawn
    step_noise: object = None  # (stochastic steps, rows, E); None: drawn


@dataclass(frozen=True)
class PriorRequest:
    """One prior run, checked and row-aligned; ``latents`` / ``step_noise`` None: drawn from ``rng``."""

    cond: list[str]  # rows: the prompts (then the negatives) x images per prompt
    uncond: list[str]
    sample_negatives: bool  # the second half of the rows samples the negative prompts
    steps: int
    guidance_scale: float
    rng: np.random.Generator
    latents: np.ndarray | None  # (rows, E)
    step_noise: np.ndarray | None  # (stochastic steps, rows, E)


def _prior_texts(prompts: args.Prompts) -> tuple[list[str], list[str]]:
    """diffusers' row layout: with a negative prompt the prior also samples the negatives.
    (Without guidance the loop gives both halves the cond rows: ``Components.denoise``.)"""
    negatives = prompts.negatives
    texts = prompts.texts + negatives if negatives is not None else prompts.texts
    uncond = 2 * negatives if negatives is not None else [""] * len(texts)
    return args.repeat_rows(texts, prompts.per_prompt), args.repeat_rows(uncond, prompts.per_prompt)


def prior_stochastic_steps(loaded: LoadedArtifacts, steps: int) -> int:
    """How many of the prior's ``steps`` draw step noise."""
    return int(loaded.scheduler("prior", steps).stochastic.sum())


def prior_request(loaded: LoadedArtifacts, prompts: args.Prompts, settings: PriorSettings,
                  rng: np.random.Generator, names: PriorNames = PriorNames()) -> PriorRequest:
    """Check the prior's arguments into a request; runs no network and draws nothing."""
    steps = args.check_positive_int(settings.num_inference_steps, names.num_inference_steps)
    guidance_scale = args.check_guidance(settings.guidance_scale, names.guidance_scale, loaded.profile)
    cond, uncond = _prior_texts(prompts)
    shape = (len(cond), loaded.embedding_width)
    with args.renamed({"num_inference_steps": names.num_inference_steps}):  # the scheduler table's name for it
        noise_shape = (prior_stochastic_steps(loaded, steps), *shape)
    return PriorRequest(cond, uncond, prompts.negatives is not None, steps, guidance_scale, rng,
                        args.check_array(settings.latents, shape, names.latents),
                        args.check_array(settings.step_noise, noise_shape, names.step_noise))


@dataclass(frozen=True)
class Text2ImgInputs:
    """Text-to-image's own input: the initial latents (rows, 4, h, w); None: drawn."""

    latents: object = None
    latents_name: str = "latents"  # the combined pipelines call it "decoder_latents"


DEFAULT_STRENGTH = 0.3  # img2img's strength when none is given (diffusers')


@dataclass(frozen=True)
class Img2ImgInputs:
    """Image-to-image's own inputs: the image(s) (one, or one per prompt), strength, the noise mixed in."""

    image: object
    strength: float = DEFAULT_STRENGTH
    noise: object = None  # (rows, 4, h, w); None: drawn


@dataclass(frozen=True)
class InpaintInputs:
    """Inpainting's own inputs: the image(s), the mask(s) (white / 1 = repaint), the initial latents."""

    image: object
    mask_image: object
    latents: object = None
    latents_name: str = "latents"


DecoderInputs = Text2ImgInputs | Img2ImgInputs | InpaintInputs


@dataclass(frozen=True)
class DecoderSettings:
    """The decoder's arguments as given (unchecked); defaults: diffusers' ``KandinskyPipeline``."""

    num_inference_steps: int = 100
    guidance_scale: float = 4.0
    height: args.Size = None
    width: args.Size = None
    output_type: str = "pil"
    callback: Callable | None = None
    callback_steps: int = 1
    return_dict: bool = True
    scheduler: str | None = None
    step_noise: object = None  # (stochastic steps, rows, 4, h, w); None: drawn
    inputs: DecoderInputs = field(default_factory=Text2ImgInputs)


@dataclass(frozen=True)
class Img2ImgStart:
    """What img2img starts from: the preprocessed images (1 or one per prompt), noised at ``strength``."""

    pixels: np.ndarray
    strength: float
    train_timesteps: int
    noise: np.ndarray | None  # (rows, 4, h, w); None: drawn


@dataclass(frozen=True)
class InpaintStart:
    """What inpainting starts from: the preprocessed images and the keep-mask in latent space, per prompt."""

    pixels: np.ndarray
    keep: np.ndarray  # (prompts, 1, h, w)


@dataclass(frozen=True)
class DecoderRequest:
    """One decoder run, checked and row-aligned (rows = prompts x images per prompt).

    Built without the image embeddings (so a combined pipeline checks it before its prior runs);
    :func:`with_embeddings` attaches them, and the pipeline's ``run`` fills ``step_noise`` when it draws it.
    """

    prompts: list[str]  # rows
    negatives: list[str]  # rows
    count: int  # prompts
    per_prompt: int
    steps: int
    height: int
    width: int
    latent_shape: tuple[int, int, int, int]
    table: SchedulerTable  # the steps that run (img2img: the tail of the schedule)
    guidance_scale: float
    callback: Callable | None
    rng: np.random.Generator
    output_type: str
    return_dict: bool
    latents: np.ndarray | None = None  # text2img, inpaint: the initial draw, if given
    image: Img2ImgStart | InpaintStart | None = None  # None: text2img
    step_noise: np.ndarray | None = None  # (stochastic steps, rows, 4, h, w), if given
    image_embeds: np.ndarray | None = None  # (rows, E), attached by with_embeddings
    negative_image_embeds: np.ndarray | None = None  # (rows, E)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width): picks the profiles the rows run at."""
        return self.height, self.width


def decoder_request(loaded: LoadedArtifacts, prompts: args.Prompts, settings: DecoderSettings,
                    rng: np.random.Generator) -> DecoderRequest:
    """Check every decoder argument but the image embeddings and preprocess the images on the host;
    runs no network and draws nothing."""
    s = settings
    steps = args.check_positive_int(s.num_inference_steps, "num_inference_steps")
    args.check_output_type(s.output_type)
    guidance = args.check_guidance(s.guidance_scale, "guidance_scale", loaded.profile)
    callback = args.step_callback(s.callback, s.callback_steps)
    height, width = args.check_size(s.height, s.width, loaded.sizes, loaded.latent_scale)
    n, rows = prompts.per_prompt, len(prompts.texts) * prompts.per_prompt
    request = DecoderRequest(
        args.repeat_rows(prompts.texts, n), args.repeat_rows(prompts.negatives or [""] * len(prompts.texts), n),
        count=len(prompts.texts), per_prompt=n, steps=steps, height=height, width=width,
        latent_shape=loaded.latent_shape(rows, height, width), table=loaded.scheduler("decoder", steps, s.scheduler),
        guidance_scale=guidance, callback=callback, rng=rng, output_type=s.output_type, return_dict=s.return_dict)
    if isinstance(s.inputs, Img2ImgInputs):  # img2img: also the part of the table that runs
        request = _with_img2img(loaded, request, s.inputs)
    elif isinstance(s.inputs, InpaintInputs):
        request = _with_inpaint(loaded, request, s.inputs)
    else:
        request = replace(request, latents=args.check_array(s.inputs.latents, request.latent_shape, s.inputs.latents_name))
    stochastic = int(request.table.stochastic.sum())
    step_noise = args.check_array(s.step_noise, (stochastic, *request.latent_shape), "step_noise")
    return replace(request, step_noise=step_noise)


def _pixels(pixels: list[np.ndarray], request: DecoderRequest, name: str) -> np.ndarray:
    if len(pixels) not in (1, request.count):
        raise PipelineInputError(f"{name}: expected 1 image or one per prompt ({request.count}), found {len(pixels)}")
    return np.concatenate(pixels)


def _with_img2img(loaded: LoadedArtifacts, request: DecoderRequest, inputs: Img2ImgInputs) -> DecoderRequest:
    train = request.table.config.get("num_train_timesteps", 1000)
    strength = args.check_strength(inputs.strength, request.steps, train)
    images = inputs.image if isinstance(inputs.image, (list, tuple)) else [inputs.image]
    scale = loaded.latent_scale
    pixels = _pixels([prepare_img2img_image(i, request.height, request.width, scale) for i in images], request, "image")
    table = img2img_timesteps(request.table, request.steps, strength)[0]
    start = Img2ImgStart(pixels, strength, train, args.check_array(inputs.noise, request.latent_shape, "noise"))
    return replace(request, table=table, image=start)


def _with_inpaint(loaded: LoadedArtifacts, request: DecoderRequest, inputs: InpaintInputs) -> DecoderRequest:
    if not loaded.has("unet_inpaint"):
        raise PipelineInputError("artifacts: expected an inpaint UNet (export with --inpaint DIR), found none")
    with args.renamed({"mask": "mask_image"}):  # image_processing's name for it
        pixels, keep = prepare_inpaint_inputs(inputs.image, inputs.mask_image, request.height, request.width,
                                              loaded.latent_scale)
    pixels = _pixels(list(pixels[:, None]), request, "image")
    keep = latent_keep_mask(keep, request.latent_shape[-2:])
    if len(keep) not in (1, request.count):
        raise PipelineInputError(f"mask_image: expected 1 mask or one per prompt ({request.count}), found {len(keep)}")
    keep = np.repeat(keep, request.count // len(keep), axis=0)
    latents = args.check_array(inputs.latents, request.latent_shape, inputs.latents_name)
    return replace(request, latents=latents, image=InpaintStart(pixels, keep))


def with_embeddings(loaded: LoadedArtifacts, request: DecoderRequest, image_embeds,
                    negative_image_embeds) -> DecoderRequest:
    """The request with its image embeddings checked (one row per prompt, or per row) and attached."""
    width = loaded.embedding_width
    embeds = [np.repeat(args.embeddings(value, name, request.count, width), request.per_prompt, axis=0)
              for value, name in ((image_embeds, "image_embeds"), (negative_image_embeds, "negative_image_embeds"))]
    return replace(request, image_embeds=embeds[0], negative_image_embeds=embeds[1])


@dataclass(frozen=True)
class CombinedRequest:
    """A combined pipeline's run: the prior's request, then the decoder's (embeddings not yet attached)."""

    prior: PriorRequest
    decoder: DecoderRequest


def combined_request(loaded: LoadedArtifacts, prompts: args.Prompts, prior: PriorSettings, decoder: DecoderSettings,
                     rng: np.random.Generator) -> CombinedRequest:
    """Check both halves (the decoder's first: no network runs before every argument is checked).

    The decoder gets the prompts repeated per image (one image each; its own inputs, images and
    masks, must be given one per row); one generator serves both halves, so the draws come in
    diffusers' order: prior latents and noise, then the decoder's.
    """
    decoder_part = decoder_request(loaded, prompts.one_per_row(), decoder, rng)
    return CombinedRequest(prior_request(loaded, prompts, prior, rng, COMBINED_PRIOR_NAMES), decoder_part)


def images_per_row(image, prompts: args.Prompts) -> list:
    """A combined pipeline's images as its decoder takes them, one per row: a bare image or a list of
    one or one per prompt, repeated per image."""
    images = image if isinstance(image, (list, tuple)) else [image]
    if len(images) == 1:
        images = images * len(prompts.texts)
    return args.repeat_rows(images, prompts.per_prompt)


@dataclass(frozen=True)
class InterpolateSettings:
    """``interpolate``'s arguments but the conditions and weights, as given; defaults: diffusers'."""

    num_images_per_prompt: int = 1
    num_inference_steps: int = 25
    latents: object = None
    negative_prior_prompt: object = None
    negative_prompt: object = ""
    guidance_scale: float = 4.0
    step_noise: object = None  # one array per prior run: each text condition, then the negative


@dataclass(frozen=True)
class InterpolateRequest:
    """One ``interpolate`` call, checked: the conditions (texts, or CLIP pixels of the images), their
    weights, the images per condition, and one prior request per text condition, then the negative's."""

    conditions: list  # str | np.ndarray (CLIP pixels)
    weights: list[float]
    per_prompt: int
    runs: list[PriorRequest]
    negative_is_prompt: bool  # a non-empty negative_prompt: its sample is the negative embedding


def interpolate_request(loaded: LoadedArtifacts, images_and_prompts, weights, settings: InterpolateSettings,
                        rng: np.random.Generator) -> InterpolateRequest:
    """Check ``interpolate``'s arguments before any network runs (images become CLIP pixels)."""
    s, conditions = settings, images_and_prompts
    texts = args.check_conditions(conditions)
    weights = args.check_weights(weights, len(conditions))
    n = args.check_images_per_prompt(s.num_images_per_prompt, 1)
    negatives = args.negative_prompts(s.negative_prior_prompt, 1, "negative_prior_prompt")
    # Each prior run samples its prompt's rows and, with a negative_prior_prompt, the negative's
    # too: (2n, E) latents, as diffusers' __call__ (prompt + negative_prompt) takes them.
    rows = n * (1 if negatives is None else 2)
    args.check_array(s.latents, (rows, loaded.embedding_width), "latents")
    if not isinstance(s.negative_prompt, str):
        raise PipelineInputError(f"negative_prompt: expected a str, found {type(s.negative_prompt).__name__}")
    args.as_prompt_list(s.negative_prompt, "negative_prompt")  # valid Unicode
    noise = s.step_noise
    if noise is not None and (not isinstance(noise, (list, tuple)) or len(noise) != texts + 1):
        raise PipelineInputError(f"step_noise: expected a list of {texts + 1} arrays (one per text condition, "
                                 f"then the negative), found {args.describe(noise)}")
    prompts = [c for c in conditions if isinstance(c, str)] + [s.negative_prompt]
    runs = [prior_request(loaded, args.Prompts([text], negatives, n),
                          PriorSettings(s.num_inference_steps, s.guidance_scale, s.latents,
                                        None if noise is None else noise[i]), rng)
            for i, text in enumerate(prompts)]
    pixels = [c if isinstance(c, str) else clip_pixels(loaded, c) for c in conditions]
    return InterpolateRequest(pixels, weights, n, runs, s.negative_prompt != "")


def clip_pixels(loaded: LoadedArtifacts, image) -> np.ndarray:
    """A PIL image as the image encoder takes it, preprocessed like diffusers' CLIPImageProcessor."""
    config = loaded.manifest.image_processor
    return clip_image_preprocess(image, size=config["size"], mean=config["mean"], std=config["std"])
