"""One session per network per process, whatever the number of profiles and loops (issue 19, item 4).

Every pipeline (prior, text2img, img2img, inpaint, the three combined, interpolate) runs on the
2-size x 2-batch fp32 artifacts through ``Components`` on the *device* backend of ONNX Runtime
(``OrtCudaBackend`` on the CPU execution provider: bound buffers, the device storage of every loop,
host-level runs of the stage networks). A counting stand-in for ``onnxruntime.InferenceSession``
proves that each network used gets exactly one session, shared by its host-level runs and by the
loops of all four profiles. The same run's outputs must equal the golden outputs recorded on the
host path (tests/golden/fp32_multi), bit for bit on a CPU of the recorded class: the device path
changes no result.
"""

from __future__ import annotations

from collections import Counter

import onnxruntime as ort
import pytest
from golden_outputs import assert_equals_recorded, run_cases

from kandinsky_trt.runtime.backends.ort_cuda import OrtCudaBackend
from kandinsky_trt.runtime.contract.manifest import load_manifest
from kandinsky_trt.runtime.loops.device import DeviceStorage
from kandinsky_trt.runtime.pipelines import components as components_module
from kandinsky_trt.runtime.pipelines import loaded as loaded_module


@pytest.fixture()
def counted(monkeypatch):
    """Session creations by ONNX file name, and the Components built, on the ORT device backend."""
    created: Counter = Counter()
    built = []
    real = ort.InferenceSession

    class CountingSession(real):
        def __init__(self, path, *args, **kwargs):
            created[str(path).rsplit("/", 1)[-1]] += 1
            super().__init__(path, *args, **kwargs)

    def device_backend(name, manifest, device):
        assert (name, device) == ("ort", "cpu")
        built.append(OrtCudaBackend(manifest, "cpu"))
        return built[-1]

    monkeypatch.setattr(ort, "InferenceSession", CountingSession)
    monkeypatch.setattr(loaded_module, "make_backend", device_backend)
    original_close = components_module.Components.close
    loops, networks = [], set()

    def close(self):  # what was loaded, before closing drops it
        loops.extend(self._loops.values())
        networks.update(self.backend._inference)
        original_close(self)

    monkeypatch.setattr(components_module.Components, "close", close)
    return created, built, loops, networks


def test_every_pipeline_on_the_device_backend_creates_one_session_per_network(artifacts_fp32_multi, counted):
    created, built, loops, networks = counted
    artifacts = artifacts_fp32_multi[0]
    manifest = load_manifest(artifacts)
    outputs = run_cases(artifacts, manifest.sizes())
    (backend,) = built
    used = {manifest.network(name).onnx.rsplit("/", 1)[-1] for name in networks}
    assert len(used) >= 9 and set(created) == used and set(created.values()) == {1}, created
    # Every loop ran on the device storage, at several profiles, over those same sessions.
    assert loops and all(isinstance(loop.storage, DeviceStorage) for loop in loops)
    profiles = {(loop.spec.network, loop.storage.network_io) for loop in loops}
    assert len({network for network, _ in profiles}) == 3 and len(profiles) > 3
    assert_equals_recorded("fp32_multi", outputs, "the device path")
