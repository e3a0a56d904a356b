"""Write full-size random-weight Kandinsky 2.1 checkpoints (prior + decoder) in diffusers format, offline.

    python -m kandinsky_trt.export.full_size_checkpoints OUT [--seed 0]

The real networks (:func:`kandinsky_trt.export.full_size.build_full_size_model`: published configs,
random weights) in folders laid out like ``kandinsky-2-1-prior`` and ``kandinsky-2-1``, so the normal
``kandinsky-trt export`` turns them into a full-size artifacts directory (graphs of the real size and
cost; the values are random). Everything that is not a network weight is the tiny checkpoint's
(:func:`~kandinsky_trt.export.checkpoints.write_tiny_checkpoint`): model_index.json, the schedulers,
the image processor and the locally trained tokenizers. Their vocabularies are smaller than the real
ones; the embedding tables keep the real sizes (49408 and 250002 rows), so the tokenizers use only
their first rows. No inpaint checkpoint (not needed to serve text2img; add the same way if wanted).

Memory: one network at a time is built and saved in shards of :data:`SHARD_SIZE` (safetensors copies a
shard into bytes before writing), so the peak is the largest network (UNet, 4.9 GB fp32) plus a shard.
"""

from __future__ import annotations

import argparse
import gc
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, CheckpointError
from kandinsky_trt.export.checkpoints import write_tiny_checkpoint
from kandinsky_trt.export.full_size import build_full_size_model, parameter_count
from kandinsky_trt.runtime.contract.spec import NETWORK_SOURCE

log = logging.getLogger(__name__)

CHECKPOINTS = ("prior", "decoder")
SHARD_SIZE = "1GB"
# One network per component folder (both MoVQ halves live in decoder/movq).
_NETWORKS = ("prior_text_encoder", "image_encoder", "prior", "text_encoder", "unet", "movq_decoder")


def _replace_weights(staging: Path, network: str, seed: int) -> None:
    """Swap the tiny network in ``network``'s component folder for the full-size one."""
    which, subfolder = NETWORK_SOURCE[network]
    folder = staging / which / subfolder
    start = time.perf_counter()
    model = build_full_size_model(network, dtype=torch.float32, seed=seed)
    shutil.rmtree(folder)
    model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD_SIZE)
    log.info("%s: %.0f M parameters written to %s in %.1f s", network, parameter_count(model) / 1e6, folder,
             time.perf_counter() - start)
    del model
    gc.collect()


def write_full_size_checkpoint(out_dir: Path, seed: int = 0) -> CheckpointDirs:
    """Write ``out_dir/{prior,decoder}`` (full size, random, deterministic for ``seed``).

    Written into a temporary folder inside ``out_dir`` and renamed into place once complete.

    Raises:
        CheckpointError: ``seed`` is not a non-negative integer, or ``out_dir/prior`` or
            ``out_dir/decoder`` already exists (delete it first: nothing is replaced).
    """
    out_dir = Path(out_dir)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise CheckpointError(f"seed: expected a non-negative integer, found {seed!r}")
    existing = [str(out_dir / n) for n in CHECKPOINTS if (out_dir / n).exists()]
    if existing:
        raise CheckpointError(f"out: expected no {' or '.join(CHECKPOINTS)} folder yet, found {existing}")
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".full-size-checkpoint-", dir=out_dir))
    try:
        write_tiny_checkpoint(staging, seed=seed)  # layout, tokenizers, schedulers, image processor
        for network in _NETWORKS:
            _replace_weights(staging, network, seed)
        for name in CHECKPOINTS:
            (staging / name).rename(out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return CheckpointDirs(out_dir / "prior", out_dir / "decoder")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="output directory (gets prior/ and decoder/)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dirs = write_full_size_checkpoint(Path(args.out), args.seed)
    print(f"full-size checkpoint written: {dirs.prior}, {dirs.decoder}")


if __name__ == "__main__":
    main()
