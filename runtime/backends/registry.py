"""Backends by name: the runtime's own (``ort``, ``trt``) and those other packages register.

A package adds a backend through the ``kandinsky_trt.backends`` entry point, naming a factory
``(manifest, device) -> Backend``; the export layer registers ``torch`` (the parity oracle) that way,
so the runtime never imports torch or the export layer to offer it.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import import_module
from importlib.metadata import entry_points

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.errors import PipelineInputError

from .base import Backend

ENTRY_POINT_GROUP = "kandinsky_trt.backends"
_BUILTIN = {"ort": "kandinsky_trt.runtime.backends.ort:create", "trt": "kandinsky_trt.runtime.backends.trt:create"}


@lru_cache(maxsize=1)
def _factories() -> dict[str, str]:
    found = {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return dict(sorted({**found, **_BUILTIN}.items()))


def backend_names() -> tuple[str, ...]:
    """Every backend name this install offers, sorted."""
    return tuple(_factories())


def check_backend(name: object, argument: str = "backend") -> str:
    if name not in _factories():
        raise PipelineInputError(f"{argument}: expected one of {backend_names()}, found {name!r}")
    return name


def make_backend(name: str, manifest: mf.Manifest, device: str = "cpu") -> Backend:
    module, _, factory = _factories()[check_backend(name)].partition(":")
    return getattr(import_module(module), factory)(manifest, device)
