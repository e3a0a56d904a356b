"""Scheduler coefficient tables: a diffusers scheduler config + a step count -> one coefficient row per step.

The denoising loops run ``network`` then a tiny step graph (DESIGN §4) that computes classifier-free
guidance and the scheduler update from one row of ``spec.COEFFICIENT_COLUMNS``. This module turns a
``scheduler_config.json`` dict into those rows (numpy + stdlib, no torch: a deployed host computes or
reads them), serialises them for ``manifest.json``, and gives :func:`apply_step`, the numpy reference of
the step graph. The maths per scheduler lives in :mod:`kandinsky_trt.runtime.contract.noise_schedules`.

Supported: ``DDIMScheduler`` (the decoder default, eta = 0), ``DDPMScheduler``, ``UnCLIPScheduler`` (the
prior) and, opt-in, ``DPMSolverMultistepScheduler`` ("dpmsolver++", order <= 2; see
:func:`fast_solver_config`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Mapping

import numpy as np

from kandinsky_trt.runtime.contract import noise_schedules as ns
from kandinsky_trt.runtime.contract.spec import COEFFICIENT_COLUMNS, K
from kandinsky_trt.runtime.contract.errors import KandinskyTrtError, PipelineInputError

logger = logging.getLogger(__name__)

SCHEDULER_NAMES = MappingProxyType(
    {
        "ddim": "DDIMScheduler",
        "ddpm": "DDPMScheduler",
        "unclip": "UnCLIPScheduler",
        "dpmpp2m": "DPMSolverMultistepScheduler",
    }
)


class SchedulerConfigError(KandinskyTrtError, ValueError):
    """A scheduler config, step count or table that is malformed."""


class StepCountError(SchedulerConfigError, PipelineInputError):
    """A step count this scheduler config cannot space (the request's fault, not the config's)."""


class UnsupportedSchedulerOption(SchedulerConfigError, NotImplementedError):
    """A valid diffusers option that the coefficient-row layout does not implement."""


_BETAS = ("linear", "scaled_linear", "squaredcos_cap_v2")
_SPACINGS = ("leading", "trailing", "linspace")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "trained_betas": None, "thresholding": False, "dynamic_thresholding_ratio": 0.995,
           "sample_max_value": 1.0, "timestep_spacing": "leading", "steps_offset": 0, "prediction_type": "epsilon",
           "rescale_betas_zero_snr": False}  # fmt: skip
_SAMPLE_CLIP = {"clip_sample": True, "clip_sample_range": 1.0}

# Per class: diffusers' __init__ defaults (_DEFAULTS), and the values this module implements of the
# options the rows depend on (_CHOICES; anything else raises UnsupportedSchedulerOption).
_DEFAULTS = MappingProxyType({
    "DDIMScheduler": MappingProxyType({**_COMMON, **_SAMPLE_CLIP, "set_alpha_to_one": True}),
    "DDPMScheduler": MappingProxyType({**_COMMON, **_SAMPLE_CLIP, "variance_type": "fixed_small"}),
    "UnCLIPScheduler": MappingProxyType({
        "num_train_timesteps": 1000, "variance_type": "fixed_small_log", "clip_sample": True,
        "clip_sample_range": 1.0, "prediction_type": "epsilon", "beta_schedule": "squaredcos_cap_v2"}),
    "DPMSolverMultistepScheduler": MappingProxyType({
        **_COMMON, "solver_order": 2, "algorithm_type": "dpmsolver++", "solver_type": "midpoint",
        "lower_order_final": True, "euler_at_final": False, "use_karras_sigmas": False,
        "use_exponential_sigmas": False, "use_beta_sigmas": False, "use_lu_lambdas": False,
        "use_flow_sigmas": False, "flow_shift": 1.0, "final_sigmas_type": "zero",
        "lambda_min_clipped": -float("inf"), "variance_type": None, "timestep_spacing": "linspace",
        "use_dynamic_shifting": False, "time_shift_type": "exponential"}),
})  # fmt: skip
_NO = (False,)
_BASE_CHOICES = {"beta_schedule": _BETAS, "timestep_spacing": _SPACINGS, "prediction_type": _PREDICTIONS,
                 "thresholding": _NO, "rescale_betas_zero_snr": _NO}  # fmt: skip
_CHOICES = MappingProxyType({
    "DDIMScheduler": MappingProxyType(_BASE_CHOICES),
    "DDPMScheduler": MappingProxyType(
        {**_BASE_CHOICES, "variance_type": ("fixed_small", "fixed_small_log", "learned_range")}),
    "UnCLIPScheduler": MappingProxyType({"beta_schedule": ("squaredcos_cap_v2",),
        "variance_type": ("fixed_small_log",), "prediction_type": ("epsilon", "sample")}),
    "DPMSolverMultistepScheduler": MappingProxyType({
        **_BASE_CHOICES, "solver_order": (1, 2), "algorithm_type": ("dpmsolver++",), "solver_type": ("midpoint",),
        "use_karras_sigmas": _NO, "use_exponential_sigmas": _NO, "use_beta_sigmas": _NO, "use_lu_lambdas": _NO,
        "use_flow_sigmas": _NO, "use_dynamic_shifting": _NO, "final_sigmas_type": ("zero", "sigma_min"),
        "lambda_min_clipped": (-float("inf"),), "variance_type": (None,)}),
})  # fmt: skip


def default_config(name: str) -> dict:
    """diffusers' defaults of scheduler ``name`` (a CLI name of :data:`SCHEDULER_NAMES` or a class name)."""
    class_name = SCHEDULER_NAMES.get(name, name)
    if class_name not in _DEFAULTS:
        known = sorted(SCHEDULER_NAMES) + sorted(_DEFAULTS)
        raise SchedulerConfigError(f"name: expected one of {known}, found {name!r}")
    return {"_class_name": class_name, **_DEFAULTS[class_name]}


