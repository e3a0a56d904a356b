"""``manifest.json``: the flat, versioned description of an artifacts directory.

Written by export (and updated by the engine build), read by every backend and by C++ hosts. Its JSON
Schema lives beside this module (``manifest.schema.json``) and is enforced at every load, with range
limits and file rules (:mod:`~kandinsky_trt.runtime.contract.manifest_checks`), before anything is allocated.

Layout (schema version 4)::

    schema_version, producer{...}, precision, profiles[{batch,height,width,cfg}], model_dims{...},
    checkpoints{prior|decoder|inpaint: path},
    networks[{name, onnx, onnx_sha256, external_data[], precision, fp32_islands[], export_key,
              inputs[{name,dtype,shape}], outputs[...]   (the graph's: profile dims by name, e.g. "B2"),
              profiles[{profile, inputs[...], outputs[...]}]   (resolved I/O at each manifest profile),
              engine{file, sha256, ..., profiles[]}|null}],   (engine.profiles[i]: the plan's
                                                               optimization profile for profiles[i])
    constants[{name, file, dtype, shape, sha256}],
    schedulers{prior, decoder[, decoder_ddpm]: {config{...}, tables{steps: table}}},
    tokenizers{prior, decoder: {file, max_length, pad_id}},
    image_processor{size, mean, std}  (CLIP preprocessing for ``interpolate`` image conditions),
    files{name: {size, sha256}}  (every file named above except engine plans)

One ONNX graph per network serves every profile (its profile dims are symbolic), so weights are
stored once. Every file name is relative to the manifest's directory and must stay inside it.
Schema 4 is the per-row contract (``spec``): the loop networks' ``timestep`` is ``(B2,)`` and the step
graphs take ``coefficients`` ``(B, K)`` and ``guidance_scale`` ``(B, 1)``. Older schemas are refused
with the re-export hint: schema 3 (0.3.x) had one ``(1,)`` timestep and one ``(K,)`` coefficient row
per call, schema 2 (0.2.x) one profile, schema 1 (before 0.2.0) no hashes of external data or tokenizers.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.contract.integrity import VERIFIED, FileRecord, IntegrityError, sha256_file, write_bytes_atomic
from kandinsky_trt.runtime.contract.manifest_schema import SCHEMA_PATH, SchemaViolation, validate
from kandinsky_trt.runtime.contract.spec import ModelDims, Profile, ResolvedNetwork, ResolvedTensor

__all__ = ["SCHEMA_VERSION", "MANIFEST_NAME", "SCHEMA_PATH", "ManifestError", "NetworkEntry", "ConstantEntry",
           "Manifest", "load_manifest", "sha256_file", "write_bytes_atomic", "FileRecord", "IntegrityError"]

SCHEMA_VERSION = 4
# What an artifacts set older than the per-row contract needs (also runtime/cpp/manifest.cpp, README).
REEXPORT_HINT = "the artifacts predate per-row timesteps and coefficients; re-run `kandinsky-trt export`"
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # the largest real manifest is ~1 MB (coefficient tables)


class ManifestError(KandinskyTrtError, ValueError):
    """A manifest that is missing, unreadable, of another schema version, or inconsistent."""


def _tensors(entries: list[dict]) -> tuple[ResolvedTensor, ...]:
    return tuple(ResolvedTensor(e["name"], e["dtype"], tuple(e["shape"])) for e in entries)


def _profile_io(name: str, d: dict) -> ResolvedNetwork:
    return ResolvedNetwork(name, _tensors(d["inputs"]), _tensors(d["outputs"]))


@dataclass(frozen=True)
class NetworkEntry:
    """One network of the manifest: its ONNX file, the graph's I/O (profile dims by name), its
    resolved I/O at each manifest profile (``profiles[i]`` at ``Manifest.profiles[i]``) and (after a
    build) its engine."""

    name: str
    onnx: str
    onnx_sha256: str
    precision: str
    inputs: tuple[ResolvedTensor, ...]
    outputs: tuple[ResolvedTensor, ...]
    profiles: tuple[ResolvedNetwork, ...]
    external_data: tuple[str, ...] = ()
    fp32_islands: tuple[str, ...] = ()
    export_key: str = ""  # hash of what produced the ONNX: reuse only when it matches
    engine: dict | None = None

    def resolved(self, profile: int = 0) -> ResolvedNetwork:
        """The static I/O at manifest profile ``profile`` (an index of ``Manifest.profiles``)."""
        return self.profiles[profile]

    @property
    def graph(self) -> ResolvedNetwork:
        """The ONNX graph's I/O: integers, and the profile dims (``spec.PROFILE_DIMS``) by name."""
        return ResolvedNetwork(self.name, self.inputs, self.outputs)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "onnx": self.onnx,
            "onnx_sha256": self.onnx_sha256,
            "external_data": list(self.external_data),
            "precision": self.precision,
            "fp32_islands": list(self.fp32_islands),
            "export_key": self.export_key,
            "inputs": [t.to_dict() for t in self.inputs],
            "outputs": [t.to_dict() for t in self.outputs],
            "profiles": [{"profile": i, "inputs": [t.to_dict() for t in p.inputs],
                          "outputs": [t.to_dict() for t in p.outputs]} for i, p in enumerate(self.profiles)],
            "engine": self.engine,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "NetworkEntry":
        return cls(
            name=d["name"],
            onnx=d["onnx"],
            onnx_sha256=d["onnx_sha256"],
            precision=d["precision"],
            inputs=_tensors(d["inputs"]),
            outputs=_tensors(d["outputs"]),
            profiles=tuple(_profile_io(d["name"], p) for p in d["profiles"]),
            external_data=tuple(d.get("external_data", ())),
            fp32_islands=tuple(d.get("fp32_islands", ())),
            export_key=d.get("export_key", ""),
            engine=d.get("engine"),
        )


