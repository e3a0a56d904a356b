"""The rules of a manifest that a JSON Schema cannot state, checked at load after the schema.

- Every file name (``onnx``, ``external_data``, ``engine.file``, constants' and tokenizers' ``file``)
  is a relative path that stays inside the artifacts directory, symlinks resolved.
- ``files`` records exactly the named files (engine plans may be absent: their ``engine`` record has
  its own sha256), and agrees with the sha256 the entries repeat; a constant's recorded byte size is
  its shape times its dtype's size.
- No tensor is larger than 2**31 elements; scheduler configs and tables are ones the runtime can use.
- Each profile's height and width are multiples of ``model_dims.latent_scale`` squared (diffusers' rounding).
- The profiles are distinct and share ``cfg``; every network resolves its graph's I/O at each of them,
  in manifest order (a profile dim such as ``B2`` takes the profile's value, the others agree within
  one profile); an engine maps every profile to one of its optimization profiles.

Each rule raises :class:`ManifestRuleError` with one line naming the field.
"""

from __future__ import annotations

import math
from pathlib import Path, PurePosixPath
from typing import Iterator

from kandinsky_trt.runtime.contract.schedulers import SchedulerConfigError, SchedulerTable, resolve_config

ITEM_SIZES = {"float32": 4, "float16": 2, "int64": 8, "bool": 1}
MAX_TENSOR_ELEMENTS = 2**31


class ManifestRuleError(ValueError):
    """A manifest that fits the schema but breaks a cross-field or file rule."""


def file_fields(d: dict) -> Iterator[tuple[str, str, bool]]:
    """(JSON path, file name, needs a ``files`` record) of every file field in a manifest dict.

    Tolerant of malformed input (skips what is not where it should be), so export can also list
    the files of an older manifest it is about to replace.
    """
    for i, net in enumerate(d.get("networks") or ()):
        if not isinstance(net, dict):
            continue
        yield f"networks[{i}].onnx", net.get("onnx"), True
        for j, name in enumerate(net.get("external_data") or ()):
            yield f"networks[{i}].external_data[{j}]", name, True
        if isinstance(net.get("engine"), dict):
            yield f"networks[{i}].engine.file", net["engine"].get("file"), False
    for i, constant in enumerate(d.get("constants") or ()):
        if isinstance(constant, dict):
            yield f"constants[{i}].file", constant.get("file"), True
    tokenizers = d.get("tokenizers") if isinstance(d.get("tokenizers"), dict) else {}
    for key, entry in tokenizers.items():
        if isinstance(entry, dict):
            yield f"tokenizers.{key}.file", entry.get("file"), True


def check_inside(directory: Path, name: object, where: str) -> Path:
    """``directory / name`` when ``name`` is a relative path that stays inside ``directory``."""
    if not isinstance(name, str) or not name:
        raise ManifestRuleError(f"{where}: expected a file name, found {name!r}")
    parts = PurePosixPath(name).parts
    if (name.startswith("/") or "\\" in name or "\x00" in name or ":" in name
            or any(p in ("..", ".") for p in name.split("/")) or not parts):
        raise ManifestRuleError(f"{where}: expected a relative file name inside the artifacts directory, "
                                f"found {name!r}")
    root = directory.resolve()
    path = (directory / name).resolve()
    if path == root or not path.is_relative_to(root):
        raise ManifestRuleError(f"{where}: expected a file inside the artifacts directory {root}, found {name!r} "
                                f"resolving to {path} (a symlink out of the directory?)")
    return directory / name


def _check_files(d: dict, directory: Path) -> None:
    records, named = d["files"], set()
    for where, name, needs_record in file_fields(d):
        check_inside(directory, name, where)
        named.add(name)
        if needs_record and name not in records:
            raise ManifestRuleError(f"files: expected a size + sha256 record for {name!r} ({where}), found none")
    for name in records:
        if name not in named:
            raise ManifestRuleError(f"files.{name}: expected only files the manifest names, found a record for "
                                    f"{name!r}, which no field names")


def _check_entries(d: dict) -> None:
    records = d["files"]
    for kind in ("networks", "constants"):
        names = [e["name"] for e in d[kind]]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ManifestRuleError(f"{kind}: expected unique names, found {duplicates} more than once")
    for i, net in enumerate(d["networks"]):
        if records[net["onnx"]]["sha256"] != net["onnx_sha256"]:
            raise ManifestRuleError(f"networks[{i}].onnx_sha256: expected the sha256 of files.{net['onnx']}, "
                                    f"found {net['onnx_sha256']}")
    for i, constant in enumerate(d["constants"]):
        record = records[constant["file"]]
        expected = math.prod(constant["shape"]) * ITEM_SIZES[constant["dtype"]]
        if record["size"] != expected:
            raise ManifestRuleError(
                f"constants[{i}] ({constant['name']}): expected {expected} bytes for {constant['dtype']} "
                f"{constant['shape']}, found files.{constant['file']}.size = {record['size']}")
        if record["sha256"] != constant["sha256"]:
            raise ManifestRuleError(f"constants[{i}].sha256: expected the sha256 of files.{constant['file']}, "
                                    f"found {constant['sha256']}")


