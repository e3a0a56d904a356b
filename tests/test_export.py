"""ONNX export of the tiny checkpoint: graph contracts, parity with torch, manifest, reuse, errors."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import jsonschema
import numpy as np
import onnx
import pytest

from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, read_model_dims
from kandinsky_trt.export.onnx_export import check_graph_io
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.spec import (BRIDGE_NETWORKS, NETWORKS, STEP_NETWORKS, ModelDims, Profile, SpecError,
                                                resolve_graph)

ALL_ARTIFACTS = ["artifacts_fp32", "artifacts_fp16", "artifacts_fp32_b2_wide", "artifacts_fp16_b2_wide"]


@pytest.mark.parametrize("fixture", ALL_ARTIFACTS)
def test_every_network_exports_and_matches_torch(fixture, request):
    out, report = request.getfixturevalue(fixture)
    assert sorted(p.network for p in report.parity) == sorted(NETWORKS)  # one shape each: one profile
    for parity in report.parity:
        assert parity.passed, parity.line()
    manifest = mf.load_manifest(out)
    assert set(manifest.networks) == set(NETWORKS) | set(STEP_NETWORKS) | set(BRIDGE_NETWORKS)
    jsonschema.validate(json.loads((out / "manifest.json").read_text()), json.loads(mf.SCHEMA_PATH.read_text()))


@pytest.mark.parametrize("fixture", ["artifacts_fp32", "artifacts_fp16_b2_wide"])
def test_graph_io_equals_the_resolved_spec(fixture, request):
    out, _ = request.getfixturevalue(fixture)
    manifest = mf.load_manifest(out)
    for name, entry in manifest.networks.items():
        model = onnx.load(str(out / entry.onnx), load_external_data=False)
        check_graph_io(model, resolve_graph(name, manifest.model_dims))
        assert mf.sha256_file(out / entry.onnx) == entry.onnx_sha256


def test_fp16_graphs_compute_in_fp16_with_fp32_islands(artifacts_fp16):
    out, _ = artifacts_fp16
    manifest = mf.load_manifest(out)
    unet = onnx.load(str(out / manifest.network("unet").onnx))
    dtypes = {init.data_type for init in unet.graph.initializer}
    assert onnx.TensorProto.FLOAT16 in dtypes  # the weights are fp16
    assert "GroupNorm" in manifest.network("unet").fp32_islands
    # A GroupNorm island is Cast(to fp32) -> InstanceNormalization: the norm must see fp32 input.
    producers = {o: n for n in unet.graph.node for o in n.output}
    norms = [n for n in unet.graph.node if n.op_type == "InstanceNormalization"]
    assert norms
    for norm in norms:
        chain = producers.get(norm.input[0])
        while chain is not None and chain.op_type == "Reshape":
            chain = producers.get(chain.input[0])
        assert chain is not None and chain.op_type == "Cast"
        assert onnx.helper.get_attribute_value(chain.attribute[0]) == onnx.TensorProto.FLOAT


def test_constants_and_tokenizers(artifacts_fp32, tiny_checkpoint):
    from diffusers import PriorTransformer

    out, _ = artifacts_fp32
    manifest = mf.load_manifest(out)
    prior = PriorTransformer.from_pretrained(tiny_checkpoint.prior / "prior")
    mean = np.fromfile(out / manifest.constants["clip_mean"].file, "<f4").reshape(manifest.constants["clip_mean"].shape)
    np.testing.assert_array_equal(mean, prior.clip_mean.detach().numpy())
    assert manifest.constants["zero_image_embeds"].shape == (1, manifest.model_dims.clip_dim)
    for entry in manifest.tokenizers.values():
        assert (out / entry["file"]).is_file()
    assert manifest.schedulers["decoder"]["config"]["_class_name"] == "DDIMScheduler"
    assert "100" in manifest.schedulers["decoder"]["tables"]


def test_reexport_reuses_by_hash_and_redoes_what_changed(tmp_path, tiny_checkpoint):
    dirs = CheckpointDirs(tiny_checkpoint.prior, tiny_checkpoint.decoder)
    config = ExportConfig(dirs, tmp_path, (Profile(1, 64, 64),), "fp32", exporter="legacy",
                          networks=("movq_decoder", "prior"))
    first = export_artifacts(config)
    assert sorted(first.exported) == ["movq_decoder", "prior"]
    assert sorted(export_artifacts(config).reused) == ["movq_decoder", "prior"]
    (tmp_path / mf.load_manifest(tmp_path).network("prior").onnx).write_bytes(b"tampered")  # not reusable
    third = export_artifacts(config)
    assert third.exported == ["prior"] and third.reused == ["movq_decoder"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    # Exporting one network keeps the others of the same profile in the manifest.
    fourth = export_artifacts(replace(config, networks=("prior",)))
    assert fourth.reused == ["prior"] and {"prior", "movq_decoder"} <= set(mf.load_manifest(tmp_path).networks)


def test_constants_are_reused_with_their_source_networks(tmp_path, tiny_checkpoint, monkeypatch):
    from kandinsky_trt.export import artifacts

    dirs = CheckpointDirs(tiny_checkpoint.prior, tiny_checkpoint.decoder)
    config = ExportConfig(dirs, tmp_path, (Profile(1, 64, 64),), "fp32", exporter="legacy",
                          networks=("prior", "image_encoder"))
    first = mf.load_manifest(export_artifacts(config).manifest_path.parent).constants

    def must_not_run(*args):
        raise AssertionError("constants recomputed although prior and image_encoder were reused")

    monkeypatch.setattr(artifacts, "export_constants", must_not_run)
    assert mf.load_manifest(export_artifacts(config).manifest_path.parent).constants == first


def test_model_dims_are_read_and_cross_checked(tiny_checkpoint, tmp_path):
    dirs = CheckpointDirs(tiny_checkpoint.prior, tiny_checkpoint.decoder, tiny_checkpoint.inpaint)
    assert read_model_dims(dirs) == ModelDims(clip_dim=32, text_dim=48, image_size=224, text_len=77)
    decoder = tmp_path / "decoder"
    shutil.copytree(tiny_checkpoint.decoder, decoder)
    config_path = decoder / "unet" / "config.json"
    config = json.loads(config_path.read_text())
    config["cross_attention_dim"] = 40
    config_path.write_text(json.dumps(config))
    with pytest.raises(SpecError, match="CLIP embedding width .*expected 32 .*unet.cross_attention_dim=40"):
        read_model_dims(CheckpointDirs(tiny_checkpoint.prior, decoder))


def test_missing_checkpoint_is_named(tmp_path, tiny_checkpoint):
    dirs = CheckpointDirs(tmp_path / "nowhere", tiny_checkpoint.decoder)
    with pytest.raises(SpecError, match="--prior: expected .*config.json"):
        export_artifacts(ExportConfig(dirs, tmp_path / "out"))
