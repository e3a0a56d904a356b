"""``kandinsky-trt demo``: the whole path on a tiny checkpoint, and the evidence that it is right.

Random weights draw coloured noise, so a single picture cannot show a newcomer that the engine
works. The demo therefore also runs diffusers' own ``KandinskyCombinedPipeline`` on the same
checkpoint, prompt and random draws (diffusers' order: prior latents, prior step noise, decoder
latents, all from one seeded torch generator) and writes diffusers | kandinsky-trt | |difference|
side by side. torch and diffusers are installed for export anyway, which is why this lives here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from kandinsky_trt.export.artifacts import ExportConfig, ExportReport, export_artifacts
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
from kandinsky_trt.export.checkpoints import TinyCheckpoint, write_tiny_checkpoint
from kandinsky_trt.runtime.cli.output_paths import save_images
from kandinsky_trt.runtime.contract.spec import LATENT_CHANNELS, Profile

PROMPT = "a red cat sitting on a blue chair"
SIZE, STEPS, PRIOR_STEPS, SEED = 64, 10, 5, 0
PANEL = 256  # each panel is drawn at this size (nearest neighbour, so pixels stay visible)


@dataclass(frozen=True)
class DemoResult:
    """What the demo wrote and measured; ``max_diff``/``mean_diff`` are over images in [0, 1]."""

    checkpoint: TinyCheckpoint
    artifacts: Path
    image: Path
    comparison: Path
    mask: Path
    max_diff: float
    mean_diff: float
    export: ExportReport


def run_demo(out: Path, say: Callable[[str], None] = print) -> DemoResult:
    """Tiny checkpoint -> ONNX (every network it has, inpaint included) -> image, next to diffusers."""
    out = Path(out)
    say("1/4 writing a tiny random-weight Kandinsky 2.1 checkpoint (diffusers format)")
    ckpt = write_tiny_checkpoint(out / "checkpoint", seed=0)
    say(f"2/4 exporting it to ONNX (fp32, {SIZE}x{SIZE}, inpaint UNet included) with a parity check against torch")
    dirs = CheckpointDirs(ckpt.prior, ckpt.decoder, ckpt.inpaint)
    config = ExportConfig(dirs, out / "artifacts", (Profile(1, SIZE, SIZE, True),), precision="fp32",
                          exporter="legacy", verify=True)  # legacy: 5x faster than dynamo on tiny models
    report = export_artifacts(config)  # logs each network's progress and parity line as it goes
    say("3/4 generating with kandinsky-trt on CPU (ONNX Runtime); random weights draw coloured noise")
    prior_latents, prior_noise, latents = _draws(report.manifest_path.parent)
    ours = _ours(out / "artifacts", prior_latents, prior_noise, latents)
    say("4/4 generating the same image with diffusers (torch) for comparison")
    reference = _diffusers(ckpt)
    diff = np.abs(ours.astype(np.float64) - reference)
    # At the artifacts' own size, so that img2img / inpaint (also served) take it as it is.
    image = _save(Image.fromarray(_to_uint8(ours)), out / "demo.png")
    comparison = _save(comparison_picture(reference, ours), out / "demo_comparison.png")
    mask = _save(_demo_mask(), out / "mask.png")
    return DemoResult(ckpt, out / "artifacts", image, comparison, mask, float(diff.max()), float(diff.mean()), report)


def _draws(artifacts: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """diffusers' draws in its order: prior latents, noise for every prior step but the last (t = 0),
    then the decoder latents (DDIM draws nothing per step)."""
    import torch

    from kandinsky_trt.runtime.contract.manifest import load_manifest

    dims = load_manifest(artifacts).model_dims
    clip_dim, latent_size = dims.clip_dim, SIZE // dims.latent_scale
    generator = torch.Generator().manual_seed(SEED)
    draw = lambda *shape: torch.randn(shape, generator=generator).numpy()  # noqa: E731
    prior_latents = draw(1, clip_dim)
    prior_noise = np.stack([draw(1, clip_dim) for _ in range(PRIOR_STEPS - 1)])
    latents = draw(1, LATENT_CHANNELS, latent_size, latent_size)
    return prior_latents, prior_noise, latents


def _ours(artifacts: Path, prior_latents, prior_noise, latents) -> np.ndarray:
    from kandinsky_trt.runtime.pipelines.combined import KandinskyCombinedPipeline
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(artifacts, backend="ort") as components:
        pipe = KandinskyCombinedPipeline(components=components)
        return pipe(PROMPT, num_inference_steps=STEPS, prior_num_inference_steps=PRIOR_STEPS, latents=prior_latents,
                    prior_step_noise=prior_noise, decoder_latents=latents, output_type="np").images[0]


def _diffusers(ckpt: TinyCheckpoint) -> np.ndarray:
    import torch
    from diffusers import KandinskyCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    # from_pretrained on the combined pipeline would look up the prior repo on the hub: build it from parts.
    prior = KandinskyPriorPipeline.from_pretrained(ckpt.prior)
    decoder = KandinskyPipeline.from_pretrained(ckpt.decoder)
    pipe = KandinskyCombinedPipeline(**decoder.components, **{f"prior_{k}": v for k, v in prior.components.items()})
    pipe.set_progress_bar_config(disable=True)
    out = pipe(PROMPT, height=SIZE, width=SIZE, num_inference_steps=STEPS, prior_num_inference_steps=PRIOR_STEPS,
               generator=torch.Generator().manual_seed(SEED), output_type="np")
    return np.asarray(out.images[0], np.float64)


def magnification(max_diff: float) -> int:
    """A power of ten that makes the largest difference visible (0.1..1 of full scale), at most 10^6."""
    if max_diff <= 0 or not math.isfinite(max_diff):
        return 1
    return int(10 ** min(6, max(0, math.floor(math.log10(1.0 / max_diff)))))


def comparison_picture(reference: np.ndarray, ours: np.ndarray) -> Image.Image:
    """diffusers | kandinsky-trt | |difference| x 10^k, with the max and mean difference written below."""
    diff = np.abs(np.asarray(ours, np.float64) - np.asarray(reference, np.float64))
    gain = magnification(float(diff.max()))
    panels = [reference, ours, np.clip(diff * gain, 0.0, 1.0)]
    labels = ["diffusers (torch)", "kandinsky-trt (ONNX Runtime)", f"|difference| x {gain:,}"]
    canvas = Image.new("RGB", (3 * PANEL + 4 * 8, PANEL + 64), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    for i, (panel, label) in enumerate(zip(panels, labels)):
        x = 8 + i * (PANEL + 8)
        canvas.paste(Image.fromarray(_to_uint8(panel)).resize((PANEL, PANEL), Image.NEAREST), (x, 24))
        draw.text((x, 6), label, fill="black", font=font)
    draw.text((8, PANEL + 34), f"max |difference| {diff.max():.2e}   mean {diff.mean():.2e}   (images in [0, 1])",
              fill="black", font=font)
    return canvas


def _demo_mask() -> Image.Image:
    """A mask for trying inpaint on the demo's artifacts: white (repaint) square in the middle."""
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[SIZE // 4: 3 * SIZE // 4, SIZE // 4: 3 * SIZE // 4] = 255
    return Image.fromarray(mask, mode="L")


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(image, np.float64), 0.0, 1.0) * 255).round().astype(np.uint8)


def _save(image: Image.Image, path: Path) -> Path:
    return save_images([image], [path])[0]  # unique temporary name in the folder, then rename
