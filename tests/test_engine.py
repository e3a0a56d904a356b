"""The engine builder: argument validation, plan naming, hash-keyed reuse, manifest updates, errors.

CPU tests run the orchestration with a stand-in plan builder, and ``TensorRTPlanBuilder`` itself —
Polygraphy's real loaders — against the stand-in ``tensorrt`` module (tests/fakes/tensorrt.py) that
mirrors the documented 10.x/11.x Python API (so every line of our build path and of the Polygraphy
loaders it uses runs here, but only against our reading of TensorRT's API). The ``tensorrt``
test at the end builds and runs a real tiny engine; its markers skip it where TensorRT or a GPU is
missing (it was not executed where this file was written).
"""

from __future__ import annotations

import json
import re
import logging
import sys

import numpy as np
import pytest

from fakes.cuda import H100 as H100_DEVICE
from fakes.tensorrt import MODULE as FAKE_TENSORRT
from fakes.tensorrt import TRT_VERSION, ParserError
from fakes.tensorrt import install as install_fake_tensorrt
from kandinsky_trt.engine.builder import BuildConfig, build_engines, plan_file_name, validate_build_config
from kandinsky_trt.engine.errors import (
    BuildConfigError,
    EngineBuildError,
    OnnxParseError,
    TensorRTUnavailableError,
)
from kandinsky_trt.engine.plan import BuiltPlan, Platform
from kandinsky_trt.runtime.cuda import runtime_api as cuda
from manifest_helpers import complete_manifest
from kandinsky_trt.runtime.contract.manifest import SCHEMA_PATH, Manifest, load_manifest, sha256_file

H100 = Platform(TRT_VERSION, H100_DEVICE.name, H100_DEVICE.compute_capability)


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
        "model_dims": {"clip_dim": 8, "text_dim": 8, "image_size": 8, "text_len": 4, "latent_scale": 8}, "checkpoints": {},
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
    engine = dict(saved.networks["toy"].engine)
    assert re.fullmatch("[0-9a-f]{16}", engine.pop("profile_shapes"))  # a reuse key: the shapes built for
    assert engine == {
        "file": paths[0].name, "sha256": sha256_file(paths[0]), "tensorrt_version": TRT_VERSION,
        "gpu_name": H100.gpu_name, "compute_capability": "9.0", "onnx_sha256": manifest.networks["toy"].onnx_sha256,
        "device_memory_bytes": 4096, "export_key": "key-toy", "builder_optimization_level": 4, "profiles": [0],
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


# -- TensorRTPlanBuilder: Polygraphy's loaders against the stand-in tensorrt (tests/fakes/tensorrt.py) --


@pytest.fixture()
def fake_trt(monkeypatch):
    """Installs the session's stand-in ``tensorrt`` (fresh state) on a simulated H100; returns the state."""
    pytest.importorskip("polygraphy")
    from polygraphy.backend.trt import loader

    if loader.trt.module not in (None, FAKE_TENSORRT):  # Polygraphy keeps the first tensorrt it imported
        pytest.skip("Polygraphy already imported the real tensorrt in this process")
    return install_fake_tensorrt(monkeypatch)


def test_tensorrt_builder_path(tmp_path, fake_trt, caplog):
    _write_artifacts(tmp_path)
    cache = tmp_path / "timing.cache"
    with caplog.at_level(logging.INFO):
        paths = build_engines(BuildConfig(tmp_path, networks=("toy",), timing_cache=cache, opt_level=1,
                                          workspace_gb=0.5))
    calls = fake_trt.calls
    assert calls["network_flags"] == 1 << 0  # strongly typed, nothing else
    assert calls["parsed"] == str(tmp_path / "toy.onnx")  # parse_from_file: external data beside it is found
    assert calls["config"].builder_optimization_level == 1
    assert calls["pool"] == [(sys.modules["tensorrt"].MemoryPoolType.WORKSPACE, 2**29)]
    assert calls["profiles"] == [{"x": ((2, 3),) * 3, "y": ((2, 3),) * 3}]  # static: min = opt = max
    assert calls["flags_set"] == []  # no precision flag: the graph's types are the engine's
    assert calls["caches_loaded"] == [b"", b""]  # no cache yet: empty, then Polygraphy's merge read
    assert cache.read_bytes() == b"+timings"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left
    assert load_manifest(tmp_path).networks["toy"].engine["device_memory_bytes"] == 2048
    assert paths[0].is_file()
    assert any(r.name == "Polygraphy" and "Building engine" in r.getMessage() for r in caplog.records)
    build_engines(BuildConfig(tmp_path, networks=("toy",), timing_cache=cache, force=True))
    assert fake_trt.calls["caches_loaded"][-2:] == [b"+timings", b"+timings"]  # loaded before, merged after
    assert cache.read_bytes() == b"+timings+timings"


def test_polygraphy_logger_is_restored(tmp_path, fake_trt):
    from polygraphy.logger import G_LOGGER

    before = (G_LOGGER.use_python_logging_system, G_LOGGER.colors, G_LOGGER.letter)
    _write_artifacts(tmp_path)
    build_engines(BuildConfig(tmp_path, networks=("toy",)))
    assert (G_LOGGER.use_python_logging_system, G_LOGGER.colors, G_LOGGER.letter) == before


def test_parser_errors_are_listed(tmp_path, fake_trt):
    errors = [ParserError(1, "add_1", "Add", "broadcast mismatch"), ParserError(-1, "", "", "bad model")]
    fake_trt.reset(parser_errors=errors)
    _write_artifacts(tmp_path)
    with pytest.raises(OnnxParseError) as caught:
        build_engines(BuildConfig(tmp_path))
    assert caught.value.errors == tuple(str(e) for e in errors)
    assert "toy.onnx, found 2 error(s)" in str(caught.value)


def test_failed_build_says_why(tmp_path, fake_trt):
    fake_trt.reset(build_fails=True)
    _write_artifacts(tmp_path)
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"old")
    with pytest.raises(EngineBuildError) as caught:
        build_engines(BuildConfig(tmp_path, timing_cache=cache))
    message = str(caught.value)
    assert "out of GPU memory" in message and "--workspace" in message
    assert "Requested amount of GPU memory could not be allocated" in message
    assert load_manifest(tmp_path).networks["toy"].engine is None  # nothing recorded
    assert cache.read_bytes() == b"old" and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_graph_io_must_match_the_manifest(tmp_path, fake_trt):
    _write_artifacts(tmp_path, onnx_dtype="float16")
    with pytest.raises(EngineBuildError, match=r"the parsed ONNX graph expected the manifest's I/O") as caught:
        build_engines(BuildConfig(tmp_path))
    assert "toy.x: dtype expected float32, found float16" in str(caught.value)


