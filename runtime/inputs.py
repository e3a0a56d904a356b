"""Argument handling shared by the pipelines: prompts, random draws, batch chunks, validation.

Every check raises :class:`PipelineInputError` naming the argument, what was expected and what was
found, before any network runs.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from kandinsky_trt.runtime.components import PipelineInputError
from kandinsky_trt.runtime.spec import Profile

Generator = int | np.random.Generator | None
Size = int | None  # pixels; None: the artifacts' size


def as_prompt_list(prompt, name: str = "prompt") -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not all(isinstance(p, str) for p in prompts):
        raise PipelineInputError(f"{name}: expected a str or a list of str, found {type(prompt).__name__}")
    if not prompts:
        raise PipelineInputError(f"{name}: expected at least one prompt, found an empty list")
    return list(prompts)


def negative_prompts(negative_prompt, count: int) -> list[str] | None:
    """``None`` stays None; a str applies to every prompt; a list must match the prompt count."""
    if negative_prompt is None:
        return None
    if isinstance(negative_prompt, str):
        return [negative_prompt] * count
    negatives = as_prompt_list(negative_prompt, "negative_prompt")
    if len(negatives) != count:
        raise PipelineInputError(
            f"negative_prompt: expected {count} prompts (one per prompt), found {len(negatives)}")
    return negatives


def check_positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise PipelineInputError(f"{name}: expected an integer >= 1, found {value!r}")
    return int(value)


def check_output_type(output_type: str, allowed: Sequence[str] = ("pil", "np")) -> str:
    if output_type not in allowed:
        raise PipelineInputError(f"output_type: expected one of {tuple(allowed)}, found {output_type!r}")
    return output_type


def rng(generator: Generator) -> np.random.Generator:
    """A numpy Generator from None (fresh entropy), an int seed or a Generator."""
    if generator is None or isinstance(generator, (int, np.integer)):
        return np.random.default_rng(generator)
    if isinstance(generator, np.random.Generator):
        return generator
    raise PipelineInputError(f"generator: expected None, an int seed or a numpy Generator, found {type(generator).__name__}")


def draw_or_check(array, shape: tuple[int, ...], name: str, generator: np.random.Generator) -> np.ndarray:
    """``array`` if given (checked against ``shape``), else a standard normal draw."""
    if array is None:
        return generator.standard_normal(shape, dtype=np.float32)
    array = np.asarray(array, dtype=np.float32)
    if array.shape != shape:
        raise PipelineInputError(f"{name}: expected shape {shape}, found {array.shape}")
    return array


def check_size(height: int | None, width: int | None, profile: Profile) -> tuple[int, int]:
    """The request's size, rounded up to a multiple of 64 as diffusers does; it must be the profile's.

    ``None`` means the size the artifacts were exported for (diffusers' 512 is the size its model was
    trained at; a static-shape engine can only serve what it was built for). Called before any
    network runs, so a wrong size fails at once.
    """
    height = profile.height if height is None else height
    width = profile.width if width is None else width
    for name, value in (("height", height), ("width", width)):
        check_positive_int(value, name)
    rounded = (-(-height // 64) * 64, -(-width // 64) * 64)
    if rounded != (profile.height, profile.width):
        raise PipelineInputError(
            f"height/width: these artifacts were exported for {profile.height}x{profile.width} "
            f"(profile {profile.name}); found {height}x{width}. Export another profile with "
            f"`kandinsky-trt export --height {rounded[0]} --width {rounded[1]}`"
        )
    return rounded


def chunks(rows: int, batch: int) -> Iterator[slice]:
    for start in range(0, rows, batch):
        yield slice(start, min(start + batch, rows))


def take(array: np.ndarray, rows: slice, batch: int) -> np.ndarray:
    """``array[rows]`` padded to ``batch`` rows by repeating the last one (static engine shapes)."""
    part = array[rows]
    if part.shape[0] < batch:
        part = np.concatenate([part, np.repeat(part[-1:], batch - part.shape[0], axis=0)])
    return part


def take_list(items: list, rows: slice, batch: int) -> list:
    part = items[rows]
    return part + [part[-1]] * (batch - len(part))
