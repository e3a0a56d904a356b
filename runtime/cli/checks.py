"""The command line's own argument checks: what needs no artifacts, done before any work starts.

Each check reuses the library's validator for that kind of argument (``runtime/pipelines/inputs.py``,
``runtime/cli/output_paths.py``); :data:`FLAGS` renames the library's argument names to the flags a
user typed, so ``--seed: expected a seed >= 0, found -1`` names what to change.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kandinsky_trt.runtime.pipelines import inputs
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.cli.output_paths import image_targets

# API argument -> the flag a CLI user typed, so library errors name the flag.
FLAGS = {"prompt": "PROMPT", "negative_prompt": "--negative-prompt", "guidance_scale": "--guidance",
         "prior_guidance_scale": "--prior-guidance", "num_inference_steps": "--steps",
         "prior_num_inference_steps": "--prior-steps", "num_images_per_prompt": "--num-images",
         "generator": "--seed", "strength": "--strength", "image": "--image", "mask": "--mask",
         "mask_image": "--mask", "height": "--height", "width": "--width", "weights": "WEIGHT",
         "images_and_prompts": "--text/--image", "scheduler": "--scheduler"}


def run_args(args: argparse.Namespace, images: int) -> list[Path]:
    """The checks that need no artifacts, before any work: numbers, seed, output paths."""
    inputs.rng(args.seed)
    inputs.check_positive_int(args.steps, "num_inference_steps")
    inputs.check_positive_int(args.prior_steps, "prior_num_inference_steps")
    for name, flag in (("guidance_scale", "guidance"), ("prior_guidance_scale", "prior_guidance")):
        if hasattr(args, flag):  # generate's flags; interpolate has none
            inputs.check_number(getattr(args, flag), name)
    return image_targets(args.out, images)


def weight(text: str, flag: str, condition: str) -> float:
    """An interpolate ``WEIGHT`` (argparse cannot type one of ``nargs=2``)."""
    try:
        value = float(text)
    except ValueError:
        raise PipelineInputError(f"{flag} {condition!r} WEIGHT: expected a number, found {text!r}") from None
    return inputs.check_number(value, f"{flag} WEIGHT")


class Progress:
    """A step callback whose bar appears at the first step, so errors before it print on a clean line."""

    def __init__(self, total: int, desc: str) -> None:
        self.total, self.desc, self.bar = total, desc, None

    def __call__(self, i: int, t: int, latents) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="step", leave=False)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # also on Ctrl-C: the bar's line is cleared before the one-line message
