"""The engine builder: argument validation, plan naming, hash-keyed reuse, manifest updates, errors.

CPU tests run the orchestration with a stand-in plan builder, and ``TensorRTPlanBuilder`` itself
against a stand-in ``tensorrt`` module that mirrors the documented 10.x/11.x Python API (so every
line of the TensorRT path runs here, but only against our reading of that API). The ``tensorrt``
test at the end builds and runs a real tiny engine; it skips where TensorRT or a GPU is missing
(it was not executed where this file was written).
"""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest

from kandinsky_trt.engine import trt_builder
from kandinsky_trt.engine.builder import (
    BuildConfig,
    BuiltPlan,
    Platform,
    build_engines,
    plan_file_name,
    validate_build_config,
)
from kandinsky_trt.engine.errors import (
    BuildConfigError,
    EngineBuildError,
    OnnxParseError,
    TensorRTUnavailableError,
)
from kandinsky_trt.runtime import cuda
from kandinsky_trt.runtime.backends.trt import import_tensorrt
from manifest_helpers import complete_manifest
from kandinsky_trt.runtime.manifest import SCHEMA_PATH, Manifest, load_manifest, sha256_file

TRT_VERSION = "11.4.0.106"
H100 = Platform(TRT_VERSION, "NVIDIA H100 80GB HBM3", "9.0")


