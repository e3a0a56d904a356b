"""``manifest.json``: the flat, versioned description of an artifacts directory.

Written by export (and updated by the engine build), read by every backend and by C++ hosts. Its JSON
Schema lives beside this module (``manifest.schema.json``). Standard library only.

Layout (schema version 1)::

    schema_version, producer{...}, precision, profile{batch,height,width,cfg}, model_dims{...},
    checkpoints{prior|decoder|inpaint: {path, sha256}},
    networks[{name, onnx, onnx_sha256, external_data[], precision, fp32_islands[],
              inputs[{name,dtype,shape}], outputs[...], engine{...}|null}],
    constants[{name, file, dtype, shape, sha256}],
    schedulers{prior|decoder|decoder_ddpm: {config{...}, tables{steps: table}}},
    tokenizers{prior|decoder: {file, max_length, pad_id}},
    image_processor{size, mean, std}  (CLIP preprocessing for ``interpolate`` image conditions)
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kandinsky_trt.runtime.errors import KandinskyTrtError
from kandinsky_trt.runtime.spec import ModelDims, Profile, ResolvedNetwork, ResolvedTensor

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
SCHEMA_PATH = Path(__file__).with_name("manifest.schema.json")


class ManifestError(KandinskyTrtError, ValueError):
    """A manifest that is missing, unreadable, of another schema version, or inconsistent."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling, so readers never see half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tensors(entries: list[dict]) -> tuple[ResolvedTensor, ...]:
    return tuple(ResolvedTensor(e["name"], e["dtype"], tuple(e["shape"])) for e in entries)


@dataclass(frozen=True)
class NetworkEntry:
    """One network of the manifest: its ONNX file, its resolved I/O and (after a build) its engine."""

    name: str
    onnx: str
    onnx_sha256: str
    precision: str
    inputs: tuple[ResolvedTensor, ...]
    outputs: tuple[ResolvedTensor, ...]
    external_data: tuple[str, ...] = ()
    fp32_islands: tuple[str, ...] = ()
    export_key: str = ""  # hash of what produced the ONNX: reuse only when it matches
    engine: dict | None = None

    @property
    def resolved(self) -> ResolvedNetwork:
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
    """The parsed manifest. ``directory`` is where its relative file names live."""

    directory: Path
    profile: Profile
    model_dims: ModelDims
    precision: str
    networks: dict[str, NetworkEntry]
    constants: dict[str, ConstantEntry]
    schedulers: dict[str, Any]
    tokenizers: dict[str, Any]
    image_processor: dict[str, Any]
    producer: dict[str, Any]
    checkpoints: dict[str, Any]

    def network(self, name: str) -> NetworkEntry:
        if name not in self.networks:
            raise ManifestError(
                f"network: expected one of {sorted(self.networks)} in {self.directory / MANIFEST_NAME}, "
                f"found {name!r} (was it exported? e.g. unet_inpaint needs --inpaint)"
            )
        return self.networks[name]

    def path(self, file_name: str) -> Path:
        return self.directory / file_name

    def to_dict(self) -> dict:
        return {
            "schema_version": SCHEMA_VERSION,
            "producer": self.producer,
            "precision": self.precision,
            "profile": self.profile.to_dict(),
            "model_dims": self.model_dims.to_dict(),
            "checkpoints": self.checkpoints,
            "networks": [n.to_dict() for n in self.networks.values()],
            "constants": [c.to_dict() for c in self.constants.values()],
            "schedulers": self.schedulers,
            "tokenizers": self.tokenizers,
            "image_processor": self.image_processor,
        }

    @classmethod
    def from_dict(cls, d: dict, directory: Path) -> "Manifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ManifestError(f"schema_version: expected {SCHEMA_VERSION}, found {version!r}")
        try:
            return cls(
                directory=Path(directory),
                profile=Profile(**d["profile"]),
                model_dims=ModelDims(**d["model_dims"]),
                precision=d["precision"],
                networks={n["name"]: NetworkEntry.from_dict(n) for n in d["networks"]},
                constants={c["name"]: ConstantEntry.from_dict(c) for c in d["constants"]},
                schedulers=d["schedulers"],
                tokenizers=d["tokenizers"],
                image_processor=d["image_processor"],
                producer=d["producer"],
                checkpoints=d["checkpoints"],
            )
        except (KeyError, TypeError) as err:
            raise ManifestError(f"{directory / MANIFEST_NAME}: malformed manifest ({err!r})") from None

    def save(self) -> Path:
        path = self.directory / MANIFEST_NAME
        write_bytes_atomic(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        return path


def load_manifest(directory: str | os.PathLike) -> Manifest:
    """Read ``directory/manifest.json``.

    Raises:
        ManifestError: the directory or file is missing, is not JSON, or has another schema version.
    """
    path = Path(directory) / MANIFEST_NAME
    if not path.is_file():
        raise ManifestError(
            f"artifacts: expected {path} (run `kandinsky-trt export` first), found no such file"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ManifestError(f"{path}: expected a JSON manifest, found unreadable content ({err})") from None
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return Manifest.from_dict(data, path.parent)
