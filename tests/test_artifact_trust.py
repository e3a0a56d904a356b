"""Issue 8, kind 2: artifacts are not trusted — file names, sizes, hashes and manifest values are checked.

Each case would have passed silently (or with a traceback) before manifest schema 2.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jsonschema
import numpy as np
import onnxruntime as ort
import pytest

from kandinsky_trt.runtime.contract import integrity
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.base import BackendError, sample_inputs
from kandinsky_trt.runtime.contract.spec import resolve
from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.contract.manifest_schema import SchemaViolation, manifest_schema, validate


@pytest.fixture()
def art(tmp_path, artifacts_fp32):
    out = tmp_path / "art"
    shutil.copytree(artifacts_fp32[0], out)
    integrity.VERIFIED.clear()  # as in a fresh process
    return out


def _data(out) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _write(out, data: dict) -> None:
    (out / "manifest.json").write_text(json.dumps(data))


def _load_error(out) -> str:
    with pytest.raises(mf.ManifestError) as caught:
        mf.load_manifest(out)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def _index(data: dict, kind: str, name: str) -> int:
    return next(i for i, e in enumerate(data[kind]) if e["name"] == name)


# -- file names that leave the directory ------------------------------------------------------------------

def _set_onnx(d, value):
    d["networks"][_index(d, "networks", "unet")]["onnx"] = value


def _set_external(d, value):
    d["networks"][_index(d, "networks", "unet")]["external_data"] = [value]


def _set_constant(d, value):
    d["constants"][0]["file"] = value


def _set_tokenizer(d, value):
    d["tokenizers"]["decoder"]["file"] = value


def _set_engine(d, value):
    d["networks"][0]["engine"] = {"file": value, "sha256": "0" * 64, "tensorrt_version": "10.8",
                                  "gpu_name": "x", "compute_capability": "9.0", "onnx_sha256": "0" * 64,
                                  "device_memory_bytes": 0, "profiles": [0]}


FIELDS = {"onnx": (_set_onnx, r"networks\[\d+\]\.onnx"),
          "external_data": (_set_external, r"networks\[\d+\]\.external_data\[0\]"),
          "constant": (_set_constant, r"constants\[0\]\.file"),
          "tokenizer": (_set_tokenizer, r"tokenizers\.decoder\.file"),
          "engine": (_set_engine, r"networks\[0\]\.engine\.file")}
BAD_NAMES = ["../../x.onnx", "/etc/passwd", "sub/../../x", "./a/../../b", "a\\..\\b", ".", ""]


@pytest.mark.parametrize("field", sorted(FIELDS))
@pytest.mark.parametrize("name", BAD_NAMES)
def test_file_names_outside_the_directory_are_refused_naming_the_field(art, field, name):
    setter, where = FIELDS[field]
    data = _data(art)
    setter(data, name)
    _write(art, data)
    message = _load_error(art)
    assert re.search(where, message), message


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_symlink_out_of_the_directory_is_refused(art, tmp_path, field):
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"x")
    (art / "link.bin").symlink_to(outside)
    setter, where = FIELDS[field]
    data = _data(art)
    setter(data, "link.bin")
    _write(art, data)
    message = _load_error(art)
    assert "outside" in message and re.search(where, message), message


def test_a_symlink_inside_the_directory_is_fine(art):
    data = _data(art)
    i = _index(data, "networks", "movq_decoder")
    original = art / data["networks"][i]["onnx"]
    (art / "alias.onnx").symlink_to(original)
    data["files"]["alias.onnx"] = data["files"].pop(data["networks"][i]["onnx"])
    data["networks"][i]["onnx"] = "alias.onnx"
    _write(art, data)
    with Components(art) as c:
        network = resolve("movq_decoder", c.profile, c.manifest.model_dims)
        feeds = sample_inputs(network)
        served = c.run("movq_decoder", feeds)
    assert mf.load_manifest(art).networks["movq_decoder"].onnx == "alias.onnx"
    direct = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert list(served) == [t.name for t in network.outputs]
    for got, expected in zip(served.values(), direct):
        np.testing.assert_array_equal(got, expected)  # the alias loaded the graph it points to


# -- size + sha256 of every named file ----------------------------------------------------------------------

def _flip_byte_keep_mtime(path, offset: int | None = None) -> None:
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime


@pytest.fixture(scope="module")
def external_data_artifacts(tmp_path_factory, tiny_checkpoint):
    """movq_decoder exported with its weights in an external-data file, as every full-size graph is."""
    from kandinsky_trt.export import onnx_export
    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
    from kandinsky_trt.runtime.contract.spec import Profile

    out = tmp_path_factory.mktemp("external") / "art"
    dirs = CheckpointDirs(tiny_checkpoint.prior, tiny_checkpoint.decoder)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "_PROTOBUF_LIMIT", 1)  # every graph "over 2 GB"
        export_artifacts(ExportConfig(dirs, out, (Profile(1, 64, 64),), "fp32", exporter="legacy",
                                      networks=("movq_decoder",)))
    return out


def test_external_data_is_recorded_and_a_flipped_byte_is_caught(tmp_path, external_data_artifacts):
    art = tmp_path / "art"
    shutil.copytree(external_data_artifacts, art)
    manifest = mf.load_manifest(art)
    entry = manifest.network("movq_decoder")
    assert len(entry.external_data) == 1 and entry.external_data[0].endswith(".onnx.data")
    data_file = art / entry.external_data[0]
    assert manifest.files[entry.external_data[0]] == integrity.file_record(data_file)
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8)).astype(np.float32)
    integrity.VERIFIED.clear()
    with Components(art) as c:
        reference = c.session("movq_decoder").run({"latents": latents})
    _flip_byte_keep_mtime(data_file)
    for fresh_process in (False, True):  # same process (ctime changed) and a new one (empty cache)
        if fresh_process:
            integrity.VERIFIED.clear()
        with Components(art) as c, pytest.raises(BackendError, match=r"movq_decoder \(external data\): .*"
                                                   r"does not match the manifest's sha256 and size record"):
            c.session("movq_decoder")
    assert reference  # the untouched graph ran


def test_a_reshuffled_tokenizer_is_caught(art):
    data = _data(art)
    path = art / data["tokenizers"]["prior"]["file"]
    vocab = json.loads(path.read_text())
    items = list(vocab["model"]["vocab"].items())
    (a, ia), (b, ib) = items[300], items[301]
    vocab["model"]["vocab"][a], vocab["model"]["vocab"][b] = ib, ia  # two tokens swap ids
    path.write_text(json.dumps(vocab))
    with Components(art) as c, pytest.raises(BackendError, match=r"tokenizer prior: .*does not match the manifest"):
        c.loaded.prior_tokenizer


def test_a_truncated_constant_is_caught(art):
    data = _data(art)
    path = art / data["constants"][0]["file"]
    path.write_bytes(path.read_bytes()[:-4])
    with Components(art) as c, pytest.raises(BackendError, match=rf"constant {data['constants'][0]['name']}: "
                                                                   r".*expected 128 bytes.*found 124 bytes"):
        c.loaded.constant(data["constants"][0]["name"])


def test_a_constant_whose_size_does_not_fit_its_shape_is_a_manifest_error(art):
    data = _data(art)
    data["constants"][0]["shape"] = [1, 33]  # 132 bytes; the file and its record hold 128
    _write(art, data)
    assert "expected 132 bytes for float32 [1, 33], found files." in _load_error(art)


def test_each_file_is_hashed_once_per_process(art, monkeypatch):
    calls = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda path, *a: calls.append(str(path)) or real(path, *a))
    for _ in range(3):  # three Components on one directory, as a server with several pipelines
        with Components(art) as c:
            c.session("unet")
            c.loaded.constant("clip_mean")
            c.loaded.prior_tokenizer
    assert len(calls) == 3 and len(set(calls)) == 3


def test_a_missing_record_or_an_unnamed_record_is_refused(art):
    data = _data(art)
    onnx_name = data["networks"][0]["onnx"]
    record = data["files"].pop(onnx_name)
    _write(art, data)
    assert f"files: expected a size + sha256 record for '{onnx_name}'" in _load_error(art)
    data["files"][onnx_name] = record
    data["files"]["stray.bin"] = record
    _write(art, data)
    assert "files.stray.bin: expected only files the manifest names" in _load_error(art)


# -- unreadable, malformed and absurd manifests ---------------------------------------------------------------

def _mutate(path: str, value):
    def apply(d):
        *parents, last = path.split("/")
        for key in parents:
            d = d[int(key)] if isinstance(d, list) else d[key]
        if value is KeyError:
            del d[last]
        else:
            d[int(last) if isinstance(d, list) else last] = value
    return apply


MUTATIONS = {
    "missing schedulers.decoder": (_mutate("schedulers/decoder", KeyError), r"schedulers\.decoder: expected this required field"),
    "missing files": (_mutate("files", KeyError), r"^.*: files: expected this required field"),
    "num_train_timesteps=1e12": (_mutate("schedulers/decoder/config/num_train_timesteps", 1e12),
                                 r"schedulers\.decoder\.config\.num_train_timesteps: expected a JSON integer"),
    "num_train_timesteps=10**12": (_mutate("schedulers/decoder/config/num_train_timesteps", 10**12),
                                   r"num_train_timesteps: expected a number <= 100000, found 1000000000000"),
    "negative dim": (_mutate("networks/0/profiles/0/inputs/0/shape/0", -3),
                     r"networks\[0\]\.profiles\[0\]\.inputs\[0\]\.shape\[0\]: expected a number >= 1"),
    "giant dim": (_mutate("networks/0/profiles/0/inputs/0/shape/0", 10**9),
                  r"networks\[0\]\.profiles\[0\]\.inputs\[0\]\.shape\[0\]: expected a number <= 1048576"),
    "giant tensor": (_mutate("networks/0/profiles/0/inputs/0/shape", [100000, 100000, 100000]),
                     r"profiles\[0\]\.inputs\.input_ids: expected at most 2\*\*31 elements"),
    "unknown graph dim": (_mutate("networks/0/inputs/0/shape/0", "N"),
                          r"networks\[0\]\.inputs\[0\]\.shape\[0\]: expected one of \['B', 'B2', 'H', 'W', 'h', 'w'\]"),
    "batch 10**9": (_mutate("profiles/0/batch", 10**9), r"profiles\[0\]\.batch: expected a number <= 256"),
    "height not /64": (_mutate("profiles/0/height", 100), r"profiles\[0\]\.height: expected a multiple of 64 "
                                                           r"\(model_dims\.latent_scale squared\), found 100"),
    "latent_scale 3": (_mutate("model_dims/latent_scale", 3), r"model_dims\.latent_scale: expected one of \[1, 2, 4"),
    "no latent_scale": (_mutate("model_dims/latent_scale", KeyError),
                        r"model_dims\.latent_scale: expected this required field"),
    "clip_dim 0": (_mutate("model_dims/clip_dim", 0), r"model_dims\.clip_dim: expected a number >= 1"),
    "string dim": (_mutate("model_dims/text_dim", "48"), r"model_dims\.text_dim: expected a JSON integer"),
    "unknown field": (_mutate("surprise", 1), r"surprise: expected no such field"),
    "bad sha": (_mutate("networks/0/onnx_sha256", "xyz"), r"networks\[0\]\.onnx_sha256: expected a string matching"),
    "tokenizer max_length": (_mutate("tokenizers/prior/max_length", 10**9), r"tokenizers\.prior\.max_length: expected a number <= 4096"),
    "std 0": (_mutate("image_processor/std/0", 0), r"image_processor\.std\[0\]: expected a number >= 1e-06"),
    "unsupported scheduler": (_mutate("schedulers/decoder/config/_class_name", "EulerScheduler"),
                              r"schedulers\.decoder\.config: config\['_class_name'\]: expected one of"),
    "thresholding": (_mutate("schedulers/decoder/config/thresholding", True), r"schedulers\.decoder\.config: .*thresholding"),
    "table length": (_mutate("schedulers/decoder/tables/50/timesteps", [1, 2]), r"schedulers\.decoder\.tables\.50: table: .*expected timesteps \(n,\), coefficients"),
    "table key": (_mutate("schedulers/decoder/tables/abc", {"timesteps": [], "coefficients": [], "stochastic": []}),
                  r"schedulers\.decoder\.tables\.abc \(as a key\): expected a string matching"),
    "networks not a list": (_mutate("networks", {"unet": 1}), r"networks: expected a JSON array, found dict"),
    "engine wrong type": (_mutate("networks/0/engine", "unet.plan"), r"networks\[0\]\.engine: expected"),
    "duplicate network": (lambda d: d["networks"].append(d["networks"][0]), r"networks: expected unique names"),
}


@pytest.mark.parametrize("case", sorted(MUTATIONS))
def test_malformed_or_absurd_values_are_one_line_manifest_errors(art, case):
    mutate, match = MUTATIONS[case]
    data = _data(art)
    mutate(data)
    _write(art, data)
    assert re.search(match, _load_error(art)), _load_error(art)


@pytest.mark.parametrize("content, match", [
    (b"\xff\xfe{}", r"expected a JSON manifest, found unreadable content \('utf-8' codec can't decode"),
    (None, r"expected a JSON manifest, found unreadable content"),  # truncated
    (b"[1, 2]", r"expected a JSON object, found list"),
    (b'{"schema_version": NaN}', r"found unreadable content \(a finite JSON number, found NaN\)"),
    (b"[" * 100000 + b"]" * 100000, r"found unreadable content"),  # nesting beyond the parser's recursion
    (b'{"schema_version": 1}', r"schema_version: expected 4, found 1 \(the artifacts predate per-row "
                               r"timesteps and coefficients; re-run `kandinsky-trt export`\)"),
    (b'{"schema_version": 2, "profile": {}}', r"schema_version: expected 4, found 2 \(the artifacts predate"),
    (b'{"schema_version": 3, "profiles": []}', r"schema_version: expected 4, found 3 \(the artifacts predate "
                                               r"per-row timesteps and coefficients; re-run `kandinsky-trt export`\)"),
])
def test_unreadable_manifests_are_one_line_errors(art, content, match):
    path = art / "manifest.json"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2] if content is None else content)
    assert re.search(match, _load_error(art))


def test_a_huge_manifest_is_refused_before_it_is_read(art):
    with open(art / "manifest.json", "r+b") as f:
        f.truncate(mf.MAX_MANIFEST_BYTES + 1)  # sparse: nothing is allocated
    assert f"expected a manifest of at most {mf.MAX_MANIFEST_BYTES} bytes" in _load_error(art)


# -- the hand-written validator and the JSON Schema file agree ---------------------------------------------------

SCHEMA_CASES = [c for c in sorted(MUTATIONS) if c not in (
    "giant tensor", "unsupported scheduler", "thresholding", "table length", "duplicate network",
    "height not /64", "num_train_timesteps=1e12")]  # rules beyond JSON Schema, and 1e12 (an "integer" to jsonschema)


@pytest.mark.parametrize("case", SCHEMA_CASES)
def test_jsonschema_rejects_what_the_runtime_validator_rejects(art, case):
    data = _data(art)
    jsonschema.validate(data, manifest_schema())
    MUTATIONS[case][0](data)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, manifest_schema())
    with pytest.raises(SchemaViolation):
        validate(data)


def test_the_validator_refuses_schema_keywords_it_does_not_implement():
    with pytest.raises(NotImplementedError, match="patternProperties"):
        validate({"a": 1}, {"type": "object", "patternProperties": {"^a$": {"type": "string"}}})
