"""Complete a hand-written engine/TRT test manifest to the current schema (profiles, schedulers,
tokenizers, file records).

Those tests describe only networks at one static shape; a loadable manifest also needs the prior
and decoder scheduler configs, the two tokenizers and a size + sha256 record of every file it names.
A single ``profile`` becomes the one-element ``profiles``; a network without ``profiles`` gets its
static I/O as that profile's (engines map it to their optimization profile 0). Files that exist are
hashed; the others get a record repeating the sha256 the entry states (they are never opened).
"""

from __future__ import annotations

from pathlib import Path

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.integrity import file_record
from kandinsky_trt.runtime.contract.manifest_checks import file_fields


def _one_profile(d: dict) -> dict:
    """The single-profile shorthand of hand-written manifests, written out."""
    if "profile" in d:
        d = {key: value for key, value in d.items() if key != "profile"} | {"profiles": [d["profile"]]}
    networks = []
    for net in d["networks"]:
        net = {"profiles": [{"profile": 0, "inputs": net["inputs"], "outputs": net["outputs"]}], **net}
        if isinstance(net.get("engine"), dict):
            net["engine"] = {"profiles": [0], **net["engine"]}
        networks.append(net)
    return {**d, "networks": networks}


def complete_manifest(d: dict, directory: Path) -> dict:
    d = {**_one_profile(d), "schema_version": mf.SCHEMA_VERSION}
    d["schedulers"] = {"prior": {"config": {"_class_name": "UnCLIPScheduler"}, "tables": {}},
                       "decoder": {"config": {"_class_name": "DDIMScheduler"}, "tables": {}}, **d["schedulers"]}
    for which in ("prior", "decoder"):
        if which not in d["tokenizers"]:
            (directory / f"{which}_tokenizer.json").write_text("{}")
            d["tokenizers"] = {**d["tokenizers"], which: {"file": f"{which}_tokenizer.json", "max_length": 77,
                                                          "pad_id": 0}}
    stated = {n["onnx"]: n["onnx_sha256"] for n in d["networks"]}
    files = {}
    for _, name, needs_record in file_fields(d):
        if needs_record:
            path = directory / name
            files[name] = file_record(path).to_dict() if path.is_file() else {"size": 1, "sha256": stated[name]}
    d["files"] = files
    return d
