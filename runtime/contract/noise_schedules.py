"""Schedule maths of the supported diffusers schedulers, in numpy: betas, timesteps, coefficient rows.

:mod:`kandinsky_trt.runtime.contract.schedulers` validates a scheduler config and calls into this module; here every
config is assumed valid and complete (defaults filled in).

Each builder returns float64 rows in the layout of ``spec.COEFFICIENT_COLUMNS``::

    x0     = clip(p*x + q*eps, clip_min, clip_max)
    std    = s + learned * exp(0.5 * (log_var_min + (var + 1) / 2 * (log_var_max - log_var_min)))
    x_next = u*x0 + v*x + w*eps + r*x0_prev + std*noise

Precision: diffusers keeps ``alphas_cumprod`` and every per-step scalar as float32 tensors, so each scalar
that diffusers materialises is computed here with the same float32 operations in the same order; scalars
that only exist in this layout (e.g. ``q = -sqrt(1-a)/sqrt(a)``) are combined from those float32 values in
float64 and rounded once when the table is cast to float32. torch evaluates log/exp of those 0-d tensors
with the C library's correctly rounded ``logf``/``expf``, whereas numpy's float32 SIMD loops may be 1 ulp
off, which DPM-Solver's lambda differences amplify ~1e5 times: :func:`log32`/:func:`exp32` round the float64
result instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

import numpy as np

from kandinsky_trt.runtime.contract.spec import COEFFICIENT_COLUMNS

F32 = np.float32
F32_MAX = float(np.finfo(np.float32).max)  # "no clipping": finite so the table stays plain JSON
COL = MappingProxyType({name: i for i, name in enumerate(COEFFICIENT_COLUMNS)})

# Kandinsky's img2img noising schedule (``KandinskyImg2ImgPipeline.add_noise``), independent of the scheduler.
IMG2IMG_BETA_START, IMG2IMG_BETA_END, IMG2IMG_TRAIN_STEPS = 0.0001, 0.02, 1000


def log32(x: np.ndarray) -> np.ndarray:
    """float32 log, correctly rounded (as C ``logf``)."""
    return np.log(np.asarray(x, np.float64)).astype(F32)


def exp32(x: np.ndarray) -> np.ndarray:
    """float32 exp, correctly rounded (as C ``expf``)."""
    return np.exp(np.asarray(x, np.float64)).astype(F32)


def torch_linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """``torch.linspace(start, end, steps, dtype=torch.float32)`` on CPU, bit for bit.

    ATen fills the first half as ``start + step*i`` and the second as ``end - step*(steps-1-i)`` with a
    float32 ``step``; the compiler contracts each into one fused multiply-add, emulated here in float64
    (the product of a float32 and a small integer is exact in float64).
    """
    start32, end32 = F32(start), F32(end)
    if steps == 1:
        return np.array([start32], F32)
    step = F32(end32 - start32) / F32(steps - 1)
    i = np.arange(steps)
    low = np.float64(start32) + np.float64(step) * i
    high = np.float64(end32) - np.float64(step) * (steps - 1 - i)
    return np.where(i < steps // 2, low, high).astype(F32)


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """``betas_for_alpha_bar`` ("squaredcos_cap_v2"): Python float64 maths, then float32."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return np.array([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)], F32)


@dataclass(frozen=True)
class NoiseSchedule:
    """The training-time schedule of a scheduler config (float32, as diffusers holds it)."""

    betas: np.ndarray
    alphas: np.ndarray
    alphas_cumprod: np.ndarray

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> "NoiseSchedule":
        alphas = (F32(1.0) - betas).astype(F32)
        # torch.cumprod on CPU accumulates float32 in double and rounds each output.
        return cls(betas, alphas, np.cumprod(alphas.astype(np.float64)).astype(F32))

    @classmethod
    def from_config(cls, cfg: Mapping) -> "NoiseSchedule":
        n, schedule = cfg["num_train_timesteps"], cfg["beta_schedule"]
        if cfg.get("trained_betas") is not None:
            betas = np.asarray(cfg["trained_betas"], np.float64).astype(F32)
        elif schedule == "linear":
            betas = torch_linspace_f32(cfg["beta_start"], cfg["beta_end"], n)
        elif schedule == "scaled_linear":
            lin = torch_linspace_f32(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n)
            betas = (lin * lin).astype(F32)
        else:  # "squaredcos_cap_v2", the only other schedule the config check lets through
            betas = cosine_betas(n)
        return cls.from_betas(betas)


def img2img_alphas_cumprod() -> np.ndarray:
    """The fixed ``linspace(1e-4, 0.02, 1000)`` schedule Kandinsky img2img noises its init latents with."""
    betas = torch_linspace_f32(IMG2IMG_BETA_START, IMG2IMG_BETA_END, IMG2IMG_TRAIN_STEPS)
    return NoiseSchedule.from_betas(betas).alphas_cumprod


# ------------------------------------------------------------------------------------------ timesteps


