"""Helpers for the pipeline parity tests: diffusers pipelines on the tiny checkpoint and their draws.

diffusers draws every random tensor from one torch generator in a known order (kandinsky_map
§1.7); these helpers replay that order so our runtime receives the very same latents and noise.
"""

from __future__ import annotations

import numpy as np
import torch

SEED = 1234


def torch_draws(shapes: list[tuple[int, ...]], seed: int = SEED) -> list[np.ndarray]:
    """The tensors diffusers draws, in order, from ``torch.Generator().manual_seed(seed)``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).numpy() for shape in shapes]


def generator(seed: int = SEED) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def embeds(rows: int, dim: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, dim)).astype(np.float32)


def max_diff(a, b) -> float:
    a = a.numpy() if hasattr(a, "numpy") else np.asarray(a)
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_close(label: str, diff: float, tolerance: float) -> None:
    """Assert ``diff < tolerance``. ``KTRT_MEASURE=1`` also prints every measured value (how the README
    parity table and the tolerances were obtained); it never switches the assertion off."""
    import os

    if os.environ.get("KTRT_MEASURE"):
        print(f"PARITY {label} {diff:.3e}")
    assert diff < tolerance, f"{label}: max abs diff {diff:.3e} >= tolerance {tolerance:.0e}"


def diffusers_pipelines(checkpoint, prior: bool = True) -> dict:
    """diffusers' Kandinsky 2.1 pipelines on ``checkpoint`` (a ``CheckpointDirs``), on the CPU."""
    import diffusers

    load = lambda cls, path: getattr(diffusers, cls).from_pretrained(path).to("cpu")  # noqa: E731
    pipes = {"prior": load("KandinskyPriorPipeline", checkpoint.prior)} if prior else {}
    return pipes | {
        "text2img": load("KandinskyPipeline", checkpoint.decoder),
        "img2img": load("KandinskyImg2ImgPipeline", checkpoint.decoder),
        "inpaint": load("KandinskyInpaintPipeline", checkpoint.inpaint),
    }