def resolve_config(config: Mapping) -> tuple[str, dict]:
    """Validate ``config`` (a ``scheduler_config.json`` dict) and return (class name, options with defaults).

    Raises:
        SchedulerConfigError: unknown ``_class_name`` or a malformed value.
        UnsupportedSchedulerOption: a diffusers option the tables do not implement (e.g. thresholding).
    """
    if not isinstance(config, Mapping):
        raise SchedulerConfigError(f"config: expected a dict (scheduler_config.json), found {type(config).__name__}")
    name = config.get("_class_name")
    if name not in _DEFAULTS:
        raise SchedulerConfigError(f"config['_class_name']: expected one of {sorted(_DEFAULTS)}, found {name!r}")
    defaults = _DEFAULTS[name]
    ignored = sorted(k for k in config if not k.startswith("_") and k not in defaults)
    if ignored:
        logger.debug("%s: ignoring options it does not take: %s", name, ignored)
    cfg = {**defaults, **{k: v for k, v in config.items() if k in defaults}}
    for key, allowed in _CHOICES[name].items():
        if cfg[key] not in allowed or isinstance(cfg[key], bool) != isinstance(allowed[0], bool):
            raise UnsupportedSchedulerOption(f"{name}.{key}: expected one of {list(allowed)}, found {cfg[key]!r}")
    _check_numbers(name, cfg)
    return name, cfg


