"""Export a whole artifacts directory: every network, step graphs, constants, tokenizers, manifest.

Reuse is keyed by a hash of what produced each graph (checkpoint files, precision policy, profile,
exporter, library versions and this package's export code) — never by "the file exists".
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kandinsky_trt.export import checkpoint_loading, onnx_export, precision, step_graphs, verify
from kandinsky_trt.export.artifact_files import (
    export_constants, export_tokenizers, image_processor_config, scheduler_entries)
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
from kandinsky_trt.export.precision import policy_for
from kandinsky_trt.export.step_graphs import write_step_graph
from kandinsky_trt.runtime.backends import torch_modules
from kandinsky_trt.runtime.backends.torch_modules import WRAPPERS
from kandinsky_trt.runtime import manifest as mf
from kandinsky_trt.runtime.spec import NETWORKS, STEP_NETWORKS, ModelDims, Profile, resolve

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    checkpoints: CheckpointDirs
    out_dir: Path
    profile: Profile = Profile()
    precision: str = "fp16"
    exporter: str = "dynamo"
    verify: bool = False
    networks: tuple[str, ...] | None = None  # None: every network the checkpoints provide
    fp32_nodes: tuple[str, ...] = ()  # extra fp32 islands, "network:module.path" (precision.policy_for)


@dataclass
class ExportReport:
    manifest_path: Path
    exported: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)
    parity: list[verify.ParityResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(p.passed for p in self.parity)


def _tree_hash(path: Path) -> str:
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode())
        digest.update(mf.sha256_file(f).encode())
    return digest.hexdigest()


def _export_key(network: str, config: ExportConfig, dims: ModelDims) -> str:
    import diffusers

    code = (precision, onnx_export, step_graphs, torch_modules)  # a change here invalidates the graph
    payload = {
        "network": network,
        "checkpoint": _tree_hash(config.checkpoints.component(network)),
        "policy": policy_for(network, config.precision, config.fp32_nodes).islands,
        "precision": config.precision,
        "profile": config.profile.to_dict(),
        "dims": dims.to_dict(),
        "exporter": config.exporter,
        "versions": [torch.__version__, diffusers.__version__],
        "code": [mf.sha256_file(Path(m.__file__)) for m in code],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _reusable(previous: mf.Manifest | None, name: str, key: str) -> mf.NetworkEntry | None:
    entry = previous.networks.get(name) if previous else None
    if entry is None or entry.export_key != key:
        return None
    path = previous.path(entry.onnx)
    if not path.is_file() or mf.sha256_file(path) != entry.onnx_sha256:
        return None
    return entry


def _export_one(name: str, model: torch.nn.Module, config: ExportConfig, dims: ModelDims, key: str):
    """Export one network; returns its manifest entry and (with --verify) its parity."""
    network = resolve(name, config.profile, dims)
    policy = policy_for(name, config.precision, config.fp32_nodes)
    inputs = reference = None
    if config.verify:
        inputs = verify.verification_inputs(network)
        reference = verify.torch_reference(WRAPPERS[name](model, torch.float32), inputs)
    request = onnx_export.ExportRequest(network, policy, config.out_dir, config.exporter)
    files = onnx_export.export_network(model, request)
    parity = None
    if config.verify:
        parity = verify.compare(name, config.precision, reference, verify.onnx_outputs(files[0], inputs))
    entry = mf.NetworkEntry(
        name=name, onnx=files[0].name, onnx_sha256=mf.sha256_file(files[0]), precision=config.precision,
        inputs=network.inputs, outputs=network.outputs, external_data=tuple(f.name for f in files[1:]),
        fp32_islands=policy.islands, export_key=key,
    )
    return entry, parity


def _step_entries(config: ExportConfig, dims: ModelDims, names: list[str]) -> list[mf.NetworkEntry]:
    entries = []
    for name in STEP_NETWORKS:
        if name == "unet_inpaint_step" and "unet_inpaint" not in names:
            continue
        path = config.out_dir / f"{name}.onnx"
        write_step_graph(name, config.profile, dims, path)
        network = resolve(name, config.profile, dims)
        entries.append(mf.NetworkEntry(name, path.name, mf.sha256_file(path), "fp32", network.inputs, network.outputs))
    return entries


def _load_previous(out_dir: Path) -> mf.Manifest | None:
    try:
        return mf.load_manifest(out_dir)
    except mf.ManifestError:
        return None


def _network_entry(name: str, config: ExportConfig, dims: ModelDims, previous, report: ExportReport):
    """Reuse ``name``'s graph when the hash of what produced it matches, else export (and verify) it."""
    key, start = _export_key(name, config, dims), time.perf_counter()
    entry = _reusable(previous, name, key) if not config.verify else None
    if entry is not None:
        log.info("    unchanged, reusing %s", entry.onnx)
        report.reused.append(name)
        return entry
    log.info("    exporting (%s)...", config.precision)
    model = checkpoint_loading.load_network(name, config.checkpoints)
    entry, parity = _export_one(name, model, config, dims, key)
    del model
    gc.collect()
    report.exported.append(name)
    if parity is not None:
        report.parity.append(parity)
        log.info("    parity: %s", parity.line())
    log.info("    done in %.1f s", time.perf_counter() - start)
    return entry


