"""``debug-precision`` and ``export --fp32-nodes`` on the tiny checkpoint (CPU, ONNX Runtime).

* clean fp16 exports report no node over tolerance and nothing non-finite (TorchScript exporter:
  the session's batch-2 fixtures; dynamo exporter: the session's fp16 fixture against an fp32 UNet
  exported here);
* a UNet whose ``down_blocks.0.resnets.0.conv1`` weights are scaled so that conv's output reaches 4x
  the fp16 limit is caught at exactly that Conv node, the report names it and suggests the module
  around it; exporting with that island through the export option removes the failure.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from kandinsky_trt.export.precision_debug import FP16_MAX, DebugConfig, PrecisionDebugError, compare_arrays
from kandinsky_trt.export.precision_debug import debug_precision

OVERFLOW_MODULE = "down_blocks.0.resnets.0"
MEASURE = os.environ.get("KTRT_MEASURE") == "1"  # print the measured maxima (README figures)


def _export(checkpoint_dir, out, precision, exporter="legacy", fp32_nodes=()):
    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
    from kandinsky_trt.runtime.contract.spec import Profile

    dirs = CheckpointDirs(checkpoint_dir / "prior", checkpoint_dir / "decoder")
    export_artifacts(ExportConfig(dirs, out, (Profile(1, 64, 64, cfg=True),), precision, exporter=exporter,
                                  networks=("unet",), fp32_nodes=tuple(fp32_nodes)))
    return out


def _scale_to_overflow(checkpoint_dir) -> float:
    """Scale conv1 of the first resnet (weight and bias) so its fp32 output peaks at 4 x 65504."""
    import torch
    from safetensors.torch import load_file, save_file

    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, load_network, read_model_dims
    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.export.torch_modules import WRAPPERS
    from kandinsky_trt.runtime.contract.spec import Profile, resolve

    dirs = CheckpointDirs(checkpoint_dir / "prior", checkpoint_dir / "decoder")
    model, peak = load_network("unet", dirs), []
    conv = model.get_submodule(f"{OVERFLOW_MODULE}.conv1")
    conv.register_forward_hook(lambda module, args, out: peak.append(float(out.abs().max())))
    feeds = sample_inputs(resolve("unet", Profile(1, 64, 64, True), read_model_dims(dirs)))
    with torch.no_grad():
        WRAPPERS["unet"](model, torch.float32)(*(torch.from_numpy(a) for a in feeds.values()))
    scale = 4 * FP16_MAX / peak[0]
    path = next((checkpoint_dir / "decoder" / "unet").glob("*.safetensors"))
    weights = load_file(str(path))
    for suffix in ("weight", "bias"):
        weights[f"{OVERFLOW_MODULE}.conv1.{suffix}"] *= scale
    assert float(weights[f"{OVERFLOW_MODULE}.conv1.weight"].abs().max()) < FP16_MAX  # the weights fit fp16
    save_file(weights, str(path), metadata={"format": "pt"})
    return scale


@pytest.fixture(scope="module")
def overflowing(tmp_path_factory, tiny_checkpoint):
    """A copy of the tiny checkpoint with the overflowing conv, its fp16 and fp32 UNet exports."""
    root = tmp_path_factory.mktemp("overflow")
    checkpoint = root / "checkpoint"
    for part in ("prior", "decoder"):
        shutil.copytree(getattr(tiny_checkpoint, part), checkpoint / part)
    _scale_to_overflow(checkpoint)
    return checkpoint, _export(checkpoint, root / "fp16", "fp16"), _export(checkpoint, root / "fp32", "fp32")


def test_clean_fp16_exports_pass(artifacts_fp16_b2_wide, artifacts_fp32_b2_wide):
    """Every network of the batch-2 fp16 artifacts (TorchScript exporter) against its fp32 twin."""
    reports = debug_precision(DebugConfig(artifacts_fp16_b2_wide[0], artifacts_fp32_b2_wide[0]))
    assert {r.network for r in reports} >= {"unet", "movq_decoder", "text_encoder", "prior"}
    for report in reports:
        if MEASURE:
            print(f"{report.network}: max rel {max(n.rel_error for n in report.compared):.2e}")
        assert report.first_over_tolerance is None and report.first_non_finite is None, report.network
        assert report.compared and report.passed and not report.suggestion
        assert all(n.rel_error is None or n.rel_error <= report.tolerance for n in report.nodes)
        # most tensors have a reference: what is left is the casts the fp16 export adds and attention internals
        assert len(report.compared) > 0.5 * len(report.nodes), report.network


def test_clean_dynamo_unet_passes(tmp_path, artifacts_fp16, tiny_checkpoint):
    reference = _export(tiny_checkpoint.decoder.parent, tmp_path / "fp32", "fp32", exporter="dynamo")
    [report] = debug_precision(DebugConfig(artifacts_fp16[0], reference, networks=("unet",)))
    assert report.passed and len(report.compared) > 0.5 * len(report.nodes)
    scopes = {n.scope for n in report.compared}
    assert {"conv_in", f"{OVERFLOW_MODULE}.conv1", f"{OVERFLOW_MODULE}.norm1"} <= scopes  # islands aligned too


def test_overflow_is_caught_at_the_conv_and_fixed_by_the_suggested_island(overflowing, tmp_path, capsys):
    from kandinsky_trt.runtime.cli.main import main

    checkpoint, fp16, fp32 = overflowing
    out = tmp_path / "report.json"
    assert main(["debug-precision", "--artifacts", str(fp16), "--reference", str(fp32), "--out", str(out)]) == 1
    printed = capsys.readouterr().out
    [report] = json.loads(out.read_text())["networks"]
    first, non_finite = report["first_over_tolerance"], report["first_non_finite"]
    assert (first["scope"], first["op"]) == (f"{OVERFLOW_MODULE}.conv1", "Conv")  # exactly that node
    assert first["node"] == non_finite["node"] and first["node"] in printed
    assert first["rel_error"] == "inf" and first["ref_max_abs"] == pytest.approx(4 * FP16_MAX, rel=1e-3)
    assert report["suggested_fp32_nodes"] == [OVERFLOW_MODULE]
    assert f"--fp32-nodes unet:{OVERFLOW_MODULE}" in printed

    fixed = _export(checkpoint, tmp_path / "fixed", "fp16", fp32_nodes=[f"unet:{OVERFLOW_MODULE}"])
    manifest = json.loads((fixed / "manifest.json").read_text())
    assert OVERFLOW_MODULE in manifest["networks"][0]["fp32_islands"]
    [after] = debug_precision(DebugConfig(fixed, fp32))
    assert after.passed and after.first_non_finite is None and not after.suggestion
    conv = [n for n in after.nodes if n.scope == f"{OVERFLOW_MODULE}.conv1" and n.op == "Conv"]
    assert conv and conv[0].dtype == "float32" and conv[0].max_abs == pytest.approx(4 * FP16_MAX, rel=1e-3)


def test_fp32_nodes_enter_the_production_hash(tiny_checkpoint):
    from kandinsky_trt.export.artifacts import ExportConfig, _export_key
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, read_model_dims

    dirs = CheckpointDirs(tiny_checkpoint.prior, tiny_checkpoint.decoder)
    dims = read_model_dims(dirs)
    plain = ExportConfig(dirs, tiny_checkpoint.decoder)
    keys = {nodes: _export_key("unet", ExportConfig(dirs, tiny_checkpoint.decoder, fp32_nodes=nodes), dims)
            for nodes in ((), (f"unet:{OVERFLOW_MODULE}",), ("movq_decoder:decoder.conv_out",))}
    assert keys[()] == _export_key("unet", plain, dims)
    assert keys[(f"unet:{OVERFLOW_MODULE}",)] != keys[()]  # a new island: a new graph
    assert keys[("movq_decoder:decoder.conv_out",)] == keys[()]  # another network's island: same UNet


@pytest.mark.parametrize("item, message", [
    ("down_blocks.0", r"expected NETWORK:MODULE_PATH .*found 'down_blocks.0'"),
    ("vae:decoder", r"NETWORK one of \[.*'unet'.*\].*found 'vae:decoder'"),
])
def test_bad_fp32_nodes(item, message):
    from kandinsky_trt.export.precision import PrecisionPolicyError, policy_for

    with pytest.raises(PrecisionPolicyError, match=message):
        policy_for("unet", "fp16", (item,))


def test_unknown_module_path_is_named():
    import torch

    from kandinsky_trt.export.precision import PrecisionPolicyError, apply_policy, policy_for

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    with pytest.raises(PrecisionPolicyError, match=r"found 'down_blocks.9' \(no such submodule\)"):
        apply_policy(model, policy_for("unet", "fp16", ("unet:down_blocks.9",)))


def test_exporters_must_match(artifacts_fp16, artifacts_fp32):
    with pytest.raises(PrecisionDebugError, match=r"exporter \(dynamo\), found one from legacy"):
        debug_precision(DebugConfig(artifacts_fp16[0], artifacts_fp32[0], networks=("movq_decoder",)))


def test_reference_must_be_fp32(artifacts_fp16):
    with pytest.raises(PrecisionDebugError, match=r"--reference: expected fp32 graphs .*found fp16"):
        debug_precision(DebugConfig(artifacts_fp16[0], artifacts_fp16[0], networks=("unet",)))


def test_masking_constants_are_not_overflow():
    """fp16 attention masks hold -65504 where fp32 holds finfo(float32).min; a real overflow is inf."""
    found, reference = np.array([-65504, -np.inf, 1, 2], np.float16), np.array([-3.4e38, -np.inf, 1, 2], np.float32)
    assert compare_arrays(found, reference) == (0.0, 2.0, 2, 0)  # both masking constants left out, counted
    overflow = compare_arrays(np.array([np.inf, 1, 2], np.float16), np.array([7e4, 1, 2], np.float32))
    assert (overflow[0], overflow[3]) == (np.inf, 1)  # a real overflow: inf, one unexplained value
