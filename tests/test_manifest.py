"""manifest.json: round trip, JSON Schema, atomic writes and load errors."""

import json

import jsonschema
import pytest

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.schedulers import scheduler_table
from kandinsky_trt.runtime.contract.spec import NETWORKS, ModelDims, Profile, resolve, resolve_graph

SHA = "0" * 64
PROFILES = (Profile(batch=1, height=64, width=128), Profile(batch=4, height=64, width=128),
            Profile(batch=1, height=128, width=64))


def _manifest(directory, profiles=PROFILES) -> mf.Manifest:
    dims = ModelDims(clip_dim=32, text_dim=48)
    networks = {}
    for name in NETWORKS:
        graph = resolve_graph(name, dims)
        networks[name] = mf.NetworkEntry(name, f"{name}.onnx", SHA, "fp16", graph.inputs, graph.outputs,
                                         tuple(resolve(name, p, dims) for p in profiles),
                                         fp32_islands=("GroupNorm",), export_key="k" * 8)
    table = scheduler_table({"_class_name": "DDIMScheduler"}, 2).to_manifest()
    files = {f"{name}.onnx": mf.FileRecord(100, SHA) for name in NETWORKS}
    files |= {"clip_mean.f32.bin": mf.FileRecord(128, SHA), "prior_tokenizer.json": mf.FileRecord(10, SHA),
              "decoder_tokenizer.json": mf.FileRecord(10, SHA)}
    return mf.Manifest(
        directory=directory, profiles=profiles, model_dims=dims, precision="fp16", networks=networks,
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
    for index, profile in enumerate(PROFILES):
        assert loaded.network("unet").resolved(index) == resolve("unet", profile, original.model_dims)
    assert data["networks"][0]["inputs"][0]["shape"] == ["B2", 77]  # the graph's: profile dims by name
    assert loaded.sizes() == [(64, 128), (128, 64)]
    assert loaded.batches((64, 128)) == [1, 4] and loaded.batches((128, 64)) == [1] and loaded.batches() == [1, 4]
    assert loaded.profile_index(4, (64, 128)) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary file left behind


def _reload(tmp_path, data):
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    return mf.load_manifest(tmp_path)


@pytest.mark.parametrize("change, message", [
    (lambda d: d["profiles"].append(dict(d["profiles"][0])),
     r"profiles: expected distinct \(batch, height, width\), found \[\(1, 64, 128\)\] more than once"),
    (lambda d: d["profiles"][1].update(cfg=False), "profiles: expected one cfg for every profile"),
    (lambda d: d["networks"][4]["profiles"].pop(), r"networks\[4\] \(unet\)\.profiles: expected the resolved I/O "
                                                   r"of profiles \[0, 1, 2\] in order, found profiles \[0, 1\]"),
    (lambda d: d["networks"][4]["profiles"][1]["inputs"][0].update(shape=[2, 4, 8, 16]),
     r"networks\[4\] \(unet\)\.profiles\[1\]\.inputs\.sample: expected shape \['B2', 4, 'h', 'w'\]"),
    (lambda d: d["networks"][4]["profiles"][0]["outputs"][0].update(shape=[2, 8, 8, 8]),
     r"profiles\[0\]\.outputs\.noise_pred: expected shape \['B2', 8, 'h', 'w'\]"),  # w: 16 from the input
    (lambda d: d.update(profile=d.pop("profiles")[0]), "profiles: expected this required field, found none"),
])
def test_profile_rules_are_enforced_at_load(tmp_path, change, message):
    data = _manifest(tmp_path).to_dict()
    change(data)
    with pytest.raises(mf.ManifestError, match=message):
        _reload(tmp_path, data)


HINT = r"\(the artifacts predate per-row timesteps and coefficients; re-run `kandinsky-trt export`\)"


def test_an_older_schema_is_refused_never_misread(tmp_path):
    data = _manifest(tmp_path, PROFILES[:1]).to_dict()
    data |= {"schema_version": 2, "profile": data.pop("profiles")[0]}  # what 0.2.x wrote
    with pytest.raises(mf.ManifestError, match=r"schema_version: expected 4, found 2 " + HINT):
        _reload(tmp_path, data)


def test_a_schema_3_manifest_is_refused_with_the_reexport_hint(tmp_path):
    """Schema 3 (0.3.x): the same layout, but a (1,) timestep and (K,) coefficient row per call. Its
    graphs cannot take per-row feeds, so it is refused in one line, never read as schema 4."""
    data = _manifest(tmp_path).to_dict()
    for network in data["networks"]:  # what 0.3.x wrote for the loop networks and step graphs
        for tensor in network["inputs"]:
            if tensor["name"] in ("timestep", "guidance_scale"):
                tensor["shape"] = [1]
    data["schema_version"] = 3
    with pytest.raises(mf.ManifestError, match=r"^schema_version: expected 4, found 3 " + HINT + "$"):
        _reload(tmp_path, data)


def test_schema_rejects_a_bad_profile(tmp_path):
    data = _manifest(tmp_path).to_dict()
    data["profiles"][0]["height"] = 0  # multiples of latent_scale**2: a cross-field rule, checked at load
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(data, json.loads(mf.SCHEMA_PATH.read_text()))


def test_missing_and_corrupt_manifests_are_named(tmp_path):
    with pytest.raises(mf.ManifestError, match="expected .*manifest.json .*found no such file"):
        mf.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(mf.ManifestError, match="expected a JSON manifest, found unreadable"):
        mf.load_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(mf.ManifestError, match="schema_version: expected 4, found 99"):
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
