"""Transactional writes into an artifacts directory: whatever instant export dies, the manifest holds.

The rules (README "Reliability"):

1. One export per directory at a time (``.ktrt-export.lock``, an ``flock`` the kernel drops when the
   process dies).
2. Every new file gets a content-addressed name, ``<stem>.<sha256[:16]><suffix>`` (``unet.3f2a….onnx``),
   so it never overwrites a file the committed manifest names with other bytes. Temporary files live
   in a staging folder ``.ktrt-export-XXXXXXXX/`` inside the directory (same file system: renames are
   atomic).
3. After each network, ``.ktrt-pending.json`` records what is finished, so a killed run's re-run
   reuses it (when its production hash matches and its files verify).
4. The manifest is committed last by an atomic rename; only then are the files that no manifest
   names any more deleted (the old manifest's, and content-addressed leftovers of killed runs).

A later export removes the staging folders of killed runs, and the ``.<network>.XXXXXXXX/`` folders
older versions left, matching only those exact name patterns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from kandinsky_trt.export.onnx_export import ExportError
from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.contract.integrity import FileRecord, bytes_record, file_record, follow_umask, fsync_dir
from kandinsky_trt.runtime.contract.manifest_checks import ManifestRuleError, check_inside, file_fields
from kandinsky_trt.runtime.contract.spec import BRIDGE_NETWORKS, NETWORKS, STEP_NETWORKS

log = logging.getLogger(__name__)

LOCK_NAME = ".ktrt-export.lock"
PENDING_NAME = ".ktrt-pending.json"
STAGING_PREFIX = ".ktrt-export-"
_STAGING_RE = re.compile(r"^\.ktrt-export-[A-Za-z0-9_]{8}$")  # tempfile.mkdtemp's 8 random characters
_LEGACY_TMP_RE = re.compile(r"^\.(?P<stem>[a-z0-9_]+)\.[A-Za-z0-9_]{8}$")  # onnx_export's TemporaryDirectory
_CONTENT_RE = re.compile(r"^(?P<stem>[A-Za-z0-9_]+)\.[0-9a-f]{16}(?P<suffix>(\.[A-Za-z0-9_]+)+)$")


def content_name(stem: str, suffix: str, record: FileRecord) -> str:
    return f"{stem}.{record.sha256[:16]}{suffix}"


class _DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``LOCK_NAME``; the file is removed on release."""

    def __init__(self, directory: Path) -> None:
        import fcntl

        self.path = directory / LOCK_NAME
        for _ in range(10):  # retry if a releasing export unlinked the file between our open and flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise ExportError(f"out_dir: expected no other export writing into {directory}, found one running "
                                  f"(it holds {self.path})") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
                return
            os.close(fd)
        raise ExportError(f"out_dir: could not lock {self.path}")

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