@dataclass(frozen=True)
class ConstantEntry:
    """A raw little-endian array shipped beside the graphs (C++ can ``fread`` it)."""

    name: str
    file: str
    dtype: str
    shape: tuple[int, ...]
    sha256: str

    def to_dict(self) -> dict:
        return {"name": self.name, "file": self.file, "dtype": self.dtype, "shape": list(self.shape),
                "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "ConstantEntry":
        return cls(d["name"], d["file"], d["dtype"], tuple(d["shape"]), d["sha256"])


@dataclass(frozen=True)
class Manifest:
    """The parsed manifest. ``directory`` is where its relative file names live.

    ``files`` holds the size + sha256 of every file the other fields name (engine plans excepted:
    their ``engine`` record carries its own sha256); :meth:`verified_path` checks a file against it
    before the runtime opens the file.
    """

    directory: Path
    profiles: tuple[Profile, ...]
    model_dims: ModelDims
    precision: str
    networks: dict[str, NetworkEntry]
    constants: dict[str, ConstantEntry]
    schedulers: dict[str, Any]
    tokenizers: dict[str, Any]
    image_processor: dict[str, Any]
    producer: dict[str, Any]
    checkpoints: dict[str, Any]
    files: dict[str, FileRecord] = field(default_factory=dict)

    @property
    def profile(self) -> Profile:
        """The default profile (the first): its size serves requests that give none."""
        return self.profiles[0]

    @property
    def cfg(self) -> bool:
        """Whether the loop networks run the [uncond, cond] batch (the same in every profile)."""
        return self.profiles[0].cfg

    def sizes(self) -> list[tuple[int, int]]:
        """The (height, width) sizes the profiles hold, in manifest order, each once."""
        return list(dict.fromkeys(p.size for p in self.profiles))

    def batches(self, size: tuple[int, int] | None = None) -> list[int]:
        """The batches of the profiles of ``size`` (None: of every size), ascending."""
        return sorted({p.batch for p in self.profiles if size is None or p.size == size})

    def profile_index(self, batch: int, size: tuple[int, int] | None = None) -> int:
        """The index of the first profile of ``batch`` (and ``size`` when given).

        Raises:
            ManifestError: no profile has that batch and size.
        """
        for index, p in enumerate(self.profiles):
            if p.batch == batch and (size is None or p.size == size):
                return index
        raise ManifestError(f"profile: expected one of {[p.name for p in self.profiles]}, found none of batch "
                            f"{batch}" + ("" if size is None else f" at {size[0]}x{size[1]}"))

    def network(self, name: str) -> NetworkEntry:
        if name not in self.networks:
            raise ManifestError(
                f"network: expected one of {sorted(self.networks)} in {self.directory / MANIFEST_NAME}, "
                f"found {name!r} (was it exported? e.g. unet_inpaint needs --inpaint)"
            )
        return self.networks[name]

    def path(self, file_name: str) -> Path:
        return self.directory / file_name

    def verified_path(self, file_name: str, label: str) -> Path:
        """``file_name``'s path once its size and sha256 match the manifest (hashed once per process).

        Raises:
            IntegrityError: the file is missing or differs from its record (``label`` says what it is).
        """
        record = self.files.get(file_name)
        if record is None:
            raise IntegrityError(f"{label}: expected a size + sha256 record for {file_name!r} in "
                                 f"{self.directory / MANIFEST_NAME}, found none")
        path = self.path(file_name)
        VERIFIED.verify(path, record, label)
        return path

    def verified_network(self, name: str) -> Path:
        """The ONNX path of network ``name`` once it and its external-data files are verified."""
        entry = self.network(name)
        for data_file in entry.external_data:
            self.verified_path(data_file, f"{name} (external data)")
        return self.verified_path(entry.onnx, name)

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "producer": self.producer,
            "precision": self.precision,
            "profiles": [p.to_dict() for p in self.profiles],
            "model_dims": self.model_dims.to_dict(),
            "checkpoints": self.checkpoints,
            "networks": [n.to_dict() for n in self.networks.values()],
            "constants": [c.to_dict() for c in self.constants.values()],
            "schedulers": self.schedulers,
            "tokenizers": self.tokenizers,
            "image_processor": self.image_processor,
            "files": {name: record.to_dict() for name, record in sorted(self.files.items())},
        }

    @classmethod
    def from_dict(cls, d: dict, directory: Path) -> "Manifest":
        """Validate ``d`` (schema, ranges, file names, records) and build the manifest.

        Raises:
            ManifestError: one line naming the field, what was expected and what was found.
        """
        from kandinsky_trt.runtime.contract.manifest_checks import check_manifest

        _check_version(d.get("schema_version") if isinstance(d, dict) else None)
        try:
            validate(d)
            check_manifest(d, Path(directory))
        except (SchemaViolation, ValueError) as err:
            raise ManifestError(f"{Path(directory) / MANIFEST_NAME}: {err}") from None
        return cls(
            directory=Path(directory),
            profiles=tuple(Profile(**p) for p in d["profiles"]),
            model_dims=ModelDims(**d["model_dims"]),
            precision=d["precision"],
            networks={n["name"]: NetworkEntry.from_dict(n) for n in d["networks"]},
            constants={c["name"]: ConstantEntry.from_dict(c) for c in d["constants"]},
            schedulers=d["schedulers"],
            tokenizers=d["tokenizers"],
            image_processor=d["image_processor"],
            producer=d["producer"],
            checkpoints=d["checkpoints"],
            files={name: FileRecord.from_dict(r) for name, r in d["files"].items()},
        )

    def save(self, tmp_dir: str | os.PathLike | None = None) -> Path:
        """Write ``manifest.json`` atomically (the temporary file in ``tmp_dir``, default beside it)."""
        path = self.directory / MANIFEST_NAME
        write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode(), tmp_dir)
        return path


