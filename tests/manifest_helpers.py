"""Complete a hand-written engine/TRT test manifest to schema 2 (schedulers, tokenizers, file records).

Those tests describe only networks; a loadable manifest also needs the prior and decoder scheduler
configs, the two tokenizers and a size + sha256 record of every file it names. Files that exist are
hashed; the others get a record repeating the sha256 the entry states (they are never opened).
"""

from __future__ import annotations

from pathlib import Path

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.integrity import file_record
from kandinsky_trt.runtime.contract.manifest_checks import file_fields


def complete_manifest(d: dict, directory: Path) -> dict:
    d = {**d, "schema_version": mf.SCHEMA_VERSION}
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
