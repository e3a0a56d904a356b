"""File integrity for artifacts: size + sha256 records, a per-process verification cache, atomic writes.

Every file a manifest names is recorded at export as a :class:`FileRecord` (byte size and sha256) and
checked against it before the runtime opens it. Hashing a full-size UNet's 2.46 GB of external data
takes seconds, so a verified file is remembered for the rest of the process, keyed by what ``stat``
says about it: (resolved path, device, inode, size, mtime_ns, ctime_ns). Any write to the file
changes its ctime, even one that restores its mtime with ``os.utime``, so a modified file misses the
cache; and the cache lives in memory only, so a new process always hashes afresh.

Standard library only (a deployed host imports this).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

_CHUNK = 4 << 20
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


class IntegrityError(KandinskyTrtError, ValueError):
    """A file that is missing, not a regular file, or differs from its manifest record."""


@dataclass(frozen=True)
class FileRecord:
    """What export wrote: the file's byte size and sha256 (lowercase hex)."""

    size: int
    sha256: str

    def to_dict(self) -> dict:
        return {"size": self.size, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict) -> "FileRecord":
        return cls(int(d["size"]), str(d["sha256"]))

    def line(self) -> str:
        return f"{self.size} bytes, sha256 {self.sha256[:16]}…"


def sha256_file(path: str | os.PathLike, chunk: int = _CHUNK) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> FileRecord:
    """Hash ``path`` for the manifest (export side)."""
    return FileRecord(os.stat(path).st_size, sha256_file(path))


def bytes_record(data: bytes | memoryview) -> FileRecord:
    return FileRecord(len(data), hashlib.sha256(data).hexdigest())


def _stat_key(path: Path) -> tuple:
    st = os.stat(path)
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class VerifiedFiles:
    """Files already hashed in this process and found to match their record (lock-protected)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._verified: dict[tuple, FileRecord] = {}

    def verify(self, path: Path, record: FileRecord, label: str) -> None:
        """Raise :class:`IntegrityError` unless ``path`` has ``record``'s size and sha256.

        ``label`` names what the file is (``"unet"``, ``"constant clip_mean"``) for the message.
        """
        path = Path(path)
        if not path.is_file():
            found = "a directory" if path.is_dir() else "no such file"
            raise IntegrityError(f"{label}: expected the file {path} ({record.line()}), found {found} (re-run export)")
        key = _stat_key(path)
        with self._lock:
            if self._verified.get(key) == record:
                return
        if key[3] != record.size:
            raise IntegrityError(f"{label}: {path} does not match the manifest's sha256 and size record: expected "
                                 f"{record.line()}, found {key[3]} bytes (modified or stale; re-run export)")
        digest = sha256_file(path)
        if digest != record.sha256:
            raise IntegrityError(f"{label}: {path} does not match the manifest's sha256 and size record: expected "
                                 f"{record.line()}, found sha256 {digest[:16]}… (modified or stale; re-run export)")
        if _stat_key(path) == key:  # not rewritten while it was being hashed
            with self._lock:
                self._verified[key] = record

    def clear(self) -> None:
        with self._lock:
            self._verified.clear()


# The process-wide cache: several Components on one directory hash each file once.
VERIFIED = VerifiedFiles()


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (changing it races other threads)."""
    try:
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | os.PathLike) -> None:
    """Give a file made by ``mkstemp`` (mode 0600) the mode any ``open()`` would: 0666 & ~umask."""
    os.chmod(path, 0o666 & ~_umask())


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes_atomic(path: str | os.PathLike, data: bytes | memoryview, tmp_dir: str | os.PathLike | None = None) -> None:
    """Write ``data`` to ``path`` through a unique temporary file, so readers never see half a file.

    The temporary file lives in ``tmp_dir`` (default: beside ``path``; it must be on the same file
    system), is flushed to disk, given the umask's mode like any other written file, then renamed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=tmp_dir or path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