def test_polygraphy_missing_names_the_install(tmp_path, fake_trt, monkeypatch):
    for name in ("polygraphy", "polygraphy.backend", "polygraphy.backend.trt"):
        monkeypatch.setitem(sys.modules, name, None)  # `import polygraphy...` fails even where installed
    _write_artifacts(tmp_path)
    with pytest.raises(TensorRTUnavailableError, match=r"polygraphy: expected the package .*kandinsky-trt\[gpu\]"):
        build_engines(BuildConfig(tmp_path))


def test_engine_modules_import_without_a_cycle():
    """builder and polygraphy_builder share engine/plan.py; neither imports the other at module level."""
    import ast
    from pathlib import Path

    import kandinsky_trt.engine as engine

    for name in ("builder", "polygraphy_builder"):
        tree = ast.parse((Path(engine.__file__).parent / f"{name}.py").read_text())
        top = {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        assert not top & {"kandinsky_trt.engine.builder", "kandinsky_trt.engine.polygraphy_builder"}, name


# -- real TensorRT (skipped where it is not installed) ----------------------------------------------


@pytest.mark.tensorrt
@pytest.mark.gpu
def test_real_build_and_run(tmp_path):
    """Build the tiny Add/Mul graphs with TensorRT, run them through TrtBackend, compare with numpy."""
    from kandinsky_trt.runtime.backends.trt import TrtBackend
    from kandinsky_trt.runtime.cuda.graphs import CapturedLoop, LoopConfig, RowCopy, StepChain

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
                results[enabled] = bufs["x"].copy_to_host(np.empty((2, 3), np.float32))
            for b in (*bufs.values(), rows):
                b.close()
        expected = feeds["x"]
        for i in range(steps):
            expected = (expected * table[i] + expected) * 2
        np.testing.assert_allclose(results[False], expected, rtol=1e-5)
        np.testing.assert_array_equal(results[True], results[False])
