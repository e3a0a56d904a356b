"""ONNX → TensorRT plans for the networks of an artifacts manifest, and the manifest's ``engine`` fields.

:func:`build_engines` validates its :class:`BuildConfig` first (without importing TensorRT), then
for each selected network (the step graphs are networks too): checks that the ONNX file still has
the hash recorded at export; names the plan after what produced it (network, TensorRT version, GPU,
ONNX hash: ``unet.trt11.4.0.sm90.1a2b3c4d.plan``) and reuses it only when the manifest's ``engine``
entry names that file, its sha256 matches and the TensorRT version, compute capability, export key
and optimization level agree (keyed by hashes, never by "the file exists"); otherwise builds it
(:mod:`~kandinsky_trt.engine.polygraphy_builder`), writes it atomically, records ``engine = {file,
sha256, tensorrt_version, gpu_name, compute_capability, onnx_sha256, device_memory_bytes, profiles,
...}`` (``profiles[i]``: the plan's optimization profile for manifest profile i, one per distinct
static shape) and
saves the manifest atomically after each network. The TensorRT part sits behind the
:class:`~kandinsky_trt.engine.plan.PlanBuilder` protocol, so this runs on CPU with a stand-in.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

from kandinsky_trt.engine.errors import BuildConfigError, EngineBuildError
from kandinsky_trt.engine.plan import BuildRequest, PlanBuilder, Platform
from kandinsky_trt.runtime.backends.trt_engine import optimization_profiles
from kandinsky_trt.runtime.contract.manifest import Manifest, ManifestError, NetworkEntry, load_manifest, sha256_file, \
    write_bytes_atomic

log = logging.getLogger(__name__)

MAX_OPT_LEVEL = 5  # IBuilderConfig.builder_optimization_level: 0..5, TensorRT's default is 3


@dataclass(frozen=True)
class BuildConfig:
    """What to build."""

    artifacts: Path  # the artifacts directory written by ``kandinsky-trt export``
    networks: tuple[str, ...] | None = None  # names from the manifest; None: all (step graphs included)
    timing_cache: Path | None = None  # loaded when present, updated after each build
    opt_level: int = 3  # TensorRT builder optimization level 0..5 (higher builds longer, may run faster)
    workspace_gb: float | None = None  # cap on TensorRT's workspace pool in GiB; None: TensorRT decides
    force: bool = False  # rebuild even when a matching plan exists

    @property
    def workspace_bytes(self) -> int | None:
        return None if self.workspace_gb is None else int(self.workspace_gb * 2**30)


def _validate_options(config: BuildConfig) -> None:
    level = config.opt_level
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= MAX_OPT_LEVEL:
        raise BuildConfigError(
            f"opt_level: expected an integer 0..{MAX_OPT_LEVEL} (the TensorRT builder optimization level), "
            f"found {level!r}"
        )
    gb = config.workspace_gb
    is_number = isinstance(gb, (int, float)) and not isinstance(gb, bool)
    if gb is not None and not (is_number and math.isfinite(gb) and gb > 0):
        raise BuildConfigError(f"workspace_gb: expected a number of GiB > 0 (or None), found {gb!r}")
    names = config.networks
    if names is not None and (isinstance(names, str) or not all(isinstance(n, str) for n in names)):
        raise BuildConfigError(f"networks: expected a tuple of network names, found {names!r}")
    if names is not None and not names:
        raise BuildConfigError("networks: expected at least one network name (or None for all), found ()")
    cache = None if config.timing_cache is None else Path(config.timing_cache)
    if cache is not None and cache.exists() and not cache.is_file():
        raise BuildConfigError(f"timing_cache: expected a file path, found a directory {cache}")
    if cache is not None and not cache.parent.is_dir():
        raise BuildConfigError(f"timing_cache: expected a path in an existing directory, found {cache}")


def selected_networks(config: BuildConfig, manifest: Manifest) -> tuple[str, ...]:
    """The networks to build, in manifest order (or in the order asked)."""
    return tuple(manifest.networks) if config.networks is None else tuple(config.networks)


def _validate_files(manifest: Manifest, names: tuple[str, ...]) -> None:
    for name in names:
        entry = manifest.networks[name]
        for file_name in (entry.onnx, *entry.external_data):
            path = manifest.path(file_name)
            if not path.is_file():
                raise BuildConfigError(
                    f"artifacts: expected {path} (listed for network {name!r} in the manifest), found no "
                    "such file: re-run `kandinsky-trt export`"
                )


def validate_build_config(config: BuildConfig) -> Manifest:
    """Check every argument and the artifacts it names, without importing TensorRT; returns the manifest.

    Raises ``BuildConfigError``: an argument out of range, an unknown network name, missing files.
    """
    _validate_options(config)
    artifacts = Path(config.artifacts)
    if not artifacts.is_dir():
        raise BuildConfigError(
            f"artifacts: expected a directory written by `kandinsky-trt export`, found {artifacts} "
            f"({'a file' if artifacts.exists() else 'no such directory'})"
        )
    try:
        manifest = load_manifest(artifacts)
    except ManifestError as err:
        raise BuildConfigError(str(err)) from err
    unknown = [n for n in config.networks or () if n not in manifest.networks]
    if unknown:
        raise BuildConfigError(f"networks: expected names from {sorted(manifest.networks)}, found unknown {unknown}")
    _validate_files(manifest, selected_networks(config, manifest))
    return manifest


def plan_file_name(network: str, tensorrt_version: str, compute_capability: str, onnx_sha256: str) -> str:
    """``unet.trt11.4.0.sm90.1a2b3c4d.plan``: network, TensorRT major.minor.patch, GPU, ONNX hash."""
    major_minor_patch = ".".join(tensorrt_version.split(".")[:3])
    parts = compute_capability.split(".")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise ValueError(f"compute_capability: expected 'major.minor' such as '9.0', found {compute_capability!r}")
    return f"{network}.trt{major_minor_patch}.sm{''.join(parts)}.{onnx_sha256[:8]}.plan"


def _shapes_digest(shapes) -> str:
    """A short hash of the optimization profiles' input shapes (the same graph serves other profile sets)."""
    text = json.dumps([[list(t.shape) for t in shape.inputs] for shape in shapes])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _reuse_keys(entry: NetworkEntry, file_name: str, platform: Platform, opt_level: int) -> dict:
    """The ``engine`` fields that must all agree for a plan to be reused."""
    shapes, indices = optimization_profiles(entry)
    return {"file": file_name, "tensorrt_version": platform.tensorrt_version,
            "compute_capability": platform.compute_capability, "onnx_sha256": entry.onnx_sha256,
            "export_key": entry.export_key, "builder_optimization_level": opt_level,
            "profiles": list(indices), "profile_shapes": _shapes_digest(shapes)}


