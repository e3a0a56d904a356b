"""Scheduler coefficient tables (runtime/contract/schedulers.py) against diffusers' own schedulers, on CPU, no weights.

Each chain test runs a whole denoising loop twice from the same random latents: diffusers' ``step()``
(driven as the Kandinsky pipelines drive it, guidance included) and :func:`apply_step` on the table rows.
The "model" is ``0.5 * x + z_i`` (fixed random z per step, so errors feed back through the state) plus
uniform [-1, 1] learned-variance channels; noise of stochastic steps is drawn from a clone of the
generator diffusers draws from. Tolerance: max |ours - diffusers| / max |diffusers| <= 1e-5 over the
final latents. Measured worst over 2-100 steps, with and without guidance: DDIM 1.8e-6, DDPM 1.5e-6
(1000 steps), UnCLIP 1.4e-7, DPM-Solver++ 2M 7.5e-6 (see test_each_step_matches_diffusers for why).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from kandinsky_trt.runtime.contract import schedulers as S  # noqa: E402
from kandinsky_trt.runtime.contract.spec import COEFFICIENT_COLUMNS  # noqa: E402

REL_TOL = 1e-5
STEPS = (2, 7, 25, 50, 100)
COL = {name: i for i, name in enumerate(COEFFICIENT_COLUMNS)}

# kandinsky_map §2.2 (decoder) and §2.1 (prior); §2.3 for the DDPM alternative.
KANDINSKY_DDIM = {
    "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False, "set_alpha_to_one": False,
    "steps_offset": 1, "prediction_type": "epsilon", "thresholding": False,
}  # fmt: skip
KANDINSKY_UNCLIP = {
    "_class_name": "UnCLIPScheduler", "num_train_timesteps": 1000, "variance_type": "fixed_small_log",
    "prediction_type": "sample", "clip_sample": True, "clip_sample_range": 10.0, "beta_schedule": "squaredcos_cap_v2",
}  # fmt: skip
DDPM_LEARNED = {
    **KANDINSKY_DDIM, "_class_name": "DDPMScheduler", "variance_type": "learned_range",
    "clip_sample": True, "clip_sample_range": 2.0,
}  # fmt: skip
LATENT = (4, 8, 8)

CASES = {
    "ddim_kandinsky": (KANDINSKY_DDIM, LATENT, 0),
    "ddim_offset0_clip": ({**KANDINSKY_DDIM, "steps_offset": 0, "clip_sample": True}, LATENT, 0),
    "ddim_trailing_v": ({**KANDINSKY_DDIM, "timestep_spacing": "trailing", "prediction_type": "v_prediction",
                         "set_alpha_to_one": True, "clip_sample": True}, LATENT, 0),  # fmt: skip
    "ddim_linspace_sample_scaled": ({**KANDINSKY_DDIM, "timestep_spacing": "linspace", "prediction_type": "sample",
                                     "beta_schedule": "scaled_linear", "steps_offset": 0}, LATENT, 0),  # fmt: skip
    "ddim_trained_betas": ({**KANDINSKY_DDIM, "trained_betas": np.linspace(1e-4, 0.015, 1000).tolist()}, LATENT, 0),
    "ddpm_learned_range": (DDPM_LEARNED, LATENT, 4),
    "ddpm_fixed_small": ({**KANDINSKY_DDIM, "_class_name": "DDPMScheduler"}, LATENT, 0),
    "ddpm_fixed_small_log_v": ({**DDPM_LEARNED, "variance_type": "fixed_small_log", "prediction_type": "v_prediction",
                                "steps_offset": 0}, LATENT, 0),  # fmt: skip
    "unclip_prior": (KANDINSKY_UNCLIP, (32,), 0),
    "dpmpp2m_kandinsky": (S.fast_solver_config(KANDINSKY_DDIM), LATENT, 0),
    "dpmpp2m_leading_sigma_min": ({**S.fast_solver_config(KANDINSKY_DDIM), "timestep_spacing": "leading",
                                   "final_sigmas_type": "sigma_min"}, LATENT, 0),  # fmt: skip
    "dpmpp2m_trailing_v": ({**S.fast_solver_config(KANDINSKY_DDIM), "timestep_spacing": "trailing",
                            "prediction_type": "v_prediction"}, LATENT, 0),  # fmt: skip
}


def _diffusers_scheduler(config: dict, n: int):
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(n)
    return scheduler


def _guided_torch(out: torch.Tensor, channels: int, scale: float, keep_var: bool) -> torch.Tensor:
    """The pipelines' guidance (pipeline_kandinsky.py l.368-379 / prior l.510-515)."""
    if out.shape[1] == channels:  # the prior: no variance channels
        uncond, cond = out.chunk(2)
        return uncond + scale * (cond - uncond)
    eps, var = out.split(channels, dim=1)
    eps_u, eps_c = eps.chunk(2)
    _, var_c = var.chunk(2)
    guided = torch.cat([eps_u + scale * (eps_c - eps_u), var_c], dim=1)
    return guided if keep_var else guided[:, :channels]


