"""Argument handling shared by the pipelines: one validator per kind of argument, used by all of them.

Every check raises :class:`PipelineInputError` naming the argument, what was expected and what was
found, before any network runs. Kinds: prompts (str, valid Unicode; checked with their negatives and
the images per prompt into :class:`Prompts`), counts (positive ints with an upper bound), numbers
(real, finite; guidance scales, strength, weights), seeds / generators, float arrays (latents, noise,
embeddings: numeric, finite, of the expected shape), callbacks.
"""

from __future__ import annotations

import math
import numbers
import re
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError, PipelineInputError
from kandinsky_trt.runtime.contract.spec import Profile
from kandinsky_trt.runtime.processing.tokenization import check_prompt_size

Generator = int | np.random.Generator | None
Size = int | None  # pixels; None: the artifacts' size

# Images per call (prompts x num_images_per_prompt): refused above this before anything is
# allocated. Rows run in chunks of the batches the artifacts hold, so more would only queue work in one call.
MAX_IMAGES_PER_CALL = 64


def describe(value) -> str:
    """How an offending value is shown: short values by repr, others by type."""
    text = repr(value)
    return text if len(text) <= 60 else f"a {type(value).__name__}"


def _check_text(text: str, name: str) -> str:
    """Valid Unicode, at most ``MAX_PROMPT_BYTES`` of UTF-8 (size first: a huge text is refused at once)."""
    check_prompt_size(text, name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # lone surrogates: from invalid UTF-8 bytes on a command line
        raise PipelineInputError(
            f"{name}: expected valid Unicode text, found the lone surrogate {text[err.start]!r} at character "
            f"{err.start} (invalid UTF-8 input?)") from None
    return text


def as_prompt_list(prompt, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise PipelineInputError(f"{name}: expected a str or a list of str, found {type(prompt).__name__}")
    if not prompts:
        raise PipelineInputError(f"{name}: expected at least one prompt, found an empty list")
    return [_check_text(p, name if len(prompts) == 1 else f"{name}[{i}]") for i, p in enumerate(prompts)]


def negative_prompts(negative_prompt, count: int, name: str = "negative_prompt") -> list[str] | None:
    """``None`` stays None; a str applies to every prompt; a list must match the prompt count."""
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [_check_text(negative_prompt, name)] * count
    negatives = as_prompt_list(negative_prompt, name)
    if len(negatives) != count:
        raise PipelineInputError(f"{name}: expected {count} prompts (one per prompt), found {len(negatives)}")
    return negatives


@dataclass(frozen=True)
class Prompts:
    """One call's prompts, checked: the texts, their negatives (None: none given), images per prompt."""

    texts: list[str]
    negatives: list[str] | None
    per_prompt: int

    def one_per_row(self) -> "Prompts":
        """The same rows as prompts of one image each (what a combined pipeline's decoder half gets)."""
        negatives = None if self.negatives is None else repeat_rows(self.negatives, self.per_prompt)
        return Prompts(repeat_rows(self.texts, self.per_prompt), negatives, 1)


def check_prompts(prompt, negative_prompt, num_images_per_prompt) -> Prompts:
    """``prompt``, ``negative_prompt`` (one per prompt) and ``num_images_per_prompt``, checked together."""
    texts = as_prompt_list(prompt)
    per_prompt = check_images_per_prompt(num_images_per_prompt, len(texts))
    return Prompts(texts, negative_prompts(negative_prompt, len(texts)), per_prompt)


def repeat_rows(items: list, n: int) -> list:
    """Each item ``n`` times in a row, [a, b] -> [a, a, b, b] (torch's ``repeat_interleave``)."""
    return [item for item in items for _ in range(n)]


def check_positive_int(value, name: str, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PipelineInputError(f"{name}: expected an integer >= 1, found {describe(value)}")
    if maximum is not None and value > maximum:
        raise PipelineInputError(f"{name}: expected an integer <= {maximum}, found {value}")
    return int(value)


def check_images_per_prompt(value, prompts: int, name: str = "num_images_per_prompt") -> int:
    """``value`` images for each of ``prompts`` prompts, at most :data:`MAX_IMAGES_PER_CALL` in all."""
    n = check_positive_int(value, name, MAX_IMAGES_PER_CALL)
    if n * prompts > MAX_IMAGES_PER_CALL:
        raise PipelineInputError(
            f"{name}: expected at most {MAX_IMAGES_PER_CALL} images per call (prompts x {name}), "
            f"found {prompts} x {n} = {prompts * n}")
    return n


def check_number(value, name: str) -> float:
    """A real, finite number (int or float, numpy scalars included; not bool, str or None)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise PipelineInputError(f"{name}: expected a finite number, found {describe(value)}")
    number = float(value)
    if not math.isfinite(number):
        raise PipelineInputError(f"{name}: expected a finite number, found {number}")
    return number


def check_guidance(value, name: str, profile: Profile) -> float:
    """A guidance scale; > 1 (diffusers' rule for classifier-free guidance) needs a cfg profile."""
    scale = check_number(value, name)
    if scale > 1.0 and not profile.cfg:
        raise PipelineInputError(
            f"{name}: these artifacts were exported without classifier-free guidance "
            f"(profile {profile.name}), so it must be <= 1; found {scale}")
    return scale


def _steps_run(strength: float, steps: int, train_timesteps: int) -> bool:
    """diffusers runs ``int(steps * strength)`` steps and noises at ``t = int(T * strength) - 2``."""
    return int(steps * strength) >= 1 and int(train_timesteps * strength) - 2 >= 0


def min_strength(steps: int, train_timesteps: int) -> float:
    """The smallest strength at which img2img runs a step, rounded up to 3 significant digits."""
    exact = max(1.0 / steps, 2.0 / train_timesteps)
    for digits in range(3, 18):
        quantum = 10.0 ** (math.floor(math.log10(exact)) - digits + 1)
        shown = float(f"{math.ceil(exact / quantum) * quantum:.{digits}g}")
        if shown >= exact and _steps_run(shown, steps, train_timesteps):
            return shown
    return float(np.nextafter(exact, 2.0))


def check_strength(value, steps: int, train_timesteps: int = 1000) -> float:
    """img2img ``strength`` in (0, 1] that runs at least one of ``steps`` denoising steps.

    diffusers silently runs no step (or noises at t = 999 below 2 / T); here that is an error.
    """
    strength = check_number(value, "strength")
    if not 0.0 < strength <= 1.0:
        raise PipelineInputError(f"strength: expected a number in (0, 1], found {strength}")
    if not _steps_run(strength, steps, train_timesteps):
        raise PipelineInputError(
            f"strength: expected >= {min_strength(steps, train_timesteps)} with num_inference_steps={steps} "
            f"(img2img runs int({steps} * strength) steps, noised at t = int({train_timesteps} * strength) - 2), "
            f"found {strength}, which runs no step")
    return strength


def check_output_type(output_type: str, allowed: Sequence[str] = ("pil", "np")) -> str:
    if not isinstance(output_type, str) or output_type not in allowed:
        raise PipelineInputError(f"output_type: expected one of {tuple(allowed)}, found {describe(output_type)}")
    return output_type


def step_callback(callback, callback_steps):
    """diffusers' ``callback(i, t, latents)`` every ``callback_steps`` steps, or None."""
    every = check_positive_int(callback_steps, "callback_steps")
    if callback is None:
        return None
    if not callable(callback):
        raise PipelineInputError(f"callback: expected a callable (i, t, latents) or None, found {describe(callback)}")
    return lambda i, t, x: callback(i, t, x) if i % every == 0 else None


def rng(generator: Generator, name: str = "generator") -> np.random.Generator:
    """A numpy Generator from None (fresh entropy), an int seed >= 0 or a Generator."""
    if isinstance(generator, np.random.Generator):
        return generator
    if generator is None:
        return np.random.default_rng()
    if isinstance(generator, (bool, np.bool_)) or not isinstance(generator, (int, np.integer)):
        raise PipelineInputError(
            f"{name}: expected None, an int seed or a numpy Generator, found {type(generator).__name__}")
    if generator < 0:
        raise PipelineInputError(f"{name}: expected a seed >= 0, found {generator}")
    return np.random.default_rng(int(generator))


def float_array(value, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """``value`` as a finite float32 array (of ``shape`` when given): numpy arrays, nested lists,
    CPU torch tensors; not str, None, bool, complex or object arrays."""
    if value is None or isinstance(value, (str, bytes)):
        raise PipelineInputError(f"{name}: expected a float array, found {type(value).__name__}")
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:  # ragged lists, tensors that need .detach()
        raise PipelineInputError(f"{name}: expected a float array, found {type(value).__name__} ({err})") from None
    if array.dtype.kind not in "fiu":
        raise PipelineInputError(f"{name}: expected a float array, found dtype {array.dtype}")
    with np.errstate(over="ignore"):  # too large for float32 becomes inf, refused just below
        array = array.astype(np.float32, copy=False)
    if shape is not None and array.shape != tuple(shape):
        raise PipelineInputError(f"{name}: expected shape {tuple(shape)}, found {array.shape}")
    bad = array.size - int(np.isfinite(array).sum())
    if bad:
        raise PipelineInputError(f"{name}: expected finite values, found {bad} NaN/Inf (as float32)")
    return array


def check_array(value, shape: tuple[int, ...], name: str) -> np.ndarray | None:
    """An optional explicit draw: None stays None, anything else must be a finite array of ``shape``."""
    return None if value is None else float_array(value, name, shape)


def draw_or_check(array, shape: tuple[int, ...], name: str, generator: np.random.Generator) -> np.ndarray:
    """``array`` if given (checked against ``shape``), else a standard normal draw."""
    if array is None:
        return generator.standard_normal(shape, dtype=np.float32)
    return float_array(array, name, shape)


def embeddings(value, name: str, rows: int, width: int) -> np.ndarray:
    """Image embeddings ``(rows, width)``: one array, or a list of per-prompt arrays (diffusers accepts both)."""
    if isinstance(value, (list, tuple)) and value:
        parts = [float_array(v, f"{name}[{i}]") for i, v in enumerate(value)]
        if any(p.ndim == 0 or p.shape[-1] != width for p in parts):
            raise PipelineInputError(
                f"{name}: expected arrays of width {width}, found shapes {[p.shape for p in parts]}")
        array = np.concatenate([p.reshape(-1, width) for p in parts])
    else:
        array = float_array(value, name)
    if array.ndim != 2 or array.shape[1] != width:
        raise PipelineInputError(f"{name}: expected shape ({rows}, {width}), found {array.shape}")
    if array.shape[0] != rows:
        raise PipelineInputError(f"{name}: expected {rows} rows (one per prompt), found shape {array.shape}")
    return array


def check_weights(weights, count: int) -> list[float]:
    """``interpolate`` weights: one finite number per condition."""
    if not isinstance(weights, (list, tuple, np.ndarray)):
        raise PipelineInputError(f"weights: expected a list of {count} numbers, found {type(weights).__name__}")
    if len(weights) != count or not count:
        raise PipelineInputError(
            f"weights: expected one weight per condition ({count}), found {len(weights)}")
    return [check_number(w, f"weights[{i}]") for i, w in enumerate(weights)]


def check_conditions(conditions) -> int:
    """``interpolate`` conditions: a non-empty list of str / PIL images; returns the number of texts."""
    if not isinstance(conditions, (list, tuple)) or not conditions:
        raise PipelineInputError(
            f"images_and_prompts: expected a non-empty list of str / PIL.Image conditions, found {describe(conditions)}")
    for i, cond in enumerate(conditions):
        if isinstance(cond, str):
            _check_text(cond, f"images_and_prompts[{i}]")
        elif not hasattr(cond, "convert"):  # PIL images, without importing PIL here
            raise PipelineInputError(
                f"images_and_prompts[{i}]: expected a str or a PIL.Image, found {type(cond).__name__}")
    return sum(isinstance(c, str) for c in conditions)


def check_size(height: int | None, width: int | None, sizes: Sequence[tuple[int, int]],
               latent_scale: int) -> tuple[int, int]:
    """The request's size, rounded up as diffusers' ``get_new_h_w`` does; it must be one of ``sizes``.

    diffusers rounds each side up to a multiple of the MoVQ scale factor squared (``latent_scale**2``,
    64 for Kandinsky 2.1) and makes latents of ``side / latent_scale``.

    ``sizes``: the (height, width) pairs the artifacts hold, the default first. ``None`` means the
    default's (diffusers' 512 is the size its model was trained at; static-shape engines serve only
    the sizes they were built for). Called before any network runs, so a wrong size fails at once.
    """
    height = sizes[0][0] if height is None else height
    width = sizes[0][1] if width is None else width
    for name, value in (("height", height), ("width", width)):
        check_positive_int(value, name)
    multiple = latent_scale**2
    rounded = (-(-height // multiple) * multiple, -(-width // multiple) * multiple)
    if rounded not in sizes:
        held = ", ".join(f"{w}x{h}" for h, w in sizes)
        raise PipelineInputError(
            f"height/width: expected a size these artifacts hold (width x height: {held}), found width {width} "
            f"x height {height} (served as {rounded[1]}x{rounded[0]}). Export it with "
            f"`kandinsky-trt export --size {rounded[1]}x{rounded[0]}`"
        )
    return rounded


@contextmanager
def renamed(names: Mapping[str, str]):
    """Errors raised inside name arguments as the caller knows them (``{"latents": "decoder_latents"}``):
    the combined pipelines hand their arguments to the prior and decoder under the inner names."""
    try:
        yield
    except KandinskyTrtError as err:
        match = re.match(r"([A-Za-z_]+)(\[\d+\])?:", str(err))
        if match is None or match.group(1) not in names:
            raise
        raise type(err)(names[match.group(1)] + str(err)[len(match.group(1)):]) from None


def take(array: np.ndarray, rows: slice, batch: int) -> np.ndarray:
    """``array[rows]`` padded to ``batch`` rows by repeating the last one (static engine shapes)."""
    part = array[rows]
    if part.shape[0] < batch:
        part = np.concatenate([part, np.repeat(part[-1:], batch - part.shape[0], axis=0)])
    return part


def take_list(items: list, rows: slice, batch: int) -> list:
    part = items[rows]
    return part + [part[-1]] * (batch - len(part))
