"""Decode one Triton request's tensors into generation items, with the request-level checks.

Only what the pipelines cannot see is checked here: required tensors, the task name, datatypes and
shapes against :mod:`~kandinsky_trt.runtime.serve.contract` (Triton checks them too, from the same
contract, before the model sees a request), UTF-8 text, inputs a task does not take, and the
server's limit on images per item. Every argument check of the generation itself (size, steps,
strength, guidance, image contents) is the pipelines' own, with their messages.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.serve.contract import INPUTS, NUMPY_DTYPES, TASKS, TensorSpec

_SPECS = {t.name: t for t in INPUTS}
# Which of the image inputs each task takes (everything else is common to all tasks).
TASK_IMAGES = {"text2img": (), "prior": (), "img2img": ("image",), "interpolate": ("image",),
               "inpaint": ("image", "mask")}


class RequestError(KandinskyTrtError, ValueError):
    """A request that does not fit the model's request contract."""


@dataclass(frozen=True)
class Item:
    """One generation of a request; ``None`` means "not sent" (the pipeline's default applies)."""

    task: str
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    num_images: int | None = None
    guidance_scale: float | None = None
    num_inference_steps: int | None = None
    prior_steps: int | None = None
    height: int | None = None
    width: int | None = None
    strength: float | None = None
    image: np.ndarray | None = None  # uint8 H x W x 3
    mask: np.ndarray | None = None  # uint8 H x W


def _check_tensor(spec: TensorSpec, array: np.ndarray) -> None:
    expected = np.dtype(NUMPY_DTYPES[spec.datatype])
    if array.dtype != expected and not (spec.datatype == "BYTES" and array.dtype.kind in "OSU"):
        raise RequestError(f"{spec.name}: expected datatype {spec.datatype}, found numpy {array.dtype}")
    dims = tuple(d for d in spec.dims)
    if array.ndim != len(dims) + 1 or any(d != -1 and d != n for d, n in zip(dims, array.shape[1:])):
        shown = ", ".join(str(d) for d in dims)
        raise RequestError(f"{spec.name}: expected shape [B, {shown}], found {list(array.shape)}")


def _text(value, name: str) -> str:
    if isinstance(value, str):
        return value
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(f"{name}: expected UTF-8 text, found bytes that are not UTF-8") from None


def _scalar(name: str, array: np.ndarray):
    value = array.reshape(-1)[0]
    if _SPECS[name].datatype == "BYTES":
        return _text(value, name)
    return float(value) if array.dtype.kind == "f" else int(value)


def _batch_size(inputs: dict[str, np.ndarray]) -> int:
    sizes = {name: a.shape[0] if a.ndim else 0 for name, a in inputs.items()}
    if len(set(sizes.values())) != 1 or 0 in sizes.values():
        found = ", ".join(f"{n} {s}" for n, s in sorted(sizes.items()))
        raise RequestError(f"inputs: expected one batch size B >= 1 shared by every tensor, found {found}")
    return next(iter(sizes.values()))


def _check_task_inputs(task: str, present: set[str]) -> None:
    if task not in TASKS:
        raise RequestError(f"task: expected one of {TASKS}, found {task!r}")
    for name in ("image", "mask"):
        wanted, article = name in TASK_IMAGES[task], "an" if name == "image" else "a"
        if wanted and name not in present:
            raise RequestError(f"{name}: task {task} expects {article} {name} input, found none")
        if not wanted and name in present:
            raise RequestError(f"{name}: task {task} takes no {name}, found one")


def decode_request(inputs: dict[str, np.ndarray], max_images: int) -> list[Item]:
    """The request's items (one per batch row), or :class:`RequestError` for the whole request."""
    for name in ("task", "prompt"):
        if name not in inputs:
            raise RequestError(f"{name}: expected a BYTES input tensor {name!r}, found none")
    for name, array in inputs.items():
        if name not in _SPECS:
            raise RequestError(f"{name}: expected one of the model's inputs {tuple(_SPECS)}, found {name!r}")
        _check_tensor(_SPECS[name], array)
    items = []
    for row in range(_batch_size(inputs)):
        fields = {name: (array[row] if name in ("image", "mask") else _scalar(name, array[row]))
                  for name, array in inputs.items()}
        _check_task_inputs(fields["task"], set(fields))
        n = fields.get("num_images")
        if n is not None and n > max_images:
            raise RequestError(f"num_images: expected at most {max_images} (this server's limit per prompt), "
                               f"found {n}")
        items.append(Item(**fields))
    return items
