"""One ``Components`` under concurrency (issue 8, kind 7): exactly one session per network, and
concurrent pipeline calls bit-identical to serial ones.

Before the fix, 8 threads created 29-46 ONNX Runtime sessions for 8 networks; at full size each
extra session is another copy of the weights. Session creation is slowed down here so that every
thread reaches the lazy load while the first is still building it (the window real loads have).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.runtime import (
    KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline, KandinskyInpaintCombinedPipeline)
from kandinsky_trt.runtime.pipelines.components import Components

THREADS = 8
PICTURE = Image.fromarray(np.random.default_rng(3).integers(0, 256, (64, 64, 3), dtype=np.uint8))
MASK = np.zeros((64, 64), np.float32)
MASK[:32] = 1
SMALL = dict(height=64, width=64, num_inference_steps=2, prior_num_inference_steps=2, output_type="np")


def _job(components: Components, i: int) -> np.ndarray:
    """Thread i's request: text2img, img2img or inpaint, seeded by i."""
    kind = i % 3
    if kind == 0:
        return KandinskyCombinedPipeline(components=components)(f"a cat {i}", generator=i, **SMALL).images
    if kind == 1:
        return KandinskyImg2ImgCombinedPipeline(components=components)(
            f"a dog {i}", PICTURE, strength=0.7, generator=i, **SMALL).images
    return KandinskyInpaintCombinedPipeline(components=components)(f"a hat {i}", PICTURE, MASK, generator=i,
                                                                   **SMALL).images


@pytest.fixture
def counted_sessions(monkeypatch):
    """Counts ONNX Runtime session creations per ONNX file, each slowed by 50 ms."""
    import onnxruntime

    created: Counter = Counter()
    lock = threading.Lock()
    real = onnxruntime.InferenceSession

    def slow_session(path, *args, **kwargs):
        with lock:
            created[Path(path).stem] += 1
        time.sleep(0.05)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", slow_session)
    return created


def test_one_session_per_network_and_identical_results(artifacts_fp32, counted_sessions):
    with Components(artifacts_fp32[0]) as components:
        serial = [_job(components, i) for i in range(THREADS)]
    serial_sessions = dict(counted_sessions)
    counted_sessions.clear()
    with Components(artifacts_fp32[0]) as components:
        barrier = threading.Barrier(THREADS)

        def run(i):
            barrier.wait()  # every thread asks for the first network at once
            return _job(components, i)

        with ThreadPoolExecutor(THREADS) as pool:
            concurrent = list(pool.map(run, range(THREADS)))
    assert len(counted_sessions) == 10  # every network but image_encoder
    assert dict(counted_sessions) == serial_sessions == dict.fromkeys(counted_sessions, 1)
    for i, (a, b) in enumerate(zip(serial, concurrent)):
        np.testing.assert_array_equal(a, b, err_msg=f"thread {i}")


def test_once_cache_builds_each_key_once_and_retries_a_failed_build():
    from kandinsky_trt.runtime.pipelines.once import OnceCache

    cache, calls, lock = OnceCache(), Counter(), threading.Lock()
    barrier = threading.Barrier(16)

    def build(key):
        with lock:
            calls[key] += 1
        time.sleep(0.02)
        return object()

    def get(i):
        barrier.wait()
        return cache.get(i % 2, lambda: build(i % 2))

    with ThreadPoolExecutor(16) as pool:
        values = list(pool.map(get, range(16)))
    assert calls == Counter({0: 1, 1: 1})
    assert len({id(v) for v in values[0::2]}) == 1 and len({id(v) for v in values[1::2]}) == 1

    def fail():
        raise OSError("disk")

    with pytest.raises(OSError):
        cache.get("x", fail)
    assert cache.get("x", lambda: 5) == 5  # nothing cached by the failure
