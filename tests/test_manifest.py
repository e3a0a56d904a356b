"""manifest.json: round trip, JSON Schema, atomic writes and load errors."""

import json

import jsonschema
import pytest

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.schedulers import scheduler_table
from kandinsky_trt.runtime.contract.spec import NETWORKS, ModelDims, Profile, resolve

SHA = "0" * 64


def _manifest(directory) -> mf.Manifest:
    profile, dims = Profile(batch=1, height=64, width=128), ModelDims(clip_dim=32, text_dim=48)
    networks = {}
    for name in NETWORKS:
        network = resolve(name, profile, dims)
        networks[name] = mf.NetworkEntry(name, f"{name}.onnx", SHA, "fp16", network.inputs, network.outputs,
                                         fp32_islands=("GroupNorm",), export_key="k" * 8)
    table = scheduler_table({"_class_name": "DDIMScheduler"}, 2).to_manifest()
    files = {f"{name}.onnx": mf.FileRecord(100, SHA) for name in NETWORKS}
    files |= {"clip_mean.f32.bin": mf.FileRecord(128, SHA), "prior_tokenizer.json": mf.FileRecord(10, SHA),
              "decoder_tokenizer.json": mf.FileRecord(10, SHA)}
    return mf.Manifest(
        directory=directory, profile=profile, model_dims=dims, precision="fp16", networks=networks,
        constants={"clip_mean": mf.ConstantEntry("clip_mean", "clip_mean.f32.bin", "float32", (1, 32), SHA)},
        schedulers={"decoder": {"config": {"_class_name": "DDIMScheduler"}, "tables": {"2": table}},
                    "prior": {"config": {"_class_name": "UnCLIPScheduler"}, "tables": {}}},
        tokenizers={"prior": {"file": "prior_tokenizer.json", "max_length": 77, "pad_id": 0},
                    "decoder": {"file": "decoder_tokenizer.json", "max_length": 77, "pad_id": 1}},
        image_processor={"size": 224, "mean": [0.5] * 3, "std": [0.5] * 3},
        producer={"exporter": "legacy"}, checkpoints={"prior": "/ckpt/prior"}, files=files,
    )


def test_round_trip_and_schema(tmp_path):
    original = _manifest(tmp_path)
    path = original.save()
    data = json.loads(path.read_text())
    jsonschema.validate(data, json.loads(mf.SCHEMA_PATH.read_text()))
    loaded = mf.load_manifest(tmp_path)
    assert loaded == original
    assert loaded.network("unet").resolved() == resolve("unet", original.profile, original.model_dims)
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left behind


def test_schema_rejects_a_bad_profile(tmp_path):
    data = _manifest(tmp_path).to_dict()
    data["profile"]["height"] = 100
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, json.loads(mf.SCHEMA_PATH.read_text()))


def test_missing_and_corrupt_manifests_are_named(tmp_path):
    with pytest.raises(mf.ManifestError, match="expected .*manifest.json .*found no such file"):
        mf.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(mf.ManifestError, match="expected a JSON manifest, found unreadable"):
        mf.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(mf.ManifestError, match="schema_version: expected 2, found 99"):
        mf.load_manifest(tmp_path)


def test_unknown_network_names_the_available_ones(tmp_path):
    manifest = _manifest(tmp_path)
    with pytest.raises(mf.ManifestError, match="network: expected one of .*found 'vae'"):
        manifest.network("vae")


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "x.bin"
    mf.write_bytes_atomic(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(mf.os, "replace", broken_replace)
    with pytest.raises(OSError):
        mf.write_bytes_atomic(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
