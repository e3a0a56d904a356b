"""Step graphs (export/step_graphs.py) in onnxruntime (CPU) against the numpy reference ``apply_step``.

Tolerance: atol = rtol = 1e-6 (measured: x0 bit-exact; latents_next <= 2.4e-7 absolute, from 1-ulp
differences of Exp in the learned-variance term between onnxruntime and numpy).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

ort = pytest.importorskip("onnxruntime")

from kandinsky_trt.export.step_graphs import build_step_graph, write_step_graph  # noqa: E402
from kandinsky_trt.runtime.contract import schedulers as S  # noqa: E402
from kandinsky_trt.runtime.contract.spec import (  # noqa: E402
    COEFFICIENT_COLUMNS,
    STEP_NETWORKS,
    ModelDims,
    Profile,
    SpecError,
    resolve,
    resolve_graph,
)

DIMS = ModelDims(clip_dim=32, text_dim=32, image_size=32)
TOL = {"rtol": 1e-6, "atol": 1e-6}
COL = {name: i for i, name in enumerate(COEFFICIENT_COLUMNS)}
ELEMENTWISE_OPS = {"Split", "Slice", "Sub", "Mul", "Add", "Max", "Min", "Exp", "Concat", "Identity", "Reshape"}
DDIM = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1}  # fmt: skip
DDPM_LEARNED = {**DDIM, "_class_name": "DDPMScheduler", "variance_type": "learned_range", "clip_sample": True,
                "clip_sample_range": 2.0}  # fmt: skip
UNCLIP = {"_class_name": "UnCLIPScheduler", "prediction_type": "sample", "clip_sample_range": 10.0}


def _rows(prior: bool) -> list[np.ndarray]:
    """Real rows of every scheduler (clip on/off, learned variance, DPM history) plus one with every term on."""
    tables = [S.scheduler_table(UNCLIP, 25), S.scheduler_table(S.fast_solver_config(DDIM), 10)]
    if not prior:
        tables += [S.scheduler_table(DDIM, 50), S.scheduler_table(DDPM_LEARNED, 50)]
    rows = [t.coefficients[i] for t in tables for i in (0, len(t) // 2, len(t) - 1)]
    learned = 0.0 if prior else 1.0  # the prior has no variance channels
    synthetic = np.array([0.9, -0.4, -1.0, 1.5, 0.7, 0.3, 0.2, -0.1, 0.05, learned, -6.0, -2.0], np.float32)
    return rows + [synthetic]


def _session(model: onnx.ModelProto):
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _feeds(spec, rng) -> dict[str, np.ndarray]:
    feeds = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in spec.inputs}
    if spec.tensor("model_output").shape[1] > spec.tensor("latents").shape[1]:  # learned variance in [-1, 1]
        out = feeds["model_output"]
        out[:, 4:] = np.tanh(out[:, 4:])
    feeds["guidance_scale"] = np.full(spec.tensor("guidance_scale").shape, 4.0, np.float32)
    return feeds


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("name", sorted(STEP_NETWORKS))
def test_step_graph_matches_apply_step(name, cfg, batch):
    profile = Profile(batch=batch, height=64, width=128, cfg=cfg)
    spec = resolve(name, profile, DIMS)
    session = _session(build_step_graph(name, cfg, DIMS))  # one symbolic graph serves every batch and size
    rng = np.random.default_rng(batch + 2 * cfg)
    for row in _rows(prior=name == "prior_step"):
        feeds = {**_feeds(spec, rng), "coefficients": np.tile(row, (batch, 1))}
        got = dict(zip(spec.output_names, session.run(None, feeds)))
        x_next, x0 = S.apply_step(
            row, feeds["latents"], feeds["model_output"], feeds["noise"], 4.0, feeds["x0_prev"], cfg
        )
        np.testing.assert_allclose(got["x0"], x0, **TOL)
        np.testing.assert_allclose(got["latents_next"], x_next, **TOL)
        expected_input = np.concatenate([got["latents_next"]] * (2 if cfg else 1))
        if "conditioning" in feeds:
            expected_input = np.concatenate([expected_input, feeds["conditioning"]], axis=1)
        np.testing.assert_array_equal(got["model_input"], expected_input)


@pytest.mark.parametrize("cfg", [True, False])
@pytest.mark.parametrize("name", sorted(STEP_NETWORKS))
def test_graph_io_equals_spec(name, cfg):
    model = build_step_graph(name, cfg, DIMS)
    spec = resolve_graph(name, DIMS)

    def describe(values) -> list[tuple]:
        return [
            (v.name, onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name,
             tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
            for v in values
        ]  # fmt: skip

    assert describe(model.graph.input) == [(t.name, t.dtype, t.shape) for t in spec.inputs]
    assert describe(model.graph.output) == [(t.name, t.dtype, t.shape) for t in spec.outputs]
    assert {node.op_type for node in model.graph.node} <= ELEMENTWISE_OPS
    assert model.opset_import[0].version in (17, 18)
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    assert describe(inferred.graph.output) == describe(model.graph.output)


def test_dpm_history_through_the_graph():
    """x0 output fed back as x0_prev: 10 DPM-Solver++ steps in onnxruntime equal the apply_step loop."""
    profile = Profile(batch=1, height=64, width=64, cfg=True)
    spec = resolve("unet_step", profile, DIMS)
    session = _session(build_step_graph("unet_step", profile.cfg, DIMS))
    table = S.scheduler_table(S.fast_solver_config(DDIM), 10)
    rng = np.random.default_rng(0)
    x_graph = x_ref = rng.standard_normal(spec.tensor("latents").shape).astype(np.float32)
    h_graph = h_ref = np.zeros_like(x_graph)
    for row in table.coefficients:
        out = rng.standard_normal(spec.tensor("model_output").shape).astype(np.float32)
        zeros = np.zeros_like(x_graph)
        feeds = {"latents": x_graph, "model_output": out, "coefficients": row[None], "noise": zeros,
                 "guidance_scale": np.array([[4.0]], np.float32), "x0_prev": h_graph}  # fmt: skip
        x_graph, h_graph, _ = session.run(None, feeds)
        x_ref, h_ref = S.apply_step(row, x_ref, out, None, 4.0, h_ref, True)
    np.testing.assert_allclose(x_graph, x_ref, **TOL)


def _one_row(feeds: dict, b: int, batch: int, cfg: bool) -> dict:
    """Row b of a B-row step-graph feed as a one-row feed ([uncond_b; cond_b] for the B2 tensors)."""
    one = {}
    for name, array in feeds.items():
        if name in ("model_output", "conditioning"):
            one[name] = array[[b, batch + b]] if cfg else array[[b]]
        else:
            one[name] = array[[b]]
    return one


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("name", sorted(STEP_NETWORKS))
def test_rows_at_different_steps_equal_one_row_runs(name, cfg):
    """The per-row contract: one call whose rows are at different steps of different schedulers, with
    different guidance (1.0 among them), equals row by row and bit for bit one-row calls of the same
    graph, and the per-row numpy reference (the same operation order) within the graph's tolerance."""
    prior = name == "prior_step"
    rows = _rows(prior)  # every scheduler's first / middle / last rows and the synthetic one
    batch = len(rows)
    spec, one = resolve(name, Profile(batch, 64, 128, cfg), DIMS), resolve(name, Profile(1, 64, 128, cfg), DIMS)
    session = _session(build_step_graph(name, cfg, DIMS))
    feeds = _feeds(spec, np.random.default_rng(7))
    feeds["coefficients"] = np.stack(rows)
    feeds["guidance_scale"] = np.array([[1.0], [4.0], [7.5], [0.5]] * batch, np.float32)[:batch]
    got = dict(zip(spec.output_names, session.run(None, feeds)))
    x_next, x0 = S.apply_step(feeds["coefficients"], feeds["latents"], feeds["model_output"], feeds["noise"],
                              feeds["guidance_scale"], feeds["x0_prev"], cfg)
    np.testing.assert_allclose(got["latents_next"], x_next, **TOL)
    np.testing.assert_array_equal(got["x0"], x0)
    for b in range(batch):
        single = _one_row(feeds, b, batch, cfg)
        alone = dict(zip(one.output_names, session.run(None, single)))
        np.testing.assert_array_equal(got["latents_next"][b], alone["latents_next"][0])
        np.testing.assert_array_equal(got["x0"][b], alone["x0"][0])
        halves = [b, batch + b] if cfg else [b]
        np.testing.assert_array_equal(got["model_input"][halves], alone["model_input"])
        ref_next, ref_x0 = S.apply_step(single["coefficients"][0], single["latents"], single["model_output"],
                                        single["noise"], float(single["guidance_scale"][0, 0]), single["x0_prev"], cfg)
        np.testing.assert_array_equal(x_next[b], ref_next[0])  # the per-row reference = the one-row reference
        np.testing.assert_array_equal(x0[b], ref_x0[0])