class ArtifactStore:
    """One export's writes into ``out_dir``; use as a context manager, :meth:`commit` at the end."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.records: dict[str, FileRecord] = {}
        self.pending: dict[str, dict] = {}  # network name -> NetworkEntry dict, finished this run
        self._lock = _DirectoryLock(out_dir)
        self._committed = False
        try:
            remove_stale_temporaries(out_dir)
            self.staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        except BaseException:
            self._lock.release()
            raise

    def __enter__(self) -> "ArtifactStore":
        return self

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        self._lock.release()

    def staging_dir(self, name: str) -> Path:
        path = self.staging / name
        path.mkdir()
        return path

    # -- writing ---------------------------------------------------------------------------------------

    def write_bytes(self, stem: str, suffix: str, data: bytes) -> str:
        """Write ``data`` as ``<stem>.<hash><suffix>``; returns the file name (recorded)."""
        record = bytes_record(data)
        name = content_name(stem, suffix, record)
        mf.write_bytes_atomic(self.out_dir / name, data, tmp_dir=self.staging)
        self.records[name] = record
        return name

    def place_file(self, src: Path, stem: str, suffix: str) -> str:
        """Move the finished file ``src`` (in staging) to its content-addressed name; returns the name."""
        record = file_record(src)
        name = content_name(stem, suffix, record)
        follow_umask(src)
        os.replace(src, self.out_dir / name)
        self.records[name] = record
        return name

    def place_network(self, files: list[Path], stem: str) -> tuple[str, tuple[str, ...]]:
        """Place an exported graph (``files[0]``) and its external data; returns (onnx, data names).

        The data files are renamed first, then the graph is rewritten to point at their new names.
        """
        import onnx
        from onnx.external_data_helper import _get_all_tensors

        renames = {src.name: self.place_file(src, stem, ".onnx.data") for src in files[1:]}
        if not renames:
            return self.place_file(files[0], stem, ".onnx"), ()
        model = onnx.load(str(files[0]), load_external_data=False)
        for tensor in _get_all_tensors(model):
            if tensor.data_location == onnx.TensorProto.EXTERNAL:
                for item in tensor.external_data:
                    if item.key == "location":
                        item.value = renames[item.value]
        return self.write_bytes(stem, ".onnx", model.SerializeToString()), tuple(renames.values())

    def adopt(self, names: tuple[str, ...], records: dict[str, FileRecord]) -> None:
        """Keep files from an earlier manifest or run (their records go into the new manifest)."""
        for name in names:
            self.records[name] = records[name]

    def checkpoint(self, entry: mf.NetworkEntry) -> None:
        """Record a finished network in ``PENDING_NAME`` so a killed run's re-run can reuse it."""
        self.pending[entry.name] = entry.to_dict()
        files = {n: r.to_dict() for n, r in self.records.items()}
        data = json.dumps({"networks": list(self.pending.values()), "files": files}).encode()
        mf.write_bytes_atomic(self.out_dir / PENDING_NAME, data, tmp_dir=self.staging)

    # -- committing ------------------------------------------------------------------------------------

    def commit(self, manifest: mf.Manifest) -> None:
        """Save ``manifest`` atomically, then delete what only older manifests and runs named."""
        old = referenced_files(self.out_dir)
        manifest = dataclasses.replace(manifest, files=self._records_for(manifest))
        manifest.save(tmp_dir=self.staging)
        self._committed = True
        (self.out_dir / PENDING_NAME).unlink(missing_ok=True)
        keep = set(_names(manifest.to_dict()))
        for name in sorted((old | _content_named(self.out_dir)) - keep):
            try:
                (self.out_dir / name).unlink()
                log.info("removed %s (no longer in the manifest)", name)
            except (FileNotFoundError, IsADirectoryError, PermissionError):
                pass
        fsync_dir(self.out_dir)

    def _records_for(self, manifest: mf.Manifest) -> dict[str, FileRecord]:
        return {name: self.records[name] for name, needs in _fields(manifest.to_dict()) if needs}


def _fields(d: dict) -> list[tuple[str, bool]]:
    return [(name, needs) for _, name, needs in file_fields(d)]


def _names(d: dict) -> list[str]:
    return [name for name, _ in _fields(d)]


def referenced_files(out_dir: Path) -> set[str]:
    """The files named by ``out_dir``'s manifest (any schema version) and pending record, inside it."""
    names = set()
    for file_name in (mf.MANIFEST_NAME, PENDING_NAME):
        try:
            data = mf.read_manifest_json(out_dir / file_name)
        except mf.ManifestError:
            continue
        for where, name, _ in file_fields(data):
            try:
                check_inside(out_dir, name, where)
            except ManifestRuleError:
                continue  # never delete outside the directory, whatever an old manifest says
            names.add(name)
    return names


def _content_named(out_dir: Path) -> set[str]:
    """Files named like this module names them, with a stem export writes (leftovers of killed runs)."""
    stems = set(NETWORKS) | set(STEP_NETWORKS) | set(BRIDGE_NETWORKS) | {"zero_image_embeds", "clip_mean", "clip_std",
                                                 "prior_tokenizer", "decoder_tokenizer"}
    return {p.name for p in out_dir.iterdir()
            if (m := _CONTENT_RE.match(p.name)) and m["stem"] in stems and p.is_file() and not p.is_symlink()}


def remove_stale_temporaries(out_dir: Path) -> None:
    """Remove staging folders of killed exports (called with the directory lock held)."""
    for path in out_dir.iterdir():
        legacy = _LEGACY_TMP_RE.match(path.name)
        if _STAGING_RE.match(path.name) or (legacy and legacy["stem"] in NETWORKS):
            if path.is_dir() and not path.is_symlink():
                log.info("removing %s, left by an interrupted export", path)
                shutil.rmtree(path, ignore_errors=True)


def read_pending(out_dir: Path) -> tuple[list[mf.NetworkEntry], dict[str, FileRecord]]:
    """The networks a killed run finished (empty when there is no readable pending record)."""
    try:
        data = mf.read_manifest_json(out_dir / PENDING_NAME)
        entries = [mf.NetworkEntry.from_dict(n) for n in data["networks"]]
        records = {name: FileRecord.from_dict(r) for name, r in data["files"].items()}
    except (mf.ManifestError, KeyError, TypeError, ValueError):
        return [], {}
    return entries, records
