"""Artifacts whose decoder UNet is mid-size, for serving benchmarks where the network's cost dominates.

    .venv/bin/python -m kandinsky_trt.benchmarks.mid_size_unet OUT [--widths 96 192 288 384] [--batches 1 2]

The tiny checkpoint (:func:`~kandinsky_trt.export.checkpoints.write_tiny_checkpoint`, seed 0) with
``decoder/unet`` replaced by a UNet of the real block types and layout (``export/full_size.py``) at
``--widths`` channels (the real ones are 384, 768, 1152, 1536) and ``--layers`` resnets per block (real:
3), random weights (seed 0). Every other network stays tiny (text encoders, prior, MoVQ, inpaint UNet),
so a decoder step costs the mid-size UNet and the rest of a request stays cheap. The UNet keeps the
tiny text/image widths it is conditioned on. Exported like the tests' artifacts (fp32, legacy exporter,
verified) to ``OUT/artifacts`` at ``--height`` x ``--width``, one profile per ``--batches`` entry.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
from pathlib import Path

log = logging.getLogger(__name__)


def mid_size_checkpoint(out: Path, widths: tuple[int, ...], layers: int) -> Path:
    """``out/checkpoint``: the tiny one with the decoder's UNet widened; returns the folder."""
    import torch

    from kandinsky_trt.export.checkpoints import write_tiny_checkpoint
    from kandinsky_trt.export.full_size import full_size_configs, instantiate

    folder = out / "checkpoint"
    write_tiny_checkpoint(folder, seed=0)
    unet = folder / "decoder" / "unet"
    tiny = json.loads((unet / "config.json").read_text())
    real = full_size_configs()["unet"]
    config = {k: tiny[k] for k in real if k in tiny} | {
        "block_out_channels": list(widths), "layers_per_block": layers, "norm_num_groups": 32,
        "attention_head_dim": 32}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = instantiate("unet", config)
    log.info("mid-size UNet: %.1f M parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    shutil.rmtree(unet)
    model.save_pretrained(unet, safe_serialization=True)
    return folder


def export(checkpoint: Path, out: Path, batches: tuple[int, ...], size: tuple[int, int]) -> Path:
    from kandinsky_trt.export.artifacts import ExportConfig, export_artifacts
    from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
    from kandinsky_trt.runtime.contract.spec import Profile

    dirs = CheckpointDirs(checkpoint / "prior", checkpoint / "decoder", checkpoint / "inpaint")
    profiles = tuple(Profile(b, size[0], size[1], cfg=True) for b in batches)
    export_artifacts(ExportConfig(dirs, out / "artifacts", profiles, "fp32", exporter="legacy", verify=True))
    return out / "artifacts"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--widths", type=int, nargs=4, default=[96, 192, 288, 384])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[2], help="one profile per batch (default 2)")
    parser.add_argument("--height", type=int, default=64)
    parser.add_argument("--width", type=int, default=64)
    args = parser.parse_args(argv)
    if any(w < 32 or w % 32 for w in args.widths):
        parser.error(f"--widths: expected multiples of 32 (the norm groups), found {args.widths}")
    if args.layers < 1 or min(args.batches) < 1:
        parser.error(f"--layers, --batches: expected whole numbers >= 1, found {args.layers}, {args.batches}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    checkpoint = mid_size_checkpoint(args.out, tuple(args.widths), args.layers)
    print(export(checkpoint, args.out, tuple(args.batches), (args.height, args.width)))


if __name__ == "__main__":
    main()