def _model_outputs(rng, x_np: np.ndarray, x_torch: torch.Tensor, var_channels: int, cfg: bool, scale: float) -> tuple:
    """The synthetic network output ``0.5 * x + z`` (+ variance channels), as numpy and as the pipeline guides it."""
    x_net, x_net_torch = (np.concatenate([x_np] * 2), torch.cat([x_torch] * 2)) if cfg else (x_np, x_torch)
    z = rng.standard_normal(x_net.shape).astype(np.float32)
    var = rng.uniform(-1, 1, (x_net.shape[0], var_channels, *x_net.shape[2:])).astype(np.float32)
    model_np = np.concatenate([np.float32(0.5) * x_net + z, var], axis=1)
    model_torch = torch.cat([0.5 * x_net_torch + torch.from_numpy(z), torch.from_numpy(var)], dim=1)
    if cfg:
        model_torch = _guided_torch(model_torch, x_np.shape[1], scale, keep_var=var_channels > 0)
    return model_np, model_torch


def run_chain(config: dict, n: int, latent: tuple, var_channels: int, cfg: bool, table=None, resync=False) -> tuple:
    """Run both loops; return (relative max error, max |diffusers|) of the final latents.

    ``table`` overrides the full table (img2img). With ``resync`` each step starts from diffusers' latents and
    the error returned is the worst single step's, so per-row errors cannot hide behind the chain.
    """
    batch, scale = 2, 4.0
    table = S.scheduler_table(config, n) if table is None else table
    scheduler = _diffusers_scheduler(config, n)
    rng = np.random.default_rng(n)
    x_np = rng.standard_normal((batch, *latent)).astype(np.float32)
    x_torch, x0_prev = torch.from_numpy(x_np.copy()), np.zeros_like(x_np)
    generator, worst = torch.Generator().manual_seed(n), 0.0
    for i, t in enumerate(table.timesteps):
        model_np, model_torch = _model_outputs(rng, x_np, x_torch, var_channels, cfg, scale)
        kwargs, noise = {}, None
        if table.stochastic[i]:  # the same numbers diffusers is about to draw
            state = generator.get_state()
            noise = torch.randn(x_np.shape, generator=generator, dtype=torch.float32).numpy()
            generator.set_state(state)
            kwargs["generator"] = generator
        if config["_class_name"] == "UnCLIPScheduler":  # the prior pipeline's prev_timestep
            kwargs["prev_timestep"] = table.timesteps[i + 1] if i + 1 < len(table) else None
        x_torch = scheduler.step(model_torch, t, x_torch, **kwargs).prev_sample
        x_np, x0_prev = S.apply_step(table.coefficients[i], x_np, model_np, noise, scale, x0_prev, cfg)
        reference = x_torch.numpy()
        worst = max(worst, float(np.abs(x_np - reference).max() / np.abs(reference).max()))
        x_np = reference.copy() if resync else x_np
    final = float(np.abs(x_np - reference).max() / np.abs(reference).max())
    return (worst if resync else final), float(np.abs(reference).max())


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "nocfg"])
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_chain_matches_diffusers(case, n, cfg):
    config, latent, var_channels = CASES[case]
    assert np.array_equal(S.scheduler_table(config, n).timesteps, _diffusers_scheduler(config, n).timesteps.numpy())
    error, scale = run_chain(config, n, latent, var_channels, cfg)
    assert np.isfinite(scale) and scale > 0.1
    assert error <= REL_TOL, f"{case} n={n}: relative error {error:.3g} > {REL_TOL}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_step_matches_diffusers(case):
    """Every row on its own (100 steps, guidance 4), each step started from diffusers' latents.

    Tolerance 5e-6 relative (measured <= 1.4e-6), 1e-5 for DPM-Solver++ (measured <= 4.8e-6): torch's
    float32 sqrt/log (MKL/SLEEF) are not correctly rounded (1 ulp off for ~17% / ~8% of inputs on this
    build) while the tables use correctly rounded values, and DPM-Solver's h = lambda_t - lambda_s
    (~0.05, from lambdas ~2.5) turns that 1 ulp of lambda into ~5e-6 of its coefficients.
    """
    config, latent, var_channels = CASES[case]
    error, _ = run_chain(config, 100, latent, var_channels, True, resync=True)
    tolerance = 1e-5 if case.startswith("dpmpp") else 5e-6
    assert error <= tolerance, f"{case}: worst single-step relative error {error:.3g}"