def _check_numbers(name: str, cfg: Mapping) -> None:
    def fail(key: str, expected: str) -> None:
        raise SchedulerConfigError(f"{name}.{key}: expected {expected}, found {cfg[key]!r}")

    for key in ("num_train_timesteps", "steps_offset", "solver_order"):
        if key in cfg and (not isinstance(cfg[key], int) or isinstance(cfg[key], bool) or cfg[key] < 0):
            fail(key, "a non-negative integer")
    if cfg["num_train_timesteps"] < 2:
        fail("num_train_timesteps", "an integer >= 2")
    for key in ("beta_start", "beta_end", "clip_sample_range"):
        if key in cfg and (isinstance(cfg[key], bool) or not isinstance(cfg[key], (int, float)) or cfg[key] <= 0):
            fail(key, "a positive number")
    for key in ("clip_sample", "set_alpha_to_one", "lower_order_final", "euler_at_final"):
        if key in cfg and not isinstance(cfg[key], bool):
            fail(key, "true or false")
    betas = cfg.get("trained_betas")
    if betas is not None:
        try:
            values = np.asarray(betas, np.float64)
        except (TypeError, ValueError):
            values = np.full(1, np.nan)
        if values.shape != (cfg["num_train_timesteps"],) or not np.all((values > 0) & (values < 1)):
            fail("trained_betas", f"num_train_timesteps={cfg['num_train_timesteps']} numbers in (0, 1)")


def fast_solver_config(config: Mapping) -> dict:
    """The DPM-Solver++ 2M config for the decoder, as ``DPMSolverMultistepScheduler.from_config(ddim.config)``.

    Like diffusers' ``from_config``, the options the two classes share (betas, prediction type, steps
    offset, ...) are carried over only where ``config`` sets them; the rest are DPMSolverMultistep
    defaults (e.g. "linspace" spacing, final sigma 0, lower-order final steps) with
    ``algorithm_type="dpmsolver++"``, ``solver_order=2``. A learned ``variance_type`` is dropped: the
    solver uses only the noise channels.
    """
    name, _ = resolve_config(config)
    if name not in ("DDIMScheduler", "DDPMScheduler"):
        raise SchedulerConfigError(
            f"config['_class_name']: expected DDIMScheduler or DDPMScheduler (the decoder's), found {name!r}"
        )
    target = _DEFAULTS["DPMSolverMultistepScheduler"]
    shared = {k: v for k, v in config.items() if k in target and k != "variance_type"}
    out = {"_class_name": "DPMSolverMultistepScheduler", **shared, "algorithm_type": "dpmsolver++", "solver_order": 2}
    resolve_config(out)  # the DDIM options must also be ones the solver supports
    return out