def _check_schedulers(d: dict) -> None:
    for key, entry in d["schedulers"].items():
        try:
            resolve_config(entry["config"])
        except SchedulerConfigError as err:
            raise ManifestRuleError(f"schedulers.{key}.config: {err}") from None
        for steps, table in entry["tables"].items():
            try:
                parsed = SchedulerTable.from_manifest(table)
            except SchedulerConfigError as err:
                raise ManifestRuleError(f"schedulers.{key}.tables.{steps}: {err}") from None
            if len(parsed) != int(steps):
                raise ManifestRuleError(f"schedulers.{key}.tables.{steps}: expected {steps} steps, "
                                        f"found {len(parsed)}")


def _check_profile_sizes(d: dict) -> None:
    multiple = d["model_dims"]["latent_scale"] ** 2
    for i, profile in enumerate(d["profiles"]):
        for name in ("height", "width"):
            if profile[name] % multiple:
                raise ManifestRuleError(f"profiles[{i}].{name}: expected a multiple of {multiple} "
                                        f"(model_dims.latent_scale squared), found {profile[name]}")


def _check_profiles(profiles: list[dict]) -> None:
    labels = [(p["batch"], p["height"], p["width"]) for p in profiles]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise ManifestRuleError(f"profiles: expected distinct (batch, height, width), found {duplicates} "
                                "more than once")
    if len({p["cfg"] for p in profiles}) > 1:
        raise ManifestRuleError("profiles: expected one cfg for every profile, found both true and false")


def _profile_values(profile: dict) -> dict[str, int]:
    batch = profile["batch"]
    return {"B": batch, "B2": batch * (2 if profile["cfg"] else 1), "H": profile["height"], "W": profile["width"]}


def _check_resolved(where: str, graph: list[dict], resolved: list[dict], values: dict[str, int]) -> None:
    """``resolved`` is ``graph`` with every named dim replaced by one integer (``values`` fixes some)."""
    if [(t["name"], t["dtype"]) for t in resolved] != [(t["name"], t["dtype"]) for t in graph]:
        raise ManifestRuleError(f"{where}: expected the graph's tensors {[t['name'] for t in graph]} in order, "
                                f"found {[t['name'] for t in resolved]}")
    for g, r in zip(graph, resolved):
        if math.prod(r["shape"]) > MAX_TENSOR_ELEMENTS:
            raise ManifestRuleError(f"{where}.{r['name']}: expected at most 2**31 elements, found shape {r['shape']}")
        matches = len(g["shape"]) == len(r["shape"])
        for dim, size in zip(g["shape"], r["shape"]):
            matches = matches and (dim == size if isinstance(dim, int) else values.setdefault(dim, size) == size)
        if not matches:
            raise ManifestRuleError(f"{where}.{r['name']}: expected shape {g['shape']} at this profile "
                                    f"({values}), found {r['shape']}")


def _check_network_profiles(d: dict) -> None:
    profiles = d["profiles"]
    for i, net in enumerate(d["networks"]):
        where = f"networks[{i}] ({net['name']})"
        indices = [p["profile"] for p in net["profiles"]]
        if indices != list(range(len(profiles))):
            raise ManifestRuleError(f"{where}.profiles: expected the resolved I/O of profiles "
                                    f"{list(range(len(profiles)))} in order, found profiles {indices}")
        for j, (entry, profile) in enumerate(zip(net["profiles"], profiles)):
            values = _profile_values(profile)
            for kind in ("inputs", "outputs"):
                _check_resolved(f"{where}.profiles[{j}].{kind}", net[kind], entry[kind], values)
        engine = net["engine"]
        if engine is not None and len(engine["profiles"]) != len(profiles):
            raise ManifestRuleError(f"{where}.engine.profiles: expected one optimization profile per manifest "
                                    f"profile ({len(profiles)}), found {len(engine['profiles'])}")


def check_manifest(d: dict, directory: Path) -> None:
    """Every rule above, on a manifest dict that already fits the schema."""
    _check_files(d, directory)
    _check_entries(d)
    _check_profiles(d["profiles"])
    _check_profile_sizes(d)
    _check_network_profiles(d)
    _check_schedulers(d)