@pytest.mark.parametrize("case", ["unclip_prior", "ddpm_learned_range", "ddim_offset0_clip"])
def test_chain_every_training_step(case):
    """1000 steps: UnCLIP takes its ``prev_timestep == t - 1`` branch (training betas) and DDPM steps t -> t-1."""
    config, latent, var_channels = CASES[case]
    config = {**config, "steps_offset": 0} if "steps_offset" in config else config  # offset 1 would reach t = 1000
    error, _ = run_chain(config, 1000, latent, var_channels, True)
    assert error <= REL_TOL


@pytest.mark.parametrize("config", [KANDINSKY_DDIM, S.fast_solver_config(KANDINSKY_DDIM)], ids=["ddim", "dpmpp2m"])
def test_single_step(config):
    table = S.scheduler_table(config, 1)
    assert table.timesteps.tolist() == _diffusers_scheduler(config, 1).timesteps.tolist()
    assert run_chain(config, 1, LATENT, 0, True)[0] <= REL_TOL


def test_alphas_cumprod_match_torch():
    """The numpy betas/cumprod reproduce torch's float32 linspace and cumprod (bit-exact on this build)."""
    from kandinsky_trt.runtime.contract import noise_schedules as ns

    for config in (KANDINSKY_DDIM, {**KANDINSKY_DDIM, "beta_schedule": "scaled_linear"}, KANDINSKY_UNCLIP):
        ours = ns.NoiseSchedule.from_config(S.resolve_config(config)[1]).alphas_cumprod
        theirs = _diffusers_scheduler(config, 10).alphas_cumprod.numpy()
        assert np.max(np.abs(ours - theirs) / theirs) <= 1e-7
    img2img = torch.cumprod(1.0 - torch.linspace(0.0001, 0.02, 1000, dtype=torch.float32), dim=0).numpy()
    assert np.max(np.abs(ns.img2img_alphas_cumprod() - img2img) / img2img) <= 1e-7


def test_table_shapes_and_flags():
    table = S.scheduler_table(KANDINSKY_UNCLIP, 25)
    assert table.timesteps.dtype == np.int64 and table.coefficients.dtype == np.float32
    assert table.coefficients.shape == (25, len(COEFFICIENT_COLUMNS)) and len(table) == 25
    assert table.stochastic.tolist() == [True] * 24 + [False]  # no noise at t = 0
    assert table.init_noise_sigma == 1.0 and table.kind == "UnCLIPScheduler"
    assert not S.scheduler_table(KANDINSKY_DDIM, 25).stochastic.any()
    dpm = S.scheduler_table(CASES["dpmpp2m_kandinsky"][0], 10)
    assert dpm.coefficients[0, COL["r"]] == 0 and dpm.coefficients[-1, COL["r"]] == 0  # first / lower-order final
    assert np.all(dpm.coefficients[1:-1, COL["r"]] != 0)
    with pytest.raises(ValueError):
        table.coefficients[0, 0] = 1.0  # read-only