@dataclass(frozen=True, eq=False)
class SchedulerTable:
    """Per-step coefficient rows of one scheduler at one step count.

    Attributes:
        kind: the diffusers class name (``DDIMScheduler``, ...).
        timesteps: (n,) int64, the model's timestep at each step (as diffusers' ``scheduler.timesteps``).
        coefficients: (n, K) float32, columns ``spec.COEFFICIENT_COLUMNS``.
        stochastic: (n,) bool, whether the step adds ``std * noise`` (draw noise only for those).
        init_noise_sigma: scale of the initial latents (1.0 for every supported scheduler).
        num_inference_steps: the step count the table was built for (img2img runs only its tail).
        config: the scheduler config as given (plain JSON).
    """

    kind: str
    timesteps: np.ndarray
    coefficients: np.ndarray
    stochastic: np.ndarray
    init_noise_sigma: float = 1.0
    num_inference_steps: int = 0
    config: Mapping = field(default_factory=dict)

    def __post_init__(self) -> None:
        arrays = {"timesteps": np.int64, "coefficients": np.float32, "stochastic": np.bool_}
        for key, dtype in arrays.items():
            value = np.array(getattr(self, key), dtype=dtype)
            value.setflags(write=False)
            object.__setattr__(self, key, value)
        n = self.timesteps.shape[0] if self.timesteps.ndim == 1 else -1
        if self.coefficients.shape != (n, K) or self.stochastic.shape != (n,):
            raise SchedulerConfigError(
                f"table: expected timesteps (n,), coefficients (n, {K}), stochastic (n,), found "
                f"{self.timesteps.shape}, {self.coefficients.shape}, {self.stochastic.shape}"
            )

    def __len__(self) -> int:
        return int(self.timesteps.shape[0])

    def to_manifest(self) -> dict:
        """Plain JSON: lists of numbers (float32 values written as exact decimal doubles)."""
        return {
            "kind": self.kind,
            "num_inference_steps": int(self.num_inference_steps),
            "init_noise_sigma": float(self.init_noise_sigma),
            "columns": list(COEFFICIENT_COLUMNS),
            "timesteps": [int(t) for t in self.timesteps],
            "stochastic": [bool(s) for s in self.stochastic],
            "coefficients": [[float(c) for c in row] for row in self.coefficients],
            "config": dict(self.config),
        }

    @classmethod
    def from_manifest(cls, data: Mapping) -> "SchedulerTable":
        """Inverse of :meth:`to_manifest`; checks the column layout against this runtime's spec."""
        if list(data.get("columns", ())) != list(COEFFICIENT_COLUMNS):
            raise SchedulerConfigError(
                f"table['columns']: expected {list(COEFFICIENT_COLUMNS)}, found {data.get('columns')!r}"
            )
        try:
            coefficients = np.array(data["coefficients"], np.float32)  # shape checked in __post_init__
            return cls(
                kind=data["kind"],
                timesteps=np.array(data["timesteps"], np.int64),
                coefficients=coefficients.reshape(0, K) if coefficients.size == 0 else coefficients,
                stochastic=np.array(data["stochastic"], np.bool_),
                init_noise_sigma=float(data["init_noise_sigma"]),
                num_inference_steps=int(data["num_inference_steps"]),
                config=dict(data.get("config", {})),
            )
        except (KeyError, ValueError, TypeError) as err:
            raise SchedulerConfigError(f"table: malformed manifest entry ({err})") from err


def _check_steps(name: str, cfg: Mapping, num_inference_steps: object) -> int:
    n = num_inference_steps
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise StepCountError(f"num_inference_steps: expected an integer >= 1, found {n!r}")
    if name == "UnCLIPScheduler" and n < 2:
        raise StepCountError(f"num_inference_steps: UnCLIPScheduler expects an integer >= 2, found {n}")
    if n > cfg["num_train_timesteps"]:
        raise StepCountError(
            f"num_inference_steps: expected at most num_train_timesteps={cfg['num_train_timesteps']}, found {n}"
        )
    return int(n)


def _preview(values: np.ndarray) -> str:
    items = values.tolist()
    return str(items) if len(items) <= 8 else f"{str(items[:4])[:-1]}, ..., {str(items[-2:])[1:]}"


def _timesteps(name: str, cfg: Mapping, n: int) -> np.ndarray:
    if name == "UnCLIPScheduler":
        timesteps = ns.unclip_timesteps(cfg, n)
    elif name == "DPMSolverMultistepScheduler":
        timesteps = ns.dpm_timesteps(cfg, n)
    else:
        timesteps = ns.spaced_timesteps(cfg, n)
    train = cfg["num_train_timesteps"]
    if timesteps.size == 0 or timesteps.min() < 0 or timesteps.max() >= train or np.any(np.diff(timesteps) >= 0):
        raise StepCountError(
            f"num_inference_steps={n} with {name} spacing {cfg.get('timestep_spacing', 'karlo')!r} and "
            f"steps_offset={cfg.get('steps_offset', 0)}: expected distinct decreasing timesteps in "
            f"[0, {train}), found {_preview(timesteps)}"
        )
    return timesteps