def _carried(previous: mf.Manifest | None, config: ExportConfig, dims: ModelDims, names: list[str]) -> dict:
    """Networks exported earlier into the same profile and not asked for now: kept in the manifest."""
    if previous is None or (previous.profile, previous.precision, previous.model_dims) != (
            config.profile, config.precision, dims):
        return {}
    return {n: e for n, e in previous.networks.items() if n not in names and n in NETWORKS}


def _constants(previous: mf.Manifest | None, report: ExportReport, config: ExportConfig, dims: ModelDims):
    """The previous constants when the networks they come from were reused unchanged, else recomputed
    (which loads the image encoder and the prior: 1.3 B parameters at full size)."""
    sources = {"image_encoder", "prior"}
    if previous is not None and sources <= set(report.reused) and all(
            previous.path(c.file).is_file() and mf.sha256_file(previous.path(c.file)) == c.sha256
            for c in previous.constants.values()):
        return previous.constants
    return export_constants(config.checkpoints, config.out_dir, dims)


def export_artifacts(config: ExportConfig) -> ExportReport:
    """Export every requested network of ``config.checkpoints`` into ``config.out_dir``."""
    dirs = config.checkpoints
    dims = checkpoint_loading.read_model_dims(dirs)
    config.out_dir.mkdir(parents=True, exist_ok=True)
    previous = _load_previous(config.out_dir)
    names = list(config.networks or checkpoint_loading.networks_for(dirs))
    report = ExportReport(config.out_dir / mf.MANIFEST_NAME)
    entries = _carried(previous, config, dims, names)
    for index, name in enumerate(names, start=1):
        log.info("[%d/%d] %s", index, len(names), name)
        entries[name] = _network_entry(name, config, dims, previous, report)
    for entry in _step_entries(config, dims, list(entries)):
        entries[entry.name] = entry
    manifest = mf.Manifest(
        directory=config.out_dir, profile=config.profile, model_dims=dims, precision=config.precision,
        networks=entries, constants=_constants(previous, report, config, dims),
        schedulers=scheduler_entries(dirs), tokenizers=export_tokenizers(dirs, config.out_dir),
        image_processor=image_processor_config(dirs), producer=_producer(config),
        checkpoints={k: str(v) for k, v in vars(dirs).items() if v is not None},
    )
    manifest.save()
    return report


def _producer(config: ExportConfig) -> dict:
    import diffusers
    import onnx

    from importlib.metadata import version

    return {
        "kandinsky_trt": version("kandinsky-trt"), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "onnx": onnx.__version__, "numpy": np.__version__, "exporter": config.exporter,
        "opset": onnx_export.OPSET[config.exporter],
    }