def _check_version(version: object) -> None:
    if version == SCHEMA_VERSION:
        return
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        raise ManifestError(f"schema_version: expected {SCHEMA_VERSION}, found {version} ({REEXPORT_HINT})")
    raise ManifestError(f"schema_version: expected {SCHEMA_VERSION}, found {version!r} (a newer or foreign "
                        f"manifest; re-export with this kandinsky-trt)")


def _reject_constant(name: str) -> None:
    raise ValueError(f"a finite JSON number, found {name}")


def read_manifest_json(path: Path) -> dict:
    """The JSON object in ``path``: bounded in size, strict UTF-8, no NaN/Infinity, an object at the top."""
    try:
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            raise ManifestError(f"{path}: expected a manifest of at most {MAX_MANIFEST_BYTES} bytes, found {size}")
        text = path.read_bytes().decode("utf-8")
        data = json.loads(text, parse_constant=_reject_constant)
    except ManifestError:
        raise
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ManifestError(f"{path}: expected a JSON manifest, found unreadable content ({reason})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """Read and validate ``directory/manifest.json`` (files are verified later, when opened).

    Raises:
        ManifestError: the directory or file is missing, unreadable, of another schema version, or
            breaks the schema, a range or a file rule (one line naming the field).
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"artifacts: expected {path} (run `kandinsky-trt export` first), found no such file"
        )
    return Manifest.from_dict(read_manifest_json(path), path.parent)