def spaced_timesteps(cfg: Mapping, n: int) -> np.ndarray:
    """DDIM/DDPM ``set_timesteps``: "linspace", "leading" (+ steps_offset) or "trailing" spacing."""
    train, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, train - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (train // n)).round()[::-1].astype(np.int64) + cfg["steps_offset"]
    return np.round(np.arange(train, 0, -train / n)).astype(np.int64) - 1


def unclip_timesteps(cfg: Mapping, n: int) -> np.ndarray:
    """UnCLIP (karlo) spacing: ``round(arange(n) * (T-1)/(n-1))`` reversed; always ends at 0."""
    ratio = (cfg["num_train_timesteps"] - 1) / (n - 1)
    return (np.arange(0, n) * ratio).round()[::-1].astype(np.int64)


def dpm_timesteps(cfg: Mapping, n: int) -> np.ndarray:
    """DPMSolverMultistep ``set_timesteps`` (lambda_min_clipped = -inf, so the last timestep is T)."""
    last, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
    if spacing == "leading":
        ratio = last // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
    return np.arange(last, 0, -cfg["num_train_timesteps"] / n).round().astype(np.int64) - 1


# ---------------------------------------------------------------------------------- coefficient rows


def blank_rows(n: int) -> np.ndarray:
    """Rows that leave every term off: no clipping, no noise, ``log_var_*`` = 0 so exp() stays finite."""
    rows = np.zeros((n, len(COEFFICIENT_COLUMNS)), np.float64)
    rows[:, COL["clip_min"]], rows[:, COL["clip_max"]] = -F32_MAX, F32_MAX
    return rows


def _set_x0(rows: np.ndarray, prediction_type: str, sqrt_a: np.ndarray, sqrt_b: np.ndarray) -> tuple:
    """Fill p, q (x0 from x and the model output); return (ex, em): the predicted eps = ex*x + em*out."""
    sa, sb = sqrt_a.astype(np.float64), sqrt_b.astype(np.float64)
    if prediction_type == "epsilon":  # x0 = (x - sqrt(1-a) eps) / sqrt(a)
        rows[:, COL["p"]], rows[:, COL["q"]] = 1.0 / sa, -sb / sa
        return np.zeros_like(sa), np.ones_like(sa)
    if prediction_type == "sample":  # x0 = out;  eps = (x - sqrt(a) x0) / sqrt(1-a)
        rows[:, COL["p"]], rows[:, COL["q"]] = 0.0, 1.0
        return 1.0 / sb, -sa / sb
    rows[:, COL["p"]], rows[:, COL["q"]] = sa, -sb  # v_prediction: x0 = sqrt(a) x - sqrt(1-a) v
    return sb, sa


def _set_clip(rows: np.ndarray, cfg: Mapping) -> None:
    if cfg.get("clip_sample"):
        rows[:, COL["clip_min"]], rows[:, COL["clip_max"]] = -cfg["clip_sample_range"], cfg["clip_sample_range"]


def _next_timesteps(timesteps: np.ndarray) -> np.ndarray:
    """The pipelines' / DDPM's "previous" timestep: the next one in the list, -1 after the last."""
    return np.append(timesteps[1:], -1)


def ddim_rows(cfg: Mapping, sched: NoiseSchedule, timesteps: np.ndarray, n: int) -> np.ndarray:
    """DDIM with eta = 0 (the pipelines never pass eta): deterministic, x_prev = sqrt(a_p) x0 + sqrt(1-a_p) eps."""
    ac = sched.alphas_cumprod
    final = F32(1.0) if cfg["set_alpha_to_one"] else ac[0]
    prev = timesteps - cfg["num_train_timesteps"] // n
    a_t = ac[timesteps]
    a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], final).astype(F32)
    rows = blank_rows(len(timesteps))
    ex, em = _set_x0(rows, cfg["prediction_type"], np.sqrt(a_t), np.sqrt(F32(1.0) - a_t))
    _set_clip(rows, cfg)
    direction = np.sqrt(F32(1.0) - a_p - F32(0.0)).astype(np.float64)  # (1 - a_p - std^2) ** 0.5, std = 0
    rows[:, COL["u"]] = np.sqrt(a_p)
    rows[:, COL["v"]], rows[:, COL["w"]] = direction * ex, direction * em
    return rows


def _posterior(a_t: np.ndarray, a_p: np.ndarray, beta: np.ndarray, alpha: np.ndarray) -> tuple:
    """DDPM/UnCLIP posterior mean coefficients (DDPM paper eq. 7) and variance, float32 as diffusers."""
    b_t, b_p = F32(1.0) - a_t, F32(1.0) - a_p
    coef_x0 = (np.sqrt(a_p) * beta) / b_t
    coef_x = np.sqrt(alpha) * b_p / b_t
    variance = np.maximum(b_p / b_t * beta, F32(1e-20))
    return coef_x0.astype(F32), coef_x.astype(F32), variance.astype(F32)


