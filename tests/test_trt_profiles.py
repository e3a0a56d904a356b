"""The TensorRT backend on a plan with several optimization profiles, against stand-ins.

A toy network of batch dim ``B`` in a set of two profiles (batch 1 and batch 2): one plan with
two optimization profiles (``engine.profiles = [0, 1]``). The stand-in engine (a subclass of
``fakes.tensorrt.FakeEngine``, kept here so the shared fakes stay as they are) has a dynamic
batch, and each context runs at the shapes of the optimization profile it selected. This checks
our logic (one engine per network, a context per profile, profile selection before the input
shapes), not TensorRT: unverified on a GPU.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from fakes.cuda import H100, FakeMemory  # tests/ is on sys.path under pytest
from fakes.tensorrt import TRT_VERSION, FakeContext, FakeEngine, install
from manifest_helpers import complete_manifest

from kandinsky_trt.runtime.backends.base import BackendError
from kandinsky_trt.runtime.backends.trt import TrtBackend
from kandinsky_trt.runtime.backends.trt_engine import optimization_profiles
from kandinsky_trt.runtime.contract.manifest import Manifest

PLAN = b"plan:toy"


class ProfiledContext(FakeContext):
    """A context on one optimization profile k of the toy engine: batch k + 1."""

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.profile, self.shapes = 0, {}

    def set_optimization_profile_async(self, index, stream_handle):
        self.profile = index
        return index < 2

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return shape[0] == self.profile + 1  # outside the profile's min = opt = max: refused

    def get_tensor_shape(self, name):
        return self.shapes.get(name, self.shapes.get("x", (-1, 3)))  # the output follows the input's batch

    def _run(self, addresses: dict) -> None:
        engine, static = self.engine, self.engine.tensors
        engine.tensors = {n: replace(t, shape=self.get_tensor_shape(n)) for n, t in static.items()}
        try:
            super()._run(addresses)
        finally:
            engine.tensors = static


class ProfiledEngine(FakeEngine):
    def create_execution_context(self, strategy):
        self.contexts.append(ProfiledContext(self))
        return self.contexts[-1]


def _io(batch) -> tuple[list, list]:
    return ([{"name": n, "dtype": "float32", "shape": [batch, 3]} for n in ("x", "y")],
            [{"name": "z", "dtype": "float32", "shape": [batch, 3]}])


def _write(directory) -> Manifest:
    import hashlib

    (directory / "toy.plan").write_bytes(PLAN)
    inputs, outputs = _io("B")
    network = {
        "name": "toy", "onnx": "toy.onnx", "onnx_sha256": "c" * 64, "external_data": [], "precision": "fp32",
        "fp32_islands": [], "inputs": inputs, "outputs": outputs,
        "profiles": [{"profile": i, "inputs": _io(b)[0], "outputs": _io(b)[1]} for i, b in enumerate((1, 2))],
        "engine": {"file": "toy.plan", "sha256": hashlib.sha256(PLAN).hexdigest(), "tensorrt_version": TRT_VERSION,
                   "gpu_name": H100.name, "compute_capability": "9.0", "onnx_sha256": "c" * 64,
                   "device_memory_bytes": 1000, "profiles": [0, 1]},
    }
    profiles = [{"batch": b, "height": 64, "width": 64, "cfg": False} for b in (1, 2)]
    manifest = Manifest.from_dict(complete_manifest({
        "producer": {}, "precision": "fp32", "profiles": profiles,
        "model_dims": {"clip_dim": 8, "text_dim": 8, "image_size": 8, "text_len": 4, "latent_scale": 8}, "checkpoints": {},
        "networks": [network], "constants": [], "schedulers": {}, "tokenizers": {},
        "image_processor": {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3},
    }, directory), directory)
    manifest.save()
    return manifest


@pytest.fixture()
def engines(monkeypatch):
    """The stand-in module; returns the engines it deserialized."""
    memory, made = FakeMemory(), []

    def make(name):
        from kandinsky_trt.runtime.backends.trt_engine import TensorInfo

        tensors = [TensorInfo("x", "input", "float32", (-1, 3)), TensorInfo("y", "input", "float32", (-1, 3)),
                   TensorInfo("z", "output", "float32", (-1, 3))]
        made.append(ProfiledEngine(tensors, lambda x, y: {"z": x * y + x}, 1000, memory))
        return made[-1]

    install(monkeypatch, make, memory)
    return made


def test_one_engine_serves_every_profile_through_a_context_each(engines, tmp_path):
    _write(tmp_path)
    rng = np.random.default_rng(0)
    with TrtBackend(tmp_path) as backend:
        for profile, batch in ((0, 1), (1, 2)):
            feeds = {n: rng.standard_normal((batch, 3)).astype(np.float32) for n in ("x", "y")}
            out = backend.load("toy", profile).run(feeds)
            np.testing.assert_array_equal(out["z"], feeds["x"] * feeds["y"] + feeds["x"])
        assert len(engines) == 1  # deserialized once for both profiles
        assert [c.profile for c in engines[0].contexts] == [0, 1]
        assert engines[0].contexts[1].shapes == {"x": (2, 3), "y": (2, 3)}
        assert backend.load("toy", 1) is backend.load("toy", 1)


def test_a_plan_without_the_profile_is_refused(engines, tmp_path):
    manifest = _write(tmp_path)
    data = manifest.to_dict()
    data["networks"][0]["engine"]["profiles"] = [0, 2]  # the plan has no optimization profile 2
    Manifest.from_dict(data, tmp_path).save()
    with TrtBackend(tmp_path) as backend, pytest.raises(BackendError, match=r"toy: set_optimization_profile_async"
                                                                             r"\(2\) expected True, found False"):
        backend.load("toy", 1)


def test_optimization_profiles_are_the_distinct_shapes(tmp_path):
    entry = _write(tmp_path).network("toy")
    shapes, indices = optimization_profiles(entry)
    assert indices == (0, 1) and [s.tensor("x").shape for s in shapes] == [(1, 3), (2, 3)]
    same = replace(entry, profiles=(entry.profiles[0], entry.profiles[1], entry.profiles[0]))
    assert optimization_profiles(same)[1] == (0, 1, 0)  # a repeated shape reuses its optimization profile