def test_apply_step_refuses_rows_of_another_shape():
    x, out = np.zeros((2, 32), np.float32), np.zeros((4, 32), np.float32)
    with pytest.raises(S.SchedulerConfigError, match=r"row: expected shape \(12,\) or \(2, 12\), found \(3, 12\)"):
        S.apply_step(np.zeros((3, 12)), x, out, None, 4.0, None, True)
    with pytest.raises(S.SchedulerConfigError, match=r"guidance_scale: expected shape \(1,\) or \(2, 1\), found \(3,\)"):
        S.apply_step(np.zeros(12), x, out, None, np.ones(3), None, True)


def test_write_step_graph_is_atomic(tmp_path):
    path = write_step_graph("unet_inpaint_step", True, DIMS, tmp_path / "sub" / "unet_inpaint_step.onnx")
    assert os.listdir(path.parent) == ["unet_inpaint_step.onnx"]  # no temporary file left behind
    loaded = onnx.load(path)
    assert loaded.SerializeToString() == build_step_graph("unet_inpaint_step", True, DIMS).SerializeToString()
    props = {p.key: p.value for p in loaded.metadata_props}
    assert props["coefficient_columns"] == ",".join(COEFFICIENT_COLUMNS)


def test_unknown_step_graph():
    with pytest.raises(SpecError, match="name: expected one of .*found 'unet'"):
        build_step_graph("unet", True, DIMS)