def reuse_mismatch(entry: NetworkEntry, path: Path, platform: Platform, opt_level: int) -> str | None:
    """Why the plan at ``path`` cannot be reused for ``entry`` (None when it can)."""
    built = entry.engine
    if not built:
        return "no engine recorded in the manifest"
    for key, value in _reuse_keys(entry, path.name, platform, opt_level).items():
        if built.get(key) != value:
            return f"{key} recorded {built.get(key)!r}, now {value!r}"
    if not path.is_file():
        return f"{path.name} is missing"
    digest = sha256_file(path)
    if digest != built.get("sha256"):
        return f"{path.name} has sha256 {digest[:12]}…, the manifest records {str(built.get('sha256'))[:12]}…"
    return None


def _check_onnx_hash(manifest: Manifest, entry: NetworkEntry) -> Path:
    onnx_path = manifest.path(entry.onnx)
    found = sha256_file(onnx_path)
    if found != entry.onnx_sha256:
        raise EngineBuildError(
            f"{entry.name}.onnx_sha256: expected {entry.onnx_sha256} (recorded at export), found {found} "
            f"({onnx_path.name} changed after export): re-run `kandinsky-trt export`"
        )
    return onnx_path


def _build_one(manifest: Manifest, name: str, config: BuildConfig, builder: PlanBuilder,
               platform: Platform) -> tuple[Manifest, Path]:
    entry = manifest.network(name)
    onnx_path = _check_onnx_hash(manifest, entry)
    path = manifest.path(plan_file_name(name, platform.tensorrt_version, platform.compute_capability,
                                        entry.onnx_sha256))
    reason = "--force" if config.force else reuse_mismatch(entry, path, platform, config.opt_level)
    if reason is None:
        log.info("%s: reusing %s", name, path.name)
        return manifest, path
    log.info("%s: building %s (%s; opt level %d)", name, path.name, reason, config.opt_level)
    start = time.perf_counter()
    request = BuildRequest(entry, onnx_path, config.opt_level, config.workspace_bytes,
                           Path(config.timing_cache) if config.timing_cache else None)
    built = builder.build(request)
    write_bytes_atomic(path, built.data)
    digest = hashlib.sha256(memoryview(built.data)).hexdigest()
    record = {**_reuse_keys(entry, path.name, platform, config.opt_level), "sha256": digest,
              "gpu_name": platform.gpu_name, "device_memory_bytes": int(built.device_memory_bytes)}
    manifest = dataclasses.replace(
        manifest, networks={**manifest.networks, name: dataclasses.replace(entry, engine=record)}
    )
    manifest.save()
    _remove_stale_plan(manifest, entry, path)
    log.info("%s: built %s in %.1f s (%.1f MiB, activations %.1f MiB)", name, path.name,
             time.perf_counter() - start, path.stat().st_size / 2**20, built.device_memory_bytes / 2**20)
    return manifest, path


def _remove_stale_plan(manifest: Manifest, old_entry: NetworkEntry, new_path: Path) -> None:
    """Delete the plan the manifest named before, once nothing names it (plans are GBs)."""
    old_file = (old_entry.engine or {}).get("file")
    if not old_file or old_file == new_path.name:
        return
    if any((e.engine or {}).get("file") == old_file for e in manifest.networks.values()):
        return
    old_path = manifest.path(old_file)
    if old_path.is_file() and old_path.suffix == ".plan":
        log.info("%s: removing the superseded plan %s", old_entry.name, old_file)
        old_path.unlink()


def build_engines(config: BuildConfig, builder: PlanBuilder | None = None) -> list[Path]:
    """Build (or reuse) one plan per selected network, record them in the manifest; returns their paths.

    ``config`` is validated before TensorRT is imported; ``builder`` is a stand-in in tests. Raises:
        BuildConfigError: invalid arguments or missing artifacts.
        TensorRTUnavailableError: ``tensorrt`` or ``polygraphy`` cannot be imported.
        OnnxParseError, EngineBuildError: TensorRT rejected a graph or failed to build it.
    """
    manifest = validate_build_config(config)
    names = selected_networks(config, manifest)
    if builder is None:
        from kandinsky_trt.engine.polygraphy_builder import TensorRTPlanBuilder

        builder = TensorRTPlanBuilder()
    platform = builder.platform()
    log.info("building %d network(s) with TensorRT %s on %s (compute capability %s)", len(names),
             platform.tensorrt_version, platform.gpu_name, platform.compute_capability)
    paths = []
    for name in names:
        manifest, path = _build_one(manifest, name, config, builder, platform)
        paths.append(path)
    return paths