def scheduler_table(config: Mapping, num_inference_steps: int) -> SchedulerTable:
    """Coefficient rows of the scheduler ``config`` (a ``scheduler_config.json`` dict) for ``num_inference_steps``.

    Raises:
        SchedulerConfigError: malformed config or step count; UnsupportedSchedulerOption: see :func:`resolve_config`.
    """
    name, cfg = resolve_config(config)
    n = _check_steps(name, cfg, num_inference_steps)
    timesteps = _timesteps(name, cfg, n)
    sched = ns.NoiseSchedule.from_config(cfg)
    if name == "DDIMScheduler":
        rows, stochastic = ns.ddim_rows(cfg, sched, timesteps, n), np.zeros(len(timesteps), bool)
    elif name == "DDPMScheduler":
        rows, stochastic = ns.ddpm_rows(cfg, sched, timesteps), timesteps > 0
    elif name == "UnCLIPScheduler":
        rows, stochastic = ns.unclip_rows(cfg, sched, timesteps), timesteps > 0
    else:
        rows, stochastic = ns.dpm_rows(cfg, sched, timesteps), np.zeros(len(timesteps), bool)
    return SchedulerTable(name, timesteps, rows.astype(np.float32), stochastic, 1.0, n, dict(config))


def _per_row(values, name: str, rows: int, width: int, rank: int) -> np.ndarray:
    """``values`` (one ``(width,)`` row for every latents row, or ``(rows, width)``) as ``(rows, width, 1...)``."""
    array = np.asarray(values, np.float32)
    if array.shape == (width,) or (width == 1 and array.ndim == 0):
        array = np.broadcast_to(array.reshape(width), (rows, width))
    elif width == 1 and array.shape == (rows,):
        array = array.reshape(rows, 1)
    if array.shape != (rows, width):
        raise SchedulerConfigError(f"{name}: expected shape ({width},) or ({rows}, {width}), found {array.shape}")
    return array.reshape((rows, width) + (1,) * (rank - 2))


def apply_step(row, latents, model_output, noise, guidance_scale, x0_prev, cfg: bool):  # noqa: PLR0913
    """Numpy reference of a step graph (guidance + update), float32 in the graph's operation order.

    The arguments mirror the step graph's inputs one for one (``spec.STEP_NETWORKS``), per row: ``row``
    is the coefficient rows ``(B, K)`` (one per latents row) or one ``(K,)`` row for every latents row,
    ``guidance_scale`` is ``(B, 1)`` / ``(B,)`` or one number. With ``cfg`` the model output is [uncond;
    cond] along the batch and eps = u + g*(c - u) on the latent channels, row b with row b's scale;
    extra channels (the UNet's learned variance) are taken from the cond half. Without variance
    channels (the prior) the ``learned`` term is absent, so such rows must have ``learned`` = 0.
    ``noise`` / ``x0_prev`` may be None (zeros). Row b's result is what a one-row call with row b's
    values gives, bit for bit. Returns (latents_next, x0).
    """
    x = np.asarray(latents, np.float32)
    rows = _per_row(row, "row", x.shape[0], K, x.ndim)
    c = {name: rows[:, i:i + 1] for i, name in enumerate(COEFFICIENT_COLUMNS)}
    out = np.asarray(model_output, np.float32)
    channels = x.shape[1]
    if cfg:
        g = _per_row(guidance_scale, "guidance_scale", x.shape[0], 1, x.ndim)
        uncond, cond = np.split(out, 2, axis=0)
        eps = uncond[:, :channels] + g * (cond[:, :channels] - uncond[:, :channels])
        var = cond[:, channels:]
    else:
        eps, var = out[:, :channels], out[:, channels:]
    x0 = np.minimum(np.maximum(c["p"] * x + c["q"] * eps, c["clip_min"]), c["clip_max"])
    if var.shape[1]:
        frac = (var + np.float32(1.0)) * np.float32(0.5)
        log_var = c["log_var_min"] + frac * (c["log_var_max"] - c["log_var_min"])
        std = c["s"] + c["learned"] * np.exp(np.float32(0.5) * log_var)
    elif np.any(c["learned"] != 0):
        raise SchedulerConfigError("row: a learned-variance row needs variance channels in model_output, found none")
    else:
        std = c["s"]
    noise = np.zeros_like(x) if noise is None else np.asarray(noise, np.float32)
    x0_prev = np.zeros_like(x) if x0_prev is None else np.asarray(x0_prev, np.float32)
    x_next = c["u"] * x0 + c["v"] * x + c["w"] * eps + c["r"] * x0_prev + std * noise
    return x_next.astype(np.float32), x0.astype(np.float32)