@pytest.mark.parametrize("case", ["ddpm_learned_range", "unclip_prior", "dpmpp2m_kandinsky"])
def test_manifest_round_trip(case):
    table = S.scheduler_table(CASES[case][0], 25)
    text = json.dumps(table.to_manifest(), allow_nan=False)  # strict JSON, readable from C++
    back = S.SchedulerTable.from_manifest(json.loads(text))
    assert back.kind == table.kind and back.num_inference_steps == 25
    assert np.array_equal(back.timesteps, table.timesteps) and np.array_equal(back.stochastic, table.stochastic)
    assert np.array_equal(back.coefficients, table.coefficients)  # bit-exact float32 through decimal doubles
    assert back.config == table.config


def test_fast_solver_config_equals_from_config():
    ours = S.fast_solver_config(KANDINSKY_DDIM)
    ddim = diffusers.DDIMScheduler.from_config(KANDINSKY_DDIM)
    theirs = diffusers.DPMSolverMultistepScheduler.from_config(ddim.config)
    for key, value in ours.items():
        if not key.startswith("_"):
            assert theirs.config[key] == value, key
    assert ours["algorithm_type"] == "dpmsolver++" and ours["solver_order"] == 2


def _pipeline():
    from diffusers import KandinskyImg2ImgPipeline

    return KandinskyImg2ImgPipeline


