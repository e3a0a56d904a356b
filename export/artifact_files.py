"""The non-graph files of an artifacts directory: constants, tokenizers, scheduler tables.

Constants are raw little-endian float32 arrays (a C++ host can ``fread`` them); tokenizers are
``tokenizer.json`` files the runtime reads with the ``tokenizers`` package. Both are written through
the export's :class:`~kandinsky_trt.export.artifact_store.ArtifactStore` (content-addressed names,
size + sha256 recorded, atomic, the umask's file mode).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from kandinsky_trt.export.artifact_store import ArtifactStore
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs, load_network
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.schedulers import scheduler_table
from kandinsky_trt.runtime.contract.spec import ModelDims

# Tables precomputed into the manifest: the pipelines' default step counts (a host that wants
# another count computes it with runtime/contract/schedulers.py or fills the table itself).
DEFAULT_STEPS = {"prior": (25,), "decoder": (100, 50), "decoder_ddpm": (100,)}
_SCHEDULER_DIRS = {"prior": ("prior", "scheduler"), "decoder": ("decoder", "scheduler"),
                   "decoder_ddpm": ("decoder", "ddpm_scheduler")}


def _write_constant(store: ArtifactStore, name: str, array: np.ndarray) -> mf.ConstantEntry:
    array = np.ascontiguousarray(array, dtype="<f4")
    file_name = store.write_bytes(name, ".f32.bin", array.tobytes())
    return mf.ConstantEntry(name, file_name, "float32", tuple(array.shape), store.records[file_name].sha256)


def export_constants(dirs: CheckpointDirs, store: ArtifactStore, dims: ModelDims) -> dict[str, mf.ConstantEntry]:
    """Zero-image embedding (the prior's negative branch) and the prior's CLIP mean / std."""
    with torch.no_grad():
        encoder = load_network("image_encoder", dirs)
        # diffusers' get_zero_embed: zeros in *normalised* pixel space, as the original code did.
        zeros = torch.zeros(1, 3, dims.image_size, dims.image_size)
        zero_embeds = encoder(pixel_values=zeros).image_embeds.numpy()
        del encoder
        prior = load_network("prior", dirs)
        mean, std = prior.clip_mean.detach().numpy(), prior.clip_std.detach().numpy()
        del prior
    arrays = {"zero_image_embeds": zero_embeds, "clip_mean": mean, "clip_std": std}
    return {name: _write_constant(store, name, a) for name, a in arrays.items()}


def _tokenizer_json(folder: Path, store: ArtifactStore, stem: str) -> tuple[str, int]:
    """Write ``folder``'s tokenizer (tokenizer.json format); returns its file name and pad id."""
    from transformers import AutoTokenizer

    # Serialise the tokenizer transformers actually builds, not the checkpoint's tokenizer.json:
    # transformers rebuilds e.g. XLM-R's pre-tokenizer from its class and ignores the file's, so a
    # copied file can tokenize extra whitespace differently (tests/test_tokenization.py).
    tokenizer = AutoTokenizer.from_pretrained(folder)
    file_name = store.write_bytes(stem, ".json", tokenizer.backend_tokenizer.to_str().encode())
    return file_name, int(tokenizer.pad_token_id)


def export_tokenizers(dirs: CheckpointDirs, store: ArtifactStore) -> dict[str, dict]:
    entries = {}
    for which in ("prior", "decoder"):
        file_name, pad_id = _tokenizer_json(dirs.root(which) / "tokenizer", store, f"{which}_tokenizer")
        entries[which] = {"file": file_name, "max_length": 77, "pad_id": pad_id}
    return entries


def scheduler_entries(dirs: CheckpointDirs) -> dict[str, dict]:
    """Scheduler configs and their coefficient tables at the default step counts."""
    entries = {}
    for key, (which, sub) in _SCHEDULER_DIRS.items():
        path = dirs.root(which) / sub / "scheduler_config.json"
        if not path.is_file():
            continue  # ddpm_scheduler is optional
        config = json.loads(path.read_text())
        tables = {str(n): scheduler_table(config, n).to_manifest() for n in DEFAULT_STEPS[key]}
        entries[key] = {"config": config, "tables": tables}
    return entries


def image_processor_config(dirs: CheckpointDirs) -> dict:
    """CLIP preprocessing used by ``interpolate`` for image conditions."""
    config = json.loads((dirs.root("prior") / "image_processor" / "preprocessor_config.json").read_text())
    size = config.get("crop_size", 224)
    size = size.get("height", 224) if isinstance(size, dict) else int(size)
    return {"size": size, "mean": list(config["image_mean"]), "std": list(config["image_std"])}