def _write_onnx(path, name: str, dtype: str = "float32") -> None:
    """``toy``: z = x * y + x; ``toy_step``: w = 2 * z — tiny Add/Mul graphs with static shapes."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    t = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[dtype]
    if name == "toy":
        nodes = [helper.make_node("Mul", ["x", "y"], ["xy"]), helper.make_node("Add", ["xy", "x"], ["z"])]
        inputs = [helper.make_tensor_value_info(n, t, [2, 3]) for n in ("x", "y")]
        outputs = [helper.make_tensor_value_info("z", t, [2, 3])]
    else:
        nodes = [helper.make_node("Add", ["z", "z"], ["w"])]
        inputs = [helper.make_tensor_value_info("z", t, [2, 3])]
        outputs = [helper.make_tensor_value_info("w", t, [2, 3])]
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))


def _io(names):
    return [{"name": n, "dtype": "float32", "shape": [2, 3]} for n in names]


def _write_artifacts(directory, onnx_dtype: str = "float32") -> Manifest:
    networks = []
    for name, ins, outs in (("toy", ("x", "y"), ("z",)), ("toy_step", ("z",), ("w",))):
        _write_onnx(directory / f"{name}.onnx", name, onnx_dtype)
        networks.append({
            "name": name, "onnx": f"{name}.onnx", "onnx_sha256": sha256_file(directory / f"{name}.onnx"),
            "external_data": [], "precision": "fp32", "fp32_islands": [], "export_key": f"key-{name}",
            "inputs": _io(ins), "outputs": _io(outs), "engine": None,
        })
    manifest = Manifest.from_dict(complete_manifest({
        "producer": {}, "precision": "fp32",
        "profile": {"batch": 1, "height": 64, "width": 64, "cfg": True},
        "model_dims": {"clip_dim": 8, "text_dim": 8, "image_size": 8, "text_len": 4}, "checkpoints": {},
        "networks": networks, "constants": [], "schedulers": {}, "tokenizers": {},
        "image_processor": {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3},
    }, directory), directory)
    manifest.save()
    return manifest


class FakePlanBuilder:
    """Stands in for TensorRTPlanBuilder: deterministic plan bytes, a record of what was built."""

    def __init__(self, platform: Platform = H100) -> None:
        self._platform, self.built = platform, []

    def platform(self) -> Platform:
        return self._platform

    def build(self, request):
        self.built.append(request.entry.name)
        return BuiltPlan(f"plan:{request.entry.name}:{self._platform.tensorrt_version}".encode(), 4096)


# -- argument validation (no TensorRT involved) -------------------------------------------------------


@pytest.mark.parametrize("level", [-1, 6, 2.5, True, "3"])
def test_opt_level_out_of_range(tmp_path, level):
    with pytest.raises(BuildConfigError, match=rf"opt_level: expected an integer 0\.\.5 .*found {level!r}"):
        validate_build_config(BuildConfig(tmp_path, opt_level=level))


@pytest.mark.parametrize("gb", [0, -1.0, float("nan"), float("inf"), "4", True])
def test_workspace_must_be_positive(tmp_path, gb):
    with pytest.raises(BuildConfigError, match=r"workspace_gb: expected a number of GiB > 0 \(or None\), found"):
        validate_build_config(BuildConfig(tmp_path, workspace_gb=gb))


def test_unknown_network_names_the_available_ones(tmp_path):
    _write_artifacts(tmp_path)
    with pytest.raises(BuildConfigError) as caught:
        validate_build_config(BuildConfig(tmp_path, networks=("toy", "unet")))
    assert str(caught.value) == "networks: expected names from ['toy', 'toy_step'], found unknown ['unet']"


def test_empty_network_list(tmp_path):
    with pytest.raises(BuildConfigError, match=r"networks: expected at least one network name"):
        validate_build_config(BuildConfig(tmp_path, networks=()))


def test_missing_artifacts(tmp_path):
    with pytest.raises(BuildConfigError, match=r"artifacts: expected a directory .*nope \(no such directory\)"):
        validate_build_config(BuildConfig(tmp_path / "nope"))
    with pytest.raises(BuildConfigError, match=r"run `kandinsky-trt export` first"):
        validate_build_config(BuildConfig(tmp_path))
    _write_artifacts(tmp_path)
    (tmp_path / "toy_step.onnx").unlink()
    with pytest.raises(BuildConfigError, match=r"artifacts: expected .*toy_step.onnx \(listed for network 'toy_step'"):
        validate_build_config(BuildConfig(tmp_path))
    validate_build_config(BuildConfig(tmp_path, networks=("toy",)))  # only the selected files must exist


def test_timing_cache_path_checked(tmp_path):
    _write_artifacts(tmp_path)
    with pytest.raises(BuildConfigError, match="timing_cache: expected a path in an existing directory"):
        validate_build_config(BuildConfig(tmp_path, timing_cache=tmp_path / "no" / "cache.bin"))
    with pytest.raises(BuildConfigError, match="timing_cache: expected a file path, found a directory"):
        validate_build_config(BuildConfig(tmp_path, timing_cache=tmp_path))


def test_arguments_are_checked_before_tensorrt_is_imported(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(BuildConfigError, match="opt_level"):
        build_engines(BuildConfig(tmp_path, opt_level=9))


def test_tensorrt_unavailable_names_the_install(tmp_path, monkeypatch):
    _write_artifacts(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # `import tensorrt` fails even where it is installed
    with pytest.raises(TensorRTUnavailableError) as caught:
        build_engines(BuildConfig(tmp_path))
    message = str(caught.value)
    assert "pip install" in message and "[gpu]" in message and "GPU" in message
    assert isinstance(caught.value, ImportError)


# -- naming, manifest records, hash-keyed reuse ------------------------------------------------------


def test_plan_file_name():
    sha = "1a2b3c4d" + "0" * 56
    assert plan_file_name("unet", "11.4.0.106", "9.0", sha) == "unet.trt11.4.0.sm90.1a2b3c4d.plan"
    assert plan_file_name("unet_step", "10.8.0.43", "12.0", sha) == "unet_step.trt10.8.0.sm120.1a2b3c4d.plan"
    with pytest.raises(ValueError, match="compute_capability: expected 'major.minor'"):
        plan_file_name("unet", "11.4.0", "sm90", sha)


def test_build_records_engines_in_the_manifest(tmp_path):
    jsonschema = pytest.importorskip("jsonschema")
    manifest = _write_artifacts(tmp_path)
    builder = FakePlanBuilder()
    paths = build_engines(BuildConfig(tmp_path, opt_level=4), builder)
    assert builder.built == ["toy", "toy_step"]
    sha8 = manifest.networks["toy"].onnx_sha256[:8]
    assert paths[0] == tmp_path / f"toy.trt11.4.0.sm90.{sha8}.plan"
    assert paths[0].read_bytes() == b"plan:toy:11.4.0.106"
    saved = load_manifest(tmp_path)
    engine = saved.networks["toy"].engine
    assert engine == {
        "file": paths[0].name, "sha256": sha256_file(paths[0]), "tensorrt_version": TRT_VERSION,
        "gpu_name": H100.gpu_name, "compute_capability": "9.0", "onnx_sha256": manifest.networks["toy"].onnx_sha256,
        "device_memory_bytes": 4096, "export_key": "key-toy", "builder_optimization_level": 4,
    }
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.Draft202012Validator(schema).validate(json.loads((tmp_path / "manifest.json").read_text()))


def test_reuse_is_keyed_by_hashes_not_by_file_existence(tmp_path):
    _write_artifacts(tmp_path)
    builder = FakePlanBuilder()
    config = BuildConfig(tmp_path)
    first = build_engines(config, builder)
    assert build_engines(config, builder) == first and builder.built == ["toy", "toy_step"]  # reused

    first[0].write_bytes(b"tampered")  # same name, different content: rebuilt
    build_engines(config, builder)
    assert builder.built[2:] == ["toy"] and first[0].read_bytes() == b"plan:toy:11.4.0.106"

    build_engines(BuildConfig(tmp_path, opt_level=5, networks=("toy_step",)), builder)  # another opt level
    build_engines(BuildConfig(tmp_path, force=True, networks=("toy",)), builder)
    assert builder.built[3:] == ["toy_step", "toy"]

    newer = FakePlanBuilder(Platform("11.5.0.1", H100.gpu_name, "9.0"))  # another TensorRT: new name
    paths = build_engines(BuildConfig(tmp_path, networks=("toy",)), newer)
    assert paths[0].name.startswith("toy.trt11.5.0.sm90.") and not first[0].exists()  # old plan removed


def test_manifest_sha_mismatch_rebuilds(tmp_path):
    _write_artifacts(tmp_path)
    builder = FakePlanBuilder()
    build_engines(BuildConfig(tmp_path), builder)
    data = load_manifest(tmp_path).to_dict()
    data["networks"][0]["engine"]["sha256"] = "0" * 64
    Manifest.from_dict(data, tmp_path).save()
    build_engines(BuildConfig(tmp_path), builder)
    assert builder.built == ["toy", "toy_step", "toy"]


def test_onnx_changed_after_export(tmp_path):
    _write_artifacts(tmp_path)
    _write_onnx(tmp_path / "toy.onnx", "toy_step")
    with pytest.raises(EngineBuildError, match=r"toy.onnx_sha256: expected [0-9a-f]{64} \(recorded at export\)"):
        build_engines(BuildConfig(tmp_path), FakePlanBuilder())


# -- TensorRTPlanBuilder against a stand-in tensorrt module ------------------------------------------


class FakeParserError:
    def __init__(self, node, name, op, desc):
        self._v = node, name, op, desc

    def node(self):
        return self._v[0]

    def node_name(self):
        return self._v[1]

    def node_operator(self):
        return self._v[2]

    def desc(self):
        return self._v[3]

    def code(self):
        return "UNSUPPORTED_NODE"


def _fake_tensorrt(parser_errors=(), build_fails=False):
    """The subset of the tensorrt module the builder uses, with what it was called with in ``calls``."""
    calls: dict = {"pool": [], "profiles": [], "caches_loaded": []}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = TRT_VERSION
    trt.ILogger = type("ILogger", (), {})
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=0)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE="WORKSPACE")
    trt.ExecutionContextAllocationStrategy = types.SimpleNamespace(USER_MANAGED="USER_MANAGED")
    trt.nptype = lambda dtype: {1: np.float32, 10: np.float16}[dtype]
    severity = types.SimpleNamespace(name="ERROR")

    def value_info(v):
        return types.SimpleNamespace(name=v.name, dtype=v.type.tensor_type.elem_type,
                                     shape=tuple(d.dim_value for d in v.type.tensor_type.shape.dim))

    class Network:
        inputs: list = []
        outputs: list = []
        num_inputs = property(lambda self: len(self.inputs))
        num_outputs = property(lambda self: len(self.outputs))

        def get_input(self, i):
            return self.inputs[i]

        def get_output(self, i):
            return self.outputs[i]

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.errors = network, list(parser_errors)

        def parse_from_file(self, path):
            calls["parsed"] = path
            graph = pytest.importorskip("onnx").load(path).graph
            self.network.inputs = [value_info(v) for v in graph.input]
            self.network.outputs = [value_info(v) for v in graph.output]
            return not self.errors

        num_errors = property(lambda self: len(self.errors))

        def get_error(self, i):
            return self.errors[i]

    class Cache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return self.data + b"+timings"

        def combine(self, other, ignore_mismatch):
            return True

    class Config:
        builder_optimization_level = 3

        def set_memory_pool_limit(self, pool, size):
            calls["pool"].append((pool, size))

        def create_timing_cache(self, data):
            calls["caches_loaded"].append(bytes(data))
            return Cache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            self.cache = cache
            return True

        def get_timing_cache(self):
            return self.cache

        def add_optimization_profile(self, profile):
            calls["profiles"].append(profile)

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            calls["flags"] = flags
            return Network()

        def create_builder_config(self):
            calls["config"] = Config()
            return calls["config"]

        def create_optimization_profile(self):
            return object()

        def build_serialized_network(self, network, config):
            if build_fails:
                self.logger.log(severity, "Requested amount of GPU memory could not be allocated")
                return None
            io = [[t.name, t.dtype, list(t.shape)] for t in network.inputs + network.outputs]
            return json.dumps({"inputs": len(network.inputs), "io": io}).encode()

    class Engine:
        def __init__(self, plan):
            self.plan, self.device_memory_size_v2 = json.loads(bytes(plan)), 2048

        num_io_tensors = property(lambda self: len(self.plan["io"]))

        def get_tensor_name(self, i):
            return self.plan["io"][i][0]

        def _row(self, name):
            return next((i, row) for i, row in enumerate(self.plan["io"]) if row[0] == name)

        def get_tensor_mode(self, name):
            return types.SimpleNamespace(name="INPUT" if self._row(name)[0] < self.plan["inputs"] else "OUTPUT")

        def get_tensor_dtype(self, name):
            return self._row(name)[1][1]

        def get_tensor_shape(self, name):
            return tuple(self._row(name)[1][2])

        def create_execution_context(self, strategy):
            return types.SimpleNamespace(get_tensor_shape=self.get_tensor_shape)

    trt.Builder, trt.OnnxParser = Builder, OnnxParser
    trt.Runtime = lambda logger: types.SimpleNamespace(deserialize_cuda_engine=Engine)
    return trt, calls


@pytest.fixture()
def on_h100(monkeypatch):
    monkeypatch.setattr(cuda, "device_info", lambda device=None: cuda.DeviceInfo(0, H100.gpu_name, "9.0"))


def test_tensorrt_builder_path(tmp_path, monkeypatch, on_h100):
    trt, calls = _fake_tensorrt()
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    _write_artifacts(tmp_path)
    cache = tmp_path / "timing.cache"
    paths = build_engines(BuildConfig(tmp_path, networks=("toy",), timing_cache=cache, opt_level=1, workspace_gb=0.5))
    assert calls["flags"] == 1 << 0  # strongly typed
    assert calls["parsed"] == str(tmp_path / "toy.onnx")  # parse_from_file: external data beside it is found
    assert calls["config"].builder_optimization_level == 1
    assert calls["pool"] == [("WORKSPACE", 2**29)]
    assert calls["profiles"] == []  # static ONNX shapes need no profile
    assert cache.read_bytes() == b"+timings"
    assert load_manifest(tmp_path).networks["toy"].engine["device_memory_bytes"] == 2048
    assert paths[0].is_file()
    build_engines(BuildConfig(tmp_path, networks=("toy",), timing_cache=cache, force=True))
    assert calls["caches_loaded"][-2:] == [b"+timings", b"+timings"]  # loaded before, merged after


def test_parser_errors_are_listed(tmp_path, monkeypatch, on_h100):
    errors = [FakeParserError(1, "add_1", "Add", "broadcast mismatch"), FakeParserError(-1, "", "", "bad model")]
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(parser_errors=errors)[0])
    _write_artifacts(tmp_path)
    with pytest.raises(OnnxParseError) as caught:
        build_engines(BuildConfig(tmp_path))
    assert caught.value.errors == ("node 1 'add_1' (Add): broadcast mismatch [UNSUPPORTED_NODE]",
                                   "graph: bad model [UNSUPPORTED_NODE]")
    assert "toy.onnx, found 2 error(s)" in str(caught.value)


def test_failed_build_says_why(tmp_path, monkeypatch, on_h100):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt(build_fails=True)[0])
    _write_artifacts(tmp_path)
    with pytest.raises(EngineBuildError) as caught:
        build_engines(BuildConfig(tmp_path))
    message = str(caught.value)
    assert "out of GPU memory" in message and "--workspace" in message
    assert "Requested amount of GPU memory could not be allocated" in message
    assert load_manifest(tmp_path).networks["toy"].engine is None  # nothing recorded


def test_graph_io_must_match_the_manifest(tmp_path, monkeypatch, on_h100):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_tensorrt()[0])
    _write_artifacts(tmp_path, onnx_dtype="float16")
    with pytest.raises(EngineBuildError, match=r"the parsed ONNX graph expected the manifest's I/O") as caught:
        build_engines(BuildConfig(tmp_path))
    assert "toy.x: dtype expected float32, found float16" in str(caught.value)


def test_describe_parser_error():
    assert trt_builder.describe_parser_error(FakeParserError(3, "mul", "Mul", "oops")) == \
        "node 3 'mul' (Mul): oops [UNSUPPORTED_NODE]"


# -- real TensorRT (skipped where it is not installed) ----------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_build_and_run(tmp_path):
    """Build the tiny Add/Mul graphs with TensorRT, run them through TrtBackend, compare with numpy."""
    pytest.importorskip("tensorrt")  # the conftest-free skip; the next line also covers missing libraries
    try:
        import_tensorrt()
    except TensorRTUnavailableError as err:
        pytest.skip(str(err))
    if not cuda.cuda_available():
        pytest.skip("needs cuda-python and a CUDA GPU")
    from kandinsky_trt.runtime.backends.trt import TrtBackend
    from kandinsky_trt.runtime.cuda_graphs import CapturedLoop, LoopConfig, RowCopy, StepChain

    _write_artifacts(tmp_path)
    paths = build_engines(BuildConfig(tmp_path, timing_cache=tmp_path / "timing.cache", opt_level=0))
    assert all(p.is_file() for p in paths)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((2, 3)).astype(np.float32) for n in ("x", "y")}
    with TrtBackend(tmp_path) as backend:
        toy, step = backend.load("toy"), backend.load("toy_step")
        z = toy.run(feeds)["z"]
        np.testing.assert_allclose(z, feeds["x"] * feeds["y"] + feeds["x"], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(step.run({"z": z})["w"], 2 * z, rtol=1e-6, atol=1e-6)
        # A loop: x <- (x * y_i + x) * 2 with y_i a per-step row; graph replay must equal eager.
        steps, results = 5, {}
        table = rng.uniform(0.5, 1.0, (steps, 2, 3)).astype(np.float32)
        for enabled in (True, False):
            bufs = {n: cuda.DeviceBuffer(24) for n in ("x", "y", "z", "w")}
            bufs["x"].copy_from_host(feeds["x"])
            rows = cuda.DeviceBuffer.from_numpy(table)
            toy.bind({n: bufs[n] for n in ("x", "y", "z")})
            step.bind({"z": bufs["z"], "w": bufs["w"]})
            chain = StepChain((toy.enqueue, step.enqueue), carries=((bufs["w"], bufs["x"]),))
            config = LoopConfig(chain, (RowCopy(rows, bufs["y"]),), watch=(backend,), enabled=enabled)
            with CapturedLoop(config, backend.stream) as loop:
                loop.run(steps)
                backend.stream.synchronize()
                results[enabled] = bufs["x"].to_numpy((2, 3), np.float32)
            for b in (*bufs.values(), rows):
                b.close()
        expected = feeds["x"]
        for i in range(steps):
            expected = (expected * table[i] + expected) * 2
        np.testing.assert_allclose(results[False], expected, rtol=1e-5)
        np.testing.assert_array_equal(results[True], results[False])
