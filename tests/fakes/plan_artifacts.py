"""Artifacts directories of built plans ``b"plan:<name>"``, which :mod:`fakes.tensorrt` deserializes."""

from __future__ import annotations

import hashlib

from fakes.cuda import H100
from fakes.tensorrt import TRT_VERSION
from kandinsky_trt.runtime.contract.manifest import Manifest
from manifest_helpers import complete_manifest


def write_plan_artifacts(directory, networks: dict, arena: dict, version: str = TRT_VERSION,
                         geometry: tuple[dict, dict] | None = None) -> Manifest:
    """A manifest of built plans ``b"plan:<name>"``; ``networks`` maps name -> (inputs, outputs) dicts.

    ``geometry`` is (profile, model_dims); default a 64x64 batch-1 profile of a tiny model.
    """
    profile, dims = geometry or ({"batch": 1, "height": 64, "width": 64, "cfg": True},
                                 {"clip_dim": 8, "text_dim": 8, "image_size": 8, "text_len": 4, "latent_scale": 8})
    entries = []
    for name, (inputs, outputs) in networks.items():
        plan = f"plan:{name}".encode()
        (directory / f"{name}.plan").write_bytes(plan)
        entries.append({
            "name": name, "onnx": f"{name}.onnx", "onnx_sha256": "c" * 64, "external_data": [], "precision": "fp32",
            "fp32_islands": [], "inputs": inputs, "outputs": outputs,
            "engine": {"file": f"{name}.plan", "sha256": hashlib.sha256(plan).hexdigest(), "tensorrt_version": version,
                       "gpu_name": H100.name, "compute_capability": "9.0", "onnx_sha256": "c" * 64,
                       "device_memory_bytes": arena[name]},
        })
    manifest = Manifest.from_dict(complete_manifest({
        "producer": {}, "precision": "fp32", "profile": profile, "model_dims": dims,
        "checkpoints": {}, "networks": entries, "constants": [], "schedulers": {}, "tokenizers": {},
        "image_processor": {"size": 8, "mean": [0.5] * 3, "std": [0.5] * 3},
    }, directory), directory)
    manifest.save()
    return manifest