def _check_strength(strength: float) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= strength <= 1.0:
        raise SchedulerConfigError(f"strength: expected a number in [0, 1], found {strength!r}")
    return float(strength)


def img2img_timesteps(table_or_timesteps, num_inference_steps: int, strength: float):
    """diffusers' ``get_timesteps``: the tail of the schedule that img2img runs, and its length.

    ``init = min(int(steps * strength), steps)``, ``t_start = steps - init``. Given a
    :class:`SchedulerTable`, returns the table's tail; its first row starts without history (the solver's
    first step is first order, as diffusers' multistep counter restarts), i.e. ``u += r; r = 0``.
    """
    strength = _check_strength(strength)
    if not isinstance(num_inference_steps, (int, np.integer)) or num_inference_steps < 1:
        raise SchedulerConfigError(f"num_inference_steps: expected an integer >= 1, found {num_inference_steps!r}")
    init = min(int(num_inference_steps * strength), num_inference_steps)
    t_start = max(num_inference_steps - init, 0)
    if not isinstance(table_or_timesteps, SchedulerTable):
        return np.asarray(table_or_timesteps, np.int64)[t_start:], num_inference_steps - t_start
    table = table_or_timesteps
    rows = table.coefficients[t_start:].copy()
    if len(rows):
        u, r = ns.COL["u"], ns.COL["r"]
        rows[0, u], rows[0, r] = rows[0, u] + rows[0, r], 0.0
    tail = SchedulerTable(table.kind, table.timesteps[t_start:], rows, table.stochastic[t_start:],
                          table.init_noise_sigma, table.num_inference_steps, table.config)  # fmt: skip
    return tail, num_inference_steps - t_start


def img2img_noise_coefficients(strength: float, num_train_timesteps: int = 1000) -> tuple[np.float32, np.float32]:
    """``(sqrt(ab[t]), sqrt(1 - ab[t]))`` of :func:`img2img_add_noise` at ``strength``, float32 (the
    ``img2img_start`` bridge graph takes them per row)."""
    strength = _check_strength(strength)
    t = int(num_train_timesteps * strength) - 2
    if not 0 <= t < ns.IMG2IMG_TRAIN_STEPS:
        raise SchedulerConfigError(
            f"strength: expected int({num_train_timesteps} * strength) - 2 in [0, {ns.IMG2IMG_TRAIN_STEPS}) "
            f"(the noising timestep), found {t} for strength={strength}"
        )
    ac = ns.img2img_alphas_cumprod()[t]
    return np.float32(np.sqrt(ac)), np.float32(np.sqrt(np.float32(1.0) - ac))


def img2img_add_noise(latents, noise, strength: float, num_train_timesteps: int = 1000) -> np.ndarray:
    """Kandinsky img2img's own q_sample: ``sqrt(ab[t]) x + sqrt(1 - ab[t]) noise`` at ``t = int(T*strength) - 2``.

    ``ab`` is the fixed ``linspace(1e-4, 0.02, 1000)`` schedule, not the scheduler's (kandinsky_map §1.4.6);
    ``T`` is the scheduler's ``num_train_timesteps``. The caller multiplies the latents by
    ``init_noise_sigma`` first, as the pipeline does (1.0 for every supported scheduler).
    """
    signal, spread = img2img_noise_coefficients(strength, num_train_timesteps)
    x, eps = np.asarray(latents, np.float32), np.asarray(noise, np.float32)
    if x.shape != eps.shape:
        raise SchedulerConfigError(f"noise: expected the latents' shape {x.shape}, found {eps.shape}")
    return (signal * x + spread * eps).astype(np.float32)
