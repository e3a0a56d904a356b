"""The denoising loops, declared once: which network and step graph form each, and how they are wired.

Every loop strategy (``runtime/loops``), the pipelines and the C++ host read the wiring from here.
Standard library only, like :mod:`~kandinsky_trt.runtime.contract.spec`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kandinsky_trt.runtime.contract.spec import STEP, StepTensors


@dataclass(frozen=True)
class LoopSpec:
    """How a network and its step graph form one denoising loop (DESIGN §4).

    Per step: ``network`` reads ``sample_input`` (written by the step graph's ``model_input``), the
    per-step ``timestep`` row and its fixed conditioning, and writes ``output`` (read by the step
    graph's ``model_output``); ``step`` reads its per-step ``coefficients`` and ``noise`` rows, and
    its outputs :attr:`carried` back into its inputs. Any other input is fixed for a chunk.
    """

    network: str  # prior | unet | unet_inpaint
    step: str  # prior_step | unet_step | unet_inpaint_step
    sample_input: str  # the network input fed by the step graph's model_input
    output: str  # the network output fed back to the step graph's model_output
    timestep: str = "timestep"  # the network's per-step row
    io: StepTensors = STEP

    @property
    def carried(self) -> tuple[tuple[str, str], ...]:
        """(step output, step input) pairs carried to the next step: the latents first, then x0."""
        return (self.io.latents_next, self.io.latents), (self.io.x0, self.io.x0_prev)

    @property
    def links(self) -> tuple[tuple[str, str], ...]:
        """(step tensor, network tensor) pairs that are one buffer on a device."""
        return (self.io.model_output, self.output), (self.io.model_input, self.sample_input)

    @property
    def network_fed(self) -> tuple[str, ...]:
        """Network inputs the loop writes; the others are the chunk's conditioning."""
        return self.sample_input, self.timestep

    @property
    def step_fed(self) -> tuple[str, ...]:
        """Step-graph inputs the loop writes; the others are the chunk's step extras."""
        io = self.io
        return io.latents, io.model_output, io.coefficients, io.noise, io.guidance_scale, io.x0_prev


PRIOR_LOOP = LoopSpec("prior", "prior_step", "hidden_states", "predicted_image_embedding")
UNET_LOOP = LoopSpec("unet", "unet_step", "sample", "noise_pred")
INPAINT_LOOP = LoopSpec("unet_inpaint", "unet_inpaint_step", "sample", "noise_pred")
LOOPS: dict[str, LoopSpec] = {loop.network: loop for loop in (PRIOR_LOOP, UNET_LOOP, INPAINT_LOOP)}
