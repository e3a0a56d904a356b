"""Export a whole artifacts directory: every network, step graphs, constants, tokenizers, manifest.

Reuse is keyed by a hash of what produced each graph (checkpoint files, precision policy, every
production setting of :class:`ExportConfig`, library versions and this package's export code) — never
by "the file exists"; a reused graph's files must also match their recorded size and sha256. Writes
are transactional (:mod:`~kandinsky_trt.export.artifact_store`).
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kandinsky_trt.export import checkpoint_loading, onnx_export, precision, step_graphs, verify
from kandinsky_trt.export.artifact_files import (
    export_constants, export_tokenizers, image_processor_config, scheduler_entries)
from kandinsky_trt.export.artifact_store import ArtifactStore, read_pending
from kandinsky_trt.export.checkpoint_loading import CheckpointDirs
from kandinsky_trt.export.precision import policy_for
from kandinsky_trt.export.step_graphs import build_bridge_graph, build_step_graph
from kandinsky_trt.export import torch_modules
from kandinsky_trt.export.torch_modules import WRAPPERS
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.integrity import VERIFIED
from kandinsky_trt.runtime.contract.manifest_checks import ManifestRuleError, check_inside
from kandinsky_trt.runtime.contract.spec import (
    BRIDGE_NETWORKS, NETWORKS, STEP_NETWORKS, ModelDims, Profile, ResolvedNetwork, check_profile, resolve,
    resolve_graph)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportConfig:
    checkpoints: CheckpointDirs
    out_dir: Path
    profiles: tuple[Profile, ...] = (Profile(),)  # the first is the default (requests without a size)
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


# ExportConfig fields that do not change what a graph is (everything else enters the export key,
# so a new field, e.g. a precision option, invalidates reuse without touching this function).
# ``fp32_nodes`` enters per network, through the policy, so one network's island keeps the others' graphs.
_NOT_PRODUCTION = ("checkpoints", "out_dir", "verify", "networks", "fp32_nodes")


def _json_value(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if isinstance(value, (Path, set, frozenset)):
        return str(value) if isinstance(value, Path) else sorted(value)
    raise TypeError(f"ExportConfig: cannot hash a {type(value).__name__}")


def _export_key(network: str, config: ExportConfig, dims: ModelDims) -> str:
    import diffusers

    code = (precision, onnx_export, step_graphs, torch_modules)  # a change here invalidates the graph
    settings = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _NOT_PRODUCTION}
    payload = {
        "network": network,
        "checkpoint": _tree_hash(config.checkpoints.component(network)),
        "policy": policy_for(network, config.precision, config.fp32_nodes).islands,
        "config": settings,
        "dims": dims.to_dict(),
        "versions": [torch.__version__, diffusers.__version__],
        "code": [mf.sha256_file(Path(m.__file__)) for m in code],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=_json_value).encode()).hexdigest()


@dataclass
class _Candidates:
    """Finished networks an export may reuse: the committed manifest's and a killed run's."""

    out_dir: Path
    entries: list[tuple[mf.NetworkEntry, dict]] = field(default_factory=list)

    def reusable(self, name: str, key: str) -> tuple[mf.NetworkEntry, dict] | None:
        for entry, records in self.entries:
            if entry.name == name and entry.export_key == key and _files_verify(self.out_dir, entry, records):
                return entry, records
        return None


def _entry_files(entry: mf.NetworkEntry) -> tuple[str, ...]:
    return (entry.onnx, *entry.external_data)


def _files_verify(out_dir: Path, entry: mf.NetworkEntry, records: dict) -> bool:
    try:
        for name in _entry_files(entry):
            path = check_inside(out_dir, name, f"{entry.name} file")
            VERIFIED.verify(path, records[name], entry.name)
    except (ManifestRuleError, mf.IntegrityError, KeyError):
        return False
    return True


def _distinct_shapes(networks: tuple[ResolvedNetwork, ...], profiles: tuple[Profile, ...]) -> dict:
    """{resolved network: the first profile at that shape}: each shape is verified once."""
    shapes: dict[ResolvedNetwork, Profile] = {}
    for network, profile in zip(networks, profiles):
        shapes.setdefault(network, profile)
    return shapes


def _export_one(name: str, model: torch.nn.Module, config: ExportConfig, ctx: "_Export", key: str):
    """Export one network through staging; returns its manifest entry and (with --verify) its parity
    at every distinct shape of the profiles."""
    at_profiles = tuple(resolve(name, p, ctx.dims) for p in config.profiles)
    policy = policy_for(name, config.precision, config.fp32_nodes)
    shapes = _distinct_shapes(at_profiles, config.profiles) if config.verify else {}
    inputs = {net: verify.verification_inputs(net) for net in shapes}
    wrapper = WRAPPERS[name](model, torch.float32) if config.verify else None
    references = {net: verify.torch_reference(wrapper, sets) for net, sets in inputs.items()}  # before the policy
    request = onnx_export.ExportRequest.for_profiles(name, config.profiles, ctx.dims, policy,
                                                     ctx.store.staging_dir(name), config.exporter)
    files = onnx_export.export_network(model, request)
    found = verify.onnx_outputs_by_shape(files[0], inputs)
    parity = [verify.compare(name, config.precision, references[net], found[net], profile.name)
              for net, profile in shapes.items()]
    onnx_name, data_names = ctx.store.place_network(files, name)
    shutil.rmtree(request.out_dir, ignore_errors=True)
    entry = mf.NetworkEntry(
        name=name, onnx=onnx_name, onnx_sha256=ctx.store.records[onnx_name].sha256, precision=config.precision,
        inputs=request.graph.inputs, outputs=request.graph.outputs, profiles=at_profiles, external_data=data_names,
        fp32_islands=policy.islands, export_key=key,
    )
    return entry, parity


# The weight-free graphs that serve only some networks: written only when the manifest has all of them.
_SERVES = {"unet_inpaint_step": ("unet_inpaint",), "prior_embeds": ("prior",),
           "img2img_start": ("movq_encoder", "unet"), "inpaint_start": ("movq_encoder", "unet_inpaint")}


def _step_entries(ctx: "_Export", names: list[str]) -> list[mf.NetworkEntry]:
    """The step graphs of the exported loops, then the bridge graphs (weight-free: rebuilt every export),
    each only beside the networks it serves (``names``: the manifest's networks)."""
    entries, profiles = [], ctx.config.profiles
    for name in (*STEP_NETWORKS, *BRIDGE_NETWORKS):
        if not set(_SERVES.get(name, ())) <= set(names):
            continue
        graph = (build_step_graph(name, profiles[0].cfg, ctx.dims) if name in STEP_NETWORKS
                 else build_bridge_graph(name, ctx.dims))
        file_name = ctx.store.write_bytes(name, ".onnx", graph.SerializeToString())
        io = resolve_graph(name, ctx.dims)
        entries.append(mf.NetworkEntry(name, file_name, ctx.store.records[file_name].sha256, "fp32",
                                       io.inputs, io.outputs, tuple(resolve(name, p, ctx.dims) for p in profiles)))
    return entries


def _load_previous(out_dir: Path) -> mf.Manifest | None:
    try:
        return mf.load_manifest(out_dir)
    except mf.ManifestError:
        return None


@dataclass
class _Export:
    """The state of one export run."""

    config: ExportConfig
    dims: ModelDims
    store: ArtifactStore
    previous: mf.Manifest | None
    candidates: _Candidates
    report: ExportReport


def _network_entry(name: str, ctx: _Export) -> mf.NetworkEntry:
    """Reuse ``name``'s graph when the hash of what produced it matches, else export (and verify) it."""
    config = ctx.config
    key, start = _export_key(name, config, ctx.dims), time.perf_counter()
    found = ctx.candidates.reusable(name, key) if not config.verify else None
    if found is not None:
        entry, records = found
        log.info("    unchanged, reusing %s", entry.onnx)
        ctx.store.adopt(_entry_files(entry), records)
        ctx.report.reused.append(name)
        return entry
    log.info("    exporting (%s)...", config.precision)
    model = checkpoint_loading.load_network(name, config.checkpoints)
    entry, parity = _export_one(name, model, config, ctx, key)
    del model
    gc.collect()
    ctx.store.checkpoint(entry)
    ctx.report.exported.append(name)
    for result in parity:
        ctx.report.parity.append(result)
        log.info("    parity: %s", result.line())
    log.info("    done in %.1f s", time.perf_counter() - start)
    return entry


def _carried(ctx: _Export, names: list[str]) -> dict:
    """Networks exported earlier into the same profiles and not asked for now: kept in the manifest."""
    previous, config = ctx.previous, ctx.config
    if previous is None or (previous.profiles, previous.precision, previous.model_dims) != (
            config.profiles, config.precision, ctx.dims):
        return {}
    carried = {n: e for n, e in previous.networks.items() if n not in names and n in NETWORKS}
    for entry in carried.values():
        ctx.store.adopt(_entry_files(entry), previous.files)
    return carried


def _constants(ctx: _Export) -> dict[str, mf.ConstantEntry]:
    """The previous constants when the networks they come from were reused unchanged, else recomputed
    (which loads the image encoder and the prior: 1.3 B parameters at full size)."""
    previous = ctx.previous
    if previous is not None and {"image_encoder", "prior"} <= set(ctx.report.reused):
        try:
            for c in previous.constants.values():
                previous.verified_path(c.file, f"constant {c.name}")
        except mf.IntegrityError:
            pass
        else:
            ctx.store.adopt(tuple(c.file for c in previous.constants.values()), previous.files)
            return previous.constants
    return export_constants(ctx.config.checkpoints, ctx.store, ctx.dims)


def check_profiles(profiles: tuple[Profile, ...]) -> None:
    """At least one profile, no two of the same batch and size, one ``cfg`` for all."""
    if not profiles:
        raise onnx_export.ExportError("profiles: expected at least one (batch, height, width), found none")
    labels = [p.name for p in profiles]
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise onnx_export.ExportError(f"profiles: expected each batch x size once, found {repeated} more than once")
    if len({p.cfg for p in profiles}) > 1:
        raise onnx_export.ExportError(f"profiles: expected one cfg setting for all, found {labels}")


def validate_export_config(config: ExportConfig) -> list[str]:
    """The networks to export; raises before anything is written when the request cannot work.

    Raises:
        ExportError: ``out_dir`` is a file, ``networks`` names a network the checkpoints lack, or the
            profiles are none, repeated or of mixed guidance.
        SpecError / CheckpointError: a checkpoint folder or its weights are missing or not safetensors.
    """
    check_profiles(config.profiles)
    out = Path(config.out_dir)
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise onnx_export.ExportError(f"out_dir: expected a directory (or a path to create), found {blocking} "
                                      f"is a file")
    available = checkpoint_loading.networks_for(config.checkpoints)
    names = list(config.networks or available)
    unknown = [n for n in names if n not in available]
    if unknown:
        hint = " (unet_inpaint needs --inpaint)" if "unet_inpaint" in unknown else ""
        raise onnx_export.ExportError(f"networks: expected names from {available}{hint}, found unknown {unknown}")
    for name in names:
        checkpoint_loading.check_weights(name, config.checkpoints)
    return list(dict.fromkeys(names))


def export_artifacts(config: ExportConfig) -> ExportReport:
    """Export every requested network of ``config.checkpoints`` into ``config.out_dir``, transactionally.

    Whatever instant the process dies, ``manifest.json`` describes files that exist and match; a
    re-run reuses the networks a killed run finished (:mod:`~kandinsky_trt.export.artifact_store`).
    """
    names = validate_export_config(config)
    dims = checkpoint_loading.read_model_dims(config.checkpoints)
    for profile in config.profiles:
        check_profile(profile, dims)  # before anything is written
    out_dir = Path(config.out_dir)
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with ArtifactStore(out_dir) as store:
            return _export_into(_start(config, dims, store), names)
    except BaseException:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing worth keeping: leave no empty directory behind
        raise


def _start(config: ExportConfig, dims: ModelDims, store: ArtifactStore) -> _Export:
    previous = _load_previous(store.out_dir)
    candidates = _Candidates(store.out_dir)
    if previous is not None:
        candidates.entries += [(e, previous.files) for e in previous.networks.values()]
    pending, records = read_pending(store.out_dir)
    candidates.entries += [(e, records) for e in pending]
    return _Export(config, dims, store, previous, candidates, ExportReport(store.out_dir / mf.MANIFEST_NAME))


def _export_into(ctx: _Export, names: list[str]) -> ExportReport:
    config, dirs = ctx.config, ctx.config.checkpoints
    entries = _carried(ctx, names)
    for index, name in enumerate(names, start=1):
        log.info("[%d/%d] %s", index, len(names), name)
        entries[name] = _network_entry(name, ctx)
    for entry in _step_entries(ctx, list(entries)):
        entries[entry.name] = entry
    manifest = mf.Manifest(
        directory=ctx.store.out_dir, profiles=config.profiles, model_dims=ctx.dims, precision=config.precision,
        networks=entries, constants=_constants(ctx), schedulers=scheduler_entries(dirs),
        tokenizers=export_tokenizers(dirs, ctx.store), image_processor=image_processor_config(dirs),
        producer=_producer(config), checkpoints={k: str(v) for k, v in vars(dirs).items() if v is not None},
    )
    ctx.store.commit(manifest)
    return ctx.report


def _producer(config: ExportConfig) -> dict:
    import diffusers
    import onnx

    from importlib.metadata import version

    return {
        "kandinsky_trt": version("kandinsky-trt"), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "onnx": onnx.__version__, "numpy": np.__version__, "exporter": config.exporter,
        "opset": onnx_export.OPSET[config.exporter],
    }
