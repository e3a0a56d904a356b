"""The denoising loop on host buffers: ``network`` then its step graph, one coefficient row per step.

The same loop serves the prior (``prior`` + ``prior_step``) and the decoders (``unet`` /
``unet_inpaint`` + their step graphs). The step graph does classifier-free guidance and the
scheduler update and also prepares the next network input (the [uncond, cond] duplicate, plus the
inpaint conditioning), so the loop holds no model maths. The first network input is made by the
same graph with an identity row, so that logic exists once.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np

from kandinsky_trt.runtime.backends.base import NetworkSession
from kandinsky_trt.runtime.schedulers import SchedulerTable
from kandinsky_trt.runtime.spec import COEFFICIENT_COLUMNS

# x_next = x, nothing else: used once to build the first network input through the step graph.
_IDENTITY = dict.fromkeys(COEFFICIENT_COLUMNS, 0.0) | {"v": 1.0, "clip_min": -1.0, "clip_max": 1.0}
IDENTITY_ROW = np.array([_IDENTITY[c] for c in COEFFICIENT_COLUMNS], dtype=np.float32)

StepCallback = Callable[[int, int, np.ndarray], None]


@dataclass(frozen=True)
class LoopNetworks:
    network: NetworkSession  # prior | unet | unet_inpaint
    step: NetworkSession  # prior_step | unet_step | unet_inpaint_step
    sample_input: str  # the network input fed by the step graph's ``model_input``
    output: str  # the network output fed to the step graph's ``model_output``


@dataclass(frozen=True)
class LoopNames:
    """Which networks a loop runs, by manifest name (what a backend loads for it)."""

    network: str  # prior | unet | unet_inpaint
    step: str  # prior_step | unet_step | unet_inpaint_step
    sample_input: str  # the network input fed by the step graph's ``model_input``
    output: str  # the network output fed to the step graph's ``model_output``

    @classmethod
    def of(cls, nets: LoopNetworks) -> "LoopNames":
        return cls(nets.network.network.name, nets.step.network.name, nets.sample_input, nets.output)


PRIOR_LOOP = LoopNames("prior", "prior_step", "hidden_states", "predicted_image_embedding")
UNET_LOOP = LoopNames("unet", "unet_step", "sample", "noise_pred")
INPAINT_LOOP = LoopNames("unet_inpaint", "unet_inpaint_step", "sample", "noise_pred")


@dataclass(frozen=True)
class LoopInputs:
    """One batch-sized chunk: initial latents, the network's fixed inputs, the step graph's extras."""

    latents: np.ndarray
    conditioning: dict[str, np.ndarray]  # network inputs other than sample / timestep
    step_extras: dict[str, np.ndarray]  # e.g. ``conditioning`` of the inpaint step graph
    noise: np.ndarray | None  # (stochastic steps, *latents.shape)
    guidance_scale: float


def guided(guidance_scale: float) -> bool:
    """diffusers' rule (``do_classifier_free_guidance = guidance_scale > 1.0``), for the prior and decoders."""
    return guidance_scale > 1.0


def conditional_only(inputs: LoopInputs) -> LoopInputs:
    """The loop inputs without guidance on a cfg profile (``guidance_scale <= 1``).

    The networks' batch stays [uncond; cond] (static shapes), so both halves get the conditional
    inputs and the scale becomes 1: ``eps = u + 1 * (c - u)`` with ``u == c`` is the conditional
    prediction, which is what diffusers computes (it runs the conditional batch alone), whatever
    scale <= 1 was asked for. The step graph's inpaint ``conditioning`` is [cond; cond] already.
    """
    rows = len(inputs.latents)
    conditioning = {}
    for name, array in inputs.conditioning.items():
        if len(array) != 2 * rows:
            raise ValueError(f"conditioning {name}: expected {2 * rows} rows ([uncond; cond]), found {len(array)}")
        conditioning[name] = np.concatenate([array[rows:], array[rows:]])
    return replace(inputs, conditioning=conditioning, guidance_scale=1.0)


def denoise(nets: LoopNetworks, table: SchedulerTable, inputs: LoopInputs,
            callback: StepCallback | None = None) -> np.ndarray:
    """Run every row of ``table`` on one chunk and return the final latents."""
    latents = inputs.latents.astype(np.float32)
    x0_prev = np.zeros_like(latents)
    guidance = np.array([inputs.guidance_scale], dtype=np.float32)
    zeros = np.zeros_like(latents)

    def step(row: np.ndarray, model_output: np.ndarray, noise: np.ndarray) -> dict[str, np.ndarray]:
        feeds = {"latents": latents, "model_output": model_output, "coefficients": row, "noise": noise,
                 "guidance_scale": guidance, "x0_prev": x0_prev, **inputs.step_extras}
        return nets.step.run(feeds)

    output_shape = nets.step.network.tensor("model_output").shape
    model_input = step(IDENTITY_ROW, np.zeros(output_shape, np.float32), zeros)["model_input"]
    noise_index = 0
    for i, t in enumerate(table.timesteps):
        feeds = {nets.sample_input: model_input, "timestep": np.array([t], np.float32), **inputs.conditioning}
        model_output = nets.network.run(feeds)[nets.output]
        noise = zeros
        if table.stochastic[i]:
            noise = inputs.noise[noise_index].astype(np.float32)
            noise_index += 1
        result = step(table.coefficients[i], model_output, noise)
        latents, x0_prev, model_input = result["latents_next"], result["x0"], result["model_input"]
        if callback is not None:
            callback(i, int(t), latents)
    return latents
