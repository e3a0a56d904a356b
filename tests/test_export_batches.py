"""Exports whose dims take one value (issue 18 §3.1): ``export --batch 2`` failed with
``Cannot create Dim with inconsistent min=4, max=4``.

A cheap test of the ``dynamic_shapes`` construction over every single-batch value, size shape
(square, portrait, landscape), guidance on/off and every network; one where every dim takes one
value; and one real dynamo export (tiny checkpoint, fp32, batch 2, landscape) whose graphs load and
run in ONNX Runtime at its profile.
"""

from __future__ import annotations

import numpy as np
import pytest

from kandinsky_trt.export.onnx_export import ExportRequest, _dim_steps, _dynamic_shapes
from kandinsky_trt.export.precision import policy_for
from kandinsky_trt.runtime.contract.spec import (
    KANDINSKY_2_1_DIMS, NETWORKS, ModelDims, Profile, resolve_graph)

TINY_DIMS = ModelDims(clip_dim=32, text_dim=32, image_size=32, text_len=77, latent_scale=4)
SHAPES = {"square": (512, 512), "portrait": (768, 512), "landscape": (512, 768)}
BATCHES = (1, 2, 3, 4, 8)


def _checked(shapes: tuple | None, graph, values: list[dict[str, int]]) -> int:
    """Every Dim of ``shapes`` has min < max, holds every value its dim takes, on its step; returns
    how many dims were checked."""
    steps, count = _dim_steps(values[0]), 0
    for tensor, spec in zip(graph.inputs, shapes or ()):
        for axis, dim in (spec or {}).items():
            name = tensor.shape[axis]
            assert dim.min < dim.max, (tensor.name, name, dim.min, dim.max)
            for v in values:
                assert dim.min <= v[name] <= dim.max and v[name] % steps.get(name, 1) == 0, (name, v[name], dim)
            count += 1
    return count


def _request(name: str, profile: Profile, dims: ModelDims, tmp_path) -> ExportRequest:
    return ExportRequest.for_profiles(name, (profile,), dims, policy_for(name, "fp32"), tmp_path)


@pytest.mark.parametrize("dims", [KANDINSKY_2_1_DIMS, TINY_DIMS], ids=["kandinsky21", "tiny"])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("batch", BATCHES)
def test_single_batch_profiles_give_valid_dims(batch, shape, cfg, dims, tmp_path):
    height, width = SHAPES[shape]
    profile = Profile(batch, height, width, cfg=cfg)
    checked = 0
    for name in NETWORKS:
        request = _request(name, profile, dims, tmp_path)
        checked += _checked(_dynamic_shapes(request.graph, list(request.dim_values)), request.graph,
                            list(request.dim_values))
    assert checked > 0


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_every_dim_taking_one_value_stays_symbolic(name):
    """Trace and profile alike (batch, B2, H, W, h, w all single-valued): a range one step wide."""
    from kandinsky_trt.runtime.contract.spec import dim_values

    graph = resolve_graph(name, KANDINSKY_2_1_DIMS)
    values = [dim_values(Profile(2, 768, 512, cfg=True), KANDINSKY_2_1_DIMS)] * 2
    shapes = _dynamic_shapes(graph, values)
    if shapes is None:
        assert not any(isinstance(d, str) for t in graph.inputs for d in t.shape)
        return
    assert _checked(shapes, graph, values) > 0
    steps = _dim_steps(values[0])
    for tensor, spec in zip(graph.inputs, shapes):
        for axis, dim in (spec or {}).items():
            assert dim.max - dim.min == steps.get(tensor.shape[axis], 1)


def test_dynamo_export_of_a_single_batch_2_landscape_profile(tmp_path, tiny_checkpoint):
    """``export --batch 2 --height 64 --width 128`` with dynamo (the issue's failure), fp32, parity
    checked by export; every graph then loads and runs in ONNX Runtime at that profile. Networks:
    the UNet (B2 = 4, h, w: the "min=4, max=4" of the issue) and the MoVQ encoder (B, H, W)."""
    import json

    import onnxruntime as ort

    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, read_model_dims
    from kandinsky_trt.runtime.backends.base import sample_inputs
    from kandinsky_trt.runtime.contract.spec import resolve

    dirs = CheckpointDirs(tiny_checkpoint.prior, tiny_checkpoint.decoder, tiny_checkpoint.inpaint)
    profile = Profile(2, 64, 128, cfg=True)
    names = ("unet", "movq_encoder")
    report = export_artifacts(ExportConfig(dirs, tmp_path, (profile,), "fp32", exporter="dynamo", verify=True,
                                           networks=names))
    assert report.passed and sorted(report.exported) == sorted(names)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["profiles"] == [profile.to_dict()]
    dims, files = read_model_dims(dirs), {n["name"]: n["onnx"] for n in manifest["networks"]}
    for name in names:
        network = resolve(name, profile, dims)
        session = ort.InferenceSession(str(tmp_path / files[name]), providers=["CPUExecutionProvider"])
        assert session.get_inputs()[0].shape[0] in ("B", "B2"), name  # still one graph with named dims
        outputs = session.run(None, sample_inputs(network))
        assert [o.shape for o in outputs] == [t.shape for t in network.outputs], name
        assert all(np.isfinite(o).all() for o in outputs), name