def _bridge_case(name: str, batch: int, rng) -> tuple[dict, dict]:
    """Random feeds of bridge graph ``name`` and what the host path computes from them (its numpy)."""
    latent = (batch, 4, 2, 3)
    if name == "prior_embeds":
        feeds = {"latents": rng.standard_normal((batch, DIMS.clip_dim), dtype=np.float32) * 3,
                 "clip_std": (0.5 + rng.random((1, DIMS.clip_dim), dtype=np.float32)),
                 "clip_mean": rng.standard_normal((1, DIMS.clip_dim), dtype=np.float32)}
        return feeds, {"image_embeds": feeds["latents"] * feeds["clip_std"] + feeds["clip_mean"]}
    image_latents = rng.standard_normal(latent, dtype=np.float32) * 4
    if name == "img2img_start":
        strengths = [0.3, 0.75, 1.0][:batch] + [0.5] * max(batch - 3, 0)  # one row per request: its own strength
        rows = [[1.0, *S.img2img_noise_coefficients(s)] for s in strengths]
        noise = rng.standard_normal(latent, dtype=np.float32)
        expected = np.concatenate([S.img2img_add_noise(image_latents[i:i + 1] * np.float32(1.0), noise[i:i + 1], s)
                                   for i, s in enumerate(strengths)])
        return ({"image_latents": image_latents, "noise": noise, "coefficients": np.array(rows, np.float32)},
                {"latents": expected})
    keep = (rng.random((batch, 1, 2, 3)) > 0.5).astype(np.float32)
    latents = rng.standard_normal(latent, dtype=np.float32)
    conditioning = np.concatenate([image_latents * keep, keep], axis=1)
    return ({"image_latents": image_latents, "keep": keep, "latents": latents},
            {"conditioning": conditioning, "model_input": np.concatenate([latents, conditioning], axis=1)})


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("name", ["prior_embeds", "img2img_start", "inpaint_start"])
def test_bridge_graphs_equal_the_host_maths_bit_for_bit(name, batch):
    """Each bridge graph computes the host path's numpy (``image_embeds_of``, ``img2img_add_noise`` per
    row at its own strength, inpainting's conditioning and first network input) in the same order:
    ONNX Runtime on the CPU gives numpy's bits, at any batch (one symbolic graph)."""
    from kandinsky_trt.export.step_graphs import build_bridge_graph

    model = build_bridge_graph(name, DIMS)
    spec = resolve_graph(name, DIMS)
    assert [(i.name, tuple(d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim))
            for i in model.graph.input] == [(t.name, t.shape) for t in spec.inputs]
    assert {n.op_type for n in model.graph.node} <= ELEMENTWISE_OPS
    feeds, expected = _bridge_case(name, batch, np.random.default_rng(batch))
    got = dict(zip([o.name for o in model.graph.output], _session(model).run(None, feeds)))
    assert sorted(got) == sorted(expected)
    for output, array in expected.items():
        assert got[output].tobytes() == array.tobytes(), output
    with pytest.raises(SpecError, match="name: expected one of \\['img2img_start', 'inpaint_start', "
                                        "'prior_embeds'\\], found 'prior_step'"):
        build_bridge_graph("prior_step", DIMS)
