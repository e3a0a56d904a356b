"""A simulated CUDA device: memory by pointer, streams that count syncs, buffers, capture and replay.

:func:`install_cuda` makes the runtime's CUDA wrapper (device, streams, buffers) these stand-ins;
:class:`FakeCuda` replaces the capture/launch operations where a loop takes a ``cuda`` layer.
"""

from __future__ import annotations

import numpy as np

from kandinsky_trt.runtime.cuda import runtime_api as cuda

H100 = cuda.DeviceInfo(0, "NVIDIA H100 80GB HBM3", "9.0")


class FakeMemory:
    """Device memory by pointer: one byte array, bump allocation, frees recorded."""

    BASE = 0x10000

    def __init__(self, size: int = 1 << 16) -> None:
        self.bytes = np.zeros(size, np.uint8)
        self.top = 0
        self.freed: list[int] = []

    def alloc(self, nbytes: int) -> int:
        ptr = self.BASE + self.top
        self.top += -(-nbytes // 256) * 256  # 256-byte aligned, like cudaMalloc
        assert self.top <= self.bytes.size
        return ptr

    def view(self, ptr: int, nbytes: int) -> np.ndarray:
        offset = ptr - self.BASE
        return self.bytes[offset:offset + nbytes]


class FakeStream:
    def __init__(self) -> None:
        self.handle, self.syncs, self.closed = object(), 0, False

    @property
    def ptr(self) -> int:
        return 7

    def synchronize(self) -> None:
        self.syncs += 1

    def close(self) -> None:
        self.closed, self.handle = True, None


def fake_buffer_class(memory: FakeMemory):
    """A ``cuda.DeviceBuffer`` stand-in on ``memory`` (copies are immediate)."""

    class FakeDeviceBuffer:
        def __init__(self, nbytes: int) -> None:
            self.nbytes, self.ptr = nbytes, memory.alloc(nbytes)

        def copy_from_host(self, array, stream=None, offset=0):
            assert offset + array.nbytes <= self.nbytes, "copy_from_host past the end of the buffer"
            memory.view(self.ptr + offset, array.nbytes)[:] = np.frombuffer(np.ascontiguousarray(array).tobytes(),
                                                                            np.uint8)

        def copy_to_host(self, out, stream=None):
            out.view(np.uint8).reshape(-1)[:] = memory.view(self.ptr, out.nbytes)
            return out

        def close(self):
            if self.ptr:
                memory.freed.append(self.ptr)
                self.ptr = 0

    return FakeDeviceBuffer


class FakeCuda:
    """Stream capture records operations instead of running them; a graph launch replays them."""

    def __init__(self, memory: FakeMemory) -> None:
        self.memory, self.capturing, self.recorded = memory, False, []
        self.graphs: dict[int, list] = {}
        self.execs: dict[int, list] = {}
        self.next_id = 0

    def _submit(self, op) -> None:
        if self.capturing:
            self.recorded.append(op)
        else:
            op()

    def memcpy_d2d(self, dst, src, nbytes, stream):
        self._submit(lambda: self.memory.view(dst, nbytes).__setitem__(slice(None), self.memory.view(src, nbytes)))

    def kernel(self, fn):
        self._submit(fn)

    def begin_capture(self, stream):
        assert not self.capturing
        self.capturing, self.recorded = True, []

    def end_capture(self, stream):
        self.capturing, self.next_id = False, self.next_id + 1
        self.graphs[self.next_id] = self.recorded
        return self.next_id

    def instantiate(self, graph):
        self.next_id += 1
        self.execs[self.next_id] = list(self.graphs[graph])
        return self.next_id

    def launch(self, graph_exec, stream):
        for op in self.execs[graph_exec]:
            op()

    def destroy_graph(self, graph):
        del self.graphs[graph]

    def destroy_graph_exec(self, graph_exec):
        del self.execs[graph_exec]


def install_cuda(monkeypatch, memory: FakeMemory | None = None) -> None:
    """The runtime's CUDA wrapper on a simulated H100: its device, and with ``memory`` its streams and buffers."""
    monkeypatch.setattr(cuda, "device_info", lambda device=None: H100)
    if memory is not None:
        monkeypatch.setattr(cuda, "Stream", FakeStream)
        monkeypatch.setattr(cuda, "DeviceBuffer", fake_buffer_class(memory))