def ddpm_rows(cfg: Mapping, sched: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """DDPM ancestral step; noise on every step with t > 0 (fixed_small, fixed_small_log or learned_range)."""
    ac = sched.alphas_cumprod
    prev = _next_timesteps(timesteps)
    a_t = ac[timesteps]
    a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], F32(1.0)).astype(F32)
    alpha = (a_t / a_p).astype(F32)
    beta = (F32(1.0) - alpha).astype(F32)
    rows = blank_rows(len(timesteps))
    _set_x0(rows, cfg["prediction_type"], np.sqrt(a_t), np.sqrt(F32(1.0) - a_t))
    _set_clip(rows, cfg)
    rows[:, COL["u"]], rows[:, COL["v"]], variance = _posterior(a_t, a_p, beta, alpha)
    noisy = timesteps > 0
    kind = cfg["variance_type"]
    if kind == "fixed_small":
        rows[noisy, COL["s"]] = np.sqrt(variance)[noisy]
    elif kind == "fixed_small_log":
        rows[noisy, COL["s"]] = exp32(F32(0.5) * log32(variance))[noisy]
    else:  # learned_range: log-variance interpolated by the model's cond variance channels
        rows[noisy, COL["learned"]] = 1.0
        rows[noisy, COL["log_var_min"]] = log32(variance)[noisy]
        rows[noisy, COL["log_var_max"]] = log32(beta)[noisy]
    return rows


def unclip_rows(cfg: Mapping, sched: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """UnCLIP as the prior pipeline drives it: ``prev_timestep`` = next timestep (None -> t-1 at the end)."""
    ac = sched.alphas_cumprod
    prev = _next_timesteps(timesteps)
    prev[-1] = timesteps[-1] - 1
    a_t = ac[timesteps]
    a_p = np.where(prev >= 0, ac[np.maximum(prev, 0)], F32(1.0)).astype(F32)
    adjacent = prev == timesteps - 1  # then diffusers uses the training betas/alphas directly
    beta = np.where(adjacent, sched.betas[timesteps], F32(1.0) - a_t / a_p).astype(F32)
    alpha = np.where(adjacent, sched.alphas[timesteps], F32(1.0) - beta).astype(F32)
    rows = blank_rows(len(timesteps))
    _set_x0(rows, cfg["prediction_type"], np.sqrt(a_t), np.sqrt(F32(1.0) - a_t))
    _set_clip(rows, cfg)
    rows[:, COL["u"]], rows[:, COL["v"]], variance = _posterior(a_t, a_p, beta, alpha)
    noisy = timesteps > 0
    rows[noisy, COL["s"]] = exp32(F32(0.5) * log32(variance))[noisy]  # fixed_small_log
    return rows


def _dpm_sigmas(cfg: Mapping, sched: NoiseSchedule, timesteps: np.ndarray) -> tuple:
    """(alpha_t, sigma_t, lambda_t) at every timestep plus the final sigma, float32 as diffusers."""
    ac = sched.alphas_cumprod
    table = np.sqrt((F32(1.0) - ac) / ac).astype(F32)
    last = table[0] if cfg["final_sigmas_type"] == "sigma_min" else F32(0.0)
    sigmas = np.append(table[timesteps], last).astype(F32)
    alpha = (F32(1.0) / np.sqrt(sigmas * sigmas + F32(1.0))).astype(F32)
    sigma = (sigmas * alpha).astype(F32)
    with np.errstate(divide="ignore"):  # sigma = 0 at the end: lambda = +inf, exp(-h) = 0 (as in torch)
        lam = (log32(alpha) - log32(sigma)).astype(F32)
    return alpha, sigma, lam


def dpm_rows(cfg: Mapping, sched: NoiseSchedule, timesteps: np.ndarray) -> np.ndarray:
    """DPM-Solver++ (midpoint) of order 1 or 2 on the data prediction x0; column r weights x0 of the last step."""
    alpha, sigma, lam = _dpm_sigmas(cfg, sched, timesteps)
    n = len(timesteps)
    rows = blank_rows(n)
    _set_x0(rows, cfg["prediction_type"], alpha[:-1], sigma[:-1])
    with np.errstate(divide="ignore", invalid="ignore"):
        h = (lam[1:] - lam[:-1]).astype(F32)
        big_a = (alpha[1:] * (exp32(-h) - F32(1.0))).astype(np.float64)  # alpha_t (e^{-h} - 1)
        rows[:, COL["v"]] = (sigma[1:] / sigma[:-1]).astype(F32)
    final_first_order = cfg["euler_at_final"] or cfg["final_sigmas_type"] == "zero" or (
        cfg["lower_order_final"] and n < 15
    )
    for i in range(n):
        first_order = cfg["solver_order"] == 1 or i == 0 or (i == n - 1 and final_first_order)
        if first_order:  # x_t = (sigma_t/sigma_s) x - A x0
            rows[i, COL["u"]] = -big_a[i]
            continue
        r0 = F32(lam[i] - lam[i - 1]) / h[i]  # h_0 / h
        half_a_d1 = 0.5 * big_a[i] * np.float64(F32(1.0) / F32(r0))  # D1 = (m0 - m1) / r0
        rows[i, COL["u"]], rows[i, COL["r"]] = -big_a[i] - half_a_d1, half_a_d1
    return rows
