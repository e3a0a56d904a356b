"""Which storage a loop of slots runs on: bound device buffers, or host arrays.

The loops layer picks, so backends never import loops (no backend <-> loop circle): every
:class:`~kandinsky_trt.runtime.backends.base.DeviceBackend` (ONNX Runtime with IO binding, TensorRT)
gets :class:`~kandinsky_trt.runtime.loops.slots.SlotLoop` over
:class:`~kandinsky_trt.runtime.loops.device.DeviceStorage`; every other backend (ONNX Runtime on
the CPU, ``torch``) over :class:`~kandinsky_trt.runtime.loops.host.HostStorage` on its host-level sessions.
"""

from __future__ import annotations

from kandinsky_trt.runtime.backends.base import Backend, DeviceBackend
from kandinsky_trt.runtime.contract.loop_specs import LoopSpec
from kandinsky_trt.runtime.loops.device import DeviceStorage
from kandinsky_trt.runtime.loops.host import HostStorage
from kandinsky_trt.runtime.loops.slots import SlotLoop


def make_loop(backend: Backend, spec: LoopSpec, profile: int = 0, cuda_graph: bool = True) -> SlotLoop:
    """The loop of ``spec`` at manifest profile ``profile`` on ``backend``; the caller closes it
    (closing a loop never closes the backend). ``cuda_graph=False``: a device loop runs its
    bindings eagerly."""
    if isinstance(backend, DeviceBackend):
        return SlotLoop(spec, DeviceStorage(backend, spec, profile, cuda_graph))
    return SlotLoop(spec, HostStorage(spec, backend.load(spec.network, profile), backend.load(spec.step, profile)))
