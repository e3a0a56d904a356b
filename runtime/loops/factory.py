"""Which loop a backend runs: the loop of slots on host arrays, or the backend's device loop.

The loops layer picks the strategy, so backends never import loops (no backend <-> loop circle):
a backend with a device loop offers ``device_loop(spec, profile, cuda_graph)`` (None where it runs
on the host, e.g. ONNX Runtime on the CPU); every other backend gets
:class:`~kandinsky_trt.runtime.loops.slots.SlotLoop` over
:class:`~kandinsky_trt.runtime.loops.host.HostStorage` on its host-level sessions.
"""

from __future__ import annotations

from typing import Any

from kandinsky_trt.runtime.backends.base import Backend
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.loops.host import HostStorage
from kandinsky_trt.runtime.loops.slots import SlotLoop


def make_loop(backend: Backend, spec: LoopSpec, profile: int = 0, cuda_graph: bool = True) -> Any:
    """The loop of ``spec`` at manifest profile ``profile`` on ``backend``; the caller closes it
    (closing a loop never closes the backend)."""
    device_loop = getattr(backend, "device_loop", None)
    loop = device_loop(spec, profile, cuda_graph) if device_loop is not None else None
    if loop is not None:
        return loop
    return SlotLoop(spec, HostStorage(spec, backend.load(spec.network, profile), backend.load(spec.step, profile)))
