"""The CUDA-graph loop (:mod:`kandinsky_trt.runtime.cuda.graphs`): warm-up, capture, replay, invalidation.

CPU tests (always run) use the simulated CUDA layer of ``tests/fakes/cuda.py``, whose stream
capture records operations and whose graph launch replays them: they check our logic, not CUDA.
The ``gpu`` test runs real capture/launch; its marker skips it where cuda-python or a GPU is missing (it was
not executed where this file was written: no GPU there).
"""

from __future__ import annotations

import numpy as np
import pytest
from fakes.cuda import FakeCuda, FakeMemory, FakeStream  # tests/ is on sys.path under pytest

from kandinsky_trt.runtime.cuda import runtime_api as cuda
from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.cuda.graphs import CapturedLoop, LoopConfig, RowCopy, StepChain


# -- CapturedLoop against a simulated CUDA layer ------------------------------------------------------


class Buf:
    def __init__(self, memory: FakeMemory, array: np.ndarray) -> None:
        array = np.ascontiguousarray(array, dtype=np.float32)
        self.memory, self.nbytes, self.ptr = memory, array.nbytes, memory.alloc(array.nbytes)
        self.shape = array.shape
        memory.view(self.ptr, self.nbytes)[:] = np.frombuffer(array.tobytes(), np.uint8)

    def array(self) -> np.ndarray:
        return self.memory.view(self.ptr, self.nbytes).view(np.float32).reshape(self.shape)


STEPS = 6


class _Arena:
    """Stands in for the backend: its ``generation`` changes when its arena moves."""

    generation = 0


def _toy_loop(enabled: bool, move_at: int | None = None):
    """A denoising-shaped loop: x_next = x * c[0] + c[1] + noise, carried back into x; per-step rows."""
    memory = FakeMemory()
    fake = FakeCuda(memory)
    rng = np.random.default_rng(3)
    coefficients, noise, x0 = (rng.standard_normal(s).astype(np.float32) for s in ((STEPS, 2), (STEPS, 4), (4,)))
    bufs = {"x": Buf(memory, x0), "c": Buf(memory, np.zeros(2)), "noise": Buf(memory, np.zeros(4)),
            "x_next": Buf(memory, np.zeros(4))}
    arena, workspace = _Arena(), [Buf(memory, np.zeros(1))]  # what the network's kernel reads besides its I/O
    stream = FakeStream()

    def network(stream_):
        b, scratch = dict(bufs), workspace[0]  # read at enqueue time, like TensorRT addresses

        def run():
            assert scratch.ptr not in memory.freed, "kernel uses freed device memory"
            b["x_next"].array()[:] = b["x"].array() * b["c"].array()[0] + b["c"].array()[1] + b["noise"].array()
        fake.kernel(run)

    rows = (RowCopy(Buf(memory, coefficients), bufs["c"]), RowCopy(Buf(memory, noise), bufs["noise"]))
    config = LoopConfig(StepChain((network,), carries=((bufs["x_next"], bufs["x"]),), cuda=fake), rows,
                        watch=(arena,), enabled=enabled)
    loop = CapturedLoop(config, stream, cuda=fake)
    for step in range(STEPS):
        if step == move_at:  # the arena moves: a replay of the old graph would read freed memory
            memory.freed.append(workspace[0].ptr)
            workspace[0] = Buf(memory, np.zeros(1))
            arena.generation += 1
        loop.step(step)
    expected = x0.copy()
    for step in range(STEPS):
        expected = expected * coefficients[step, 0] + coefficients[step, 1] + noise[step]
    return loop, fake, stream, bufs["x"].array().copy(), expected


def test_graph_replay_equals_eager_and_numpy():
    graph_loop, fake, stream, graph_x, expected = _toy_loop(enabled=True)
    eager_loop, _, _, eager_x, _ = _toy_loop(enabled=False)
    np.testing.assert_allclose(graph_x, expected, rtol=1e-6)
    np.testing.assert_array_equal(graph_x, eager_x)  # same float32 operations in the same order
    assert (graph_loop.eager_runs, graph_loop.captures, graph_loop.launches) == (1, 1, STEPS - 1)
    assert (eager_loop.eager_runs, eager_loop.captures, eager_loop.launches) == (STEPS, 0, 0)
    assert stream.syncs == 0  # no host sync inside the loop
    assert len(fake.execs) == 1 and not fake.graphs  # the source graph is freed after instantiation
    graph_loop.close()
    assert not fake.execs
    with pytest.raises(RuntimeError, match="closed"):
        graph_loop.step(0)


def test_a_moved_arena_invalidates_and_recaptures():
    loop, fake, _, x, expected = _toy_loop(enabled=True, move_at=3)
    np.testing.assert_allclose(x, expected, rtol=1e-6)
    # steps 0 eager, 1 capture+launch, 2 launch, 3 eager after the move, 4 re-capture+launch, 5 launch
    assert (loop.eager_runs, loop.captures, loop.launches) == (2, 2, 4)
    assert len(fake.execs) == 1  # the stale graph was destroyed


def test_failed_capture_ends_the_capture_and_raises():
    fake, calls = FakeCuda(FakeMemory()), []

    def enqueue(stream):
        calls.append(fake.capturing)
        if fake.capturing:
            raise BackendError("enqueue failed during capture")

    loop = CapturedLoop(LoopConfig(enqueue), FakeStream(), cuda=fake)
    loop.step(0)
    with pytest.raises(BackendError, match="during capture"):
        loop.step(1)
    assert calls == [False, True] and not fake.capturing and not fake.graphs and not fake.execs


def test_row_copy_validation():
    memory = FakeMemory()
    target = Buf(memory, np.zeros(2))
    with pytest.raises(ValueError, match="whole number of 8-byte rows"):
        RowCopy(Buf(memory, np.zeros(3)), target)
    row = RowCopy(Buf(memory, np.zeros((2, 2))), target)
    with pytest.raises(IndexError, match=r"0 <= step < 2"):
        row.enqueue(2, FakeStream(), FakeCuda(memory))
    with pytest.raises(ValueError, match="equal sizes"):
        StepChain((), carries=((target, Buf(memory, np.zeros(3))),))


# -- real CUDA / TensorRT (skipped where unavailable) ------------------------------------------------


@pytest.mark.gpu
def test_cuda_graph_replay_equals_eager_with_copies():
    """Real capture/instantiate/launch over D2D copies only (no kernels needed)."""
    table = np.arange(STEPS * 4, dtype=np.float32).reshape(STEPS, 4)
    results = {}
    for enabled in (True, False):
        with cuda.Stream() as stream:
            buffers = [cuda.DeviceBuffer.from_numpy(np.zeros(4, np.float32)) for _ in range(3)]
            rows_table = cuda.DeviceBuffer.from_numpy(table)
            target, middle, out = buffers
            chain = StepChain((lambda s: cuda.memcpy_d2d(middle.ptr, target.ptr, middle.nbytes, s),),
                              carries=((middle, out),))
            with CapturedLoop(LoopConfig(chain, (RowCopy(rows_table, target),), enabled=enabled), stream) as loop:
                loop.run(STEPS)
                stream.synchronize()
                results[enabled] = out.copy_to_host(np.empty(4, np.float32))
                assert loop.captures == (1 if enabled else 0)
            for b in (*buffers, rows_table):
                b.close()
    np.testing.assert_array_equal(results[True], table[-1])
    np.testing.assert_array_equal(results[False], table[-1])