@pytest.mark.parametrize("strength", [0.05, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("case", ["ddim_kandinsky", "dpmpp2m_kandinsky"])
def test_img2img_timesteps_and_tail_chain(case, strength):
    config, n = CASES[case][0], 50
    scheduler = _diffusers_scheduler(config, n)
    expected, expected_n = _pipeline().get_timesteps(SimpleNamespace(scheduler=scheduler), n, strength, "cpu")
    table = S.scheduler_table(config, n)
    timesteps, steps = S.img2img_timesteps(table.timesteps, n, strength)
    assert timesteps.tolist() == expected.tolist() and steps == expected_n
    tail, steps = S.img2img_timesteps(table, n, strength)
    assert tail.timesteps.tolist() == expected.tolist() and steps == expected_n and tail.coefficients[0, COL["r"]] == 0
    error, _ = run_chain(config, n, LATENT, 0, True, table=tail)  # diffusers restarts the multistep history too
    assert error <= REL_TOL


@pytest.mark.parametrize("strength", [0.2, 0.3, 0.75, 1.0])
def test_img2img_add_noise_matches_pipeline(strength):
    rng = np.random.default_rng(1)
    latents, noise = (rng.standard_normal((2, *LATENT)).astype(np.float32) for _ in range(2))
    t = torch.tensor([int(1000 * strength) - 2] * 2)
    expected = _pipeline().add_noise(None, torch.from_numpy(latents), torch.from_numpy(noise), t).numpy()
    ours = S.img2img_add_noise(latents, noise, strength)
    assert ours.dtype == np.float32 and np.max(np.abs(ours - expected)) <= 1e-6  # measured: 0 (bit-exact)


def test_defaults_equal_diffusers_signatures():
    for class_name in S.SCHEDULER_NAMES.values():
        params = inspect.signature(getattr(diffusers, class_name).__init__).parameters
        expected = {k: p.default for k, p in params.items() if k != "self"}
        assert {k: v for k, v in S.default_config(class_name).items() if k != "_class_name"} == expected
        S.scheduler_table(S.default_config(class_name), 10)  # every default config is supported


def test_runtime_module_is_torch_free():
    code = (
        "import sys, kandinsky_trt.runtime.contract.schedulers\n"
        "sys.exit(int(any(m in sys.modules for m in ('torch', 'diffusers'))))"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize(
    "config, steps, match",
    [
        (KANDINSKY_DDIM, 0, "num_inference_steps: expected an integer >= 1, found 0"),
        (KANDINSKY_DDIM, -3, "num_inference_steps"),
        (KANDINSKY_DDIM, 2.5, "num_inference_steps"),
        (KANDINSKY_DDIM, True, "num_inference_steps"),
        (KANDINSKY_DDIM, 1001, "at most num_train_timesteps=1000"),
        (KANDINSKY_DDIM, 1000, "distinct decreasing timesteps"),  # leading + steps_offset 1 reaches t = 1000
        (KANDINSKY_UNCLIP, 1, "UnCLIPScheduler expects an integer >= 2"),
        ({**KANDINSKY_DDIM, "_class_name": "EulerDiscreteScheduler"}, 10, r"_class_name.*EulerDiscreteScheduler"),
        ({"beta_start": 0.1}, 10, r"_class_name.*None"),
        ({**KANDINSKY_DDIM, "beta_start": "small"}, 10, "DDIMScheduler.beta_start: expected a positive number"),
        ({**KANDINSKY_DDIM, "steps_offset": -1}, 10, "steps_offset: expected a non-negative integer"),
        ({**KANDINSKY_DDIM, "trained_betas": [0.1, 0.2]}, 10, "trained_betas"),
        ({**KANDINSKY_DDIM, "trained_betas": ["a"] * 1000}, 10, r"trained_betas: expected num_train_timesteps=1000 numbers in \(0, 1\)"),
        ({**KANDINSKY_DDIM, "clip_sample": "yes"}, 10, "clip_sample: expected true or false"),
    ],
)
def test_bad_arguments(config, steps, match):
    with pytest.raises(S.SchedulerConfigError, match=match):
        S.scheduler_table(config, steps)


@pytest.mark.parametrize(
    "config, field",
    [
        ({**DDPM_LEARNED, "thresholding": True}, "thresholding"),
        ({**DDPM_LEARNED, "variance_type": "fixed_large"}, "variance_type"),
        ({**KANDINSKY_DDIM, "timestep_spacing": "karras"}, "timestep_spacing"),
        ({**KANDINSKY_DDIM, "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
        ({**KANDINSKY_DDIM, "beta_schedule": "sigmoid"}, "beta_schedule"),
        ({**KANDINSKY_UNCLIP, "variance_type": "learned_range"}, "variance_type"),
        ({**S.fast_solver_config(KANDINSKY_DDIM), "algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
        ({**S.fast_solver_config(KANDINSKY_DDIM), "solver_order": 3}, "solver_order"),
        ({**S.fast_solver_config(KANDINSKY_DDIM), "use_karras_sigmas": True}, "use_karras_sigmas"),
    ],
)
def test_unsupported_options(config, field):
    with pytest.raises(S.UnsupportedSchedulerOption, match=rf"\.{field}: expected one of .*, found") as info:
        S.scheduler_table(config, 10)
    assert isinstance(info.value, NotImplementedError)


def test_other_bad_arguments():
    with pytest.raises(S.SchedulerConfigError, match="config: expected a dict"):
        S.scheduler_table([("_class_name", "DDIMScheduler")], 10)
    with pytest.raises(S.SchedulerConfigError, match="DDIMScheduler or DDPMScheduler"):
        S.fast_solver_config(KANDINSKY_UNCLIP)
    with pytest.raises(S.SchedulerConfigError, match="strength: expected a number in"):
        S.img2img_timesteps(np.arange(10), 10, 1.5)
    with pytest.raises(S.SchedulerConfigError, match=r"strength: expected int\(1000 \* strength\) - 2"):
        S.img2img_add_noise(np.zeros(4), np.zeros(4), 0.001)
    with pytest.raises(S.SchedulerConfigError, match="noise: expected the latents' shape"):
        S.img2img_add_noise(np.zeros(4), np.zeros(3), 0.3)
    manifest = S.scheduler_table(KANDINSKY_DDIM, 2).to_manifest()
    with pytest.raises(S.SchedulerConfigError, match=r"table\['columns'\]"):
        S.SchedulerTable.from_manifest({**manifest, "columns": ["p"]})
    with pytest.raises(S.SchedulerConfigError, match=r"coefficients \(n, 12\)"):
        S.SchedulerTable.from_manifest({**manifest, "coefficients": [row[:8] for row in manifest["coefficients"]] * 3})
    with pytest.raises(S.SchedulerConfigError, match="malformed manifest entry"):
        S.SchedulerTable.from_manifest({k: v for k, v in manifest.items() if k != "timesteps"})
    learned_row = S.scheduler_table(DDPM_LEARNED, 5).coefficients[0]
    with pytest.raises(S.SchedulerConfigError, match="variance channels"):
        S.apply_step(learned_row, np.zeros((1, 32)), np.zeros((1, 32)), None, 1.0, None, False)
    with pytest.raises(S.SchedulerConfigError, match="name: expected one of"):
        S.default_config("euler")
    assert S.default_config("ddim")["_class_name"] == "DDIMScheduler"
