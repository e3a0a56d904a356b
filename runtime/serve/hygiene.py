"""What a server leaves behind: nothing that outlives its launcher, nothing readable by others.

- tritonserver runs with a parent-death signal (``PR_SET_PDEATHSIG``: SIGKILL when the launcher
  dies, even by SIGKILL) and umask 077. The stubs exit on their own when tritonserver is gone (the
  Python backend's stub watches its parent), which the tests check.
- The Python backend's shared-memory regions (where requests and responses pass, prompts included)
  are named ``kandinsky-shm-<pid>-...`` and narrowed to mode 0600 (:func:`secure_regions`).
- Every temporary directory and shared-memory region is named with the launcher's PID
  (``kandinsky-triton-<pid>-*``, ``kandinsky-repo-<pid>-*``, ``kandinsky-cancel-<pid>-*``, ``kandinsky-replicas-<pid>-*``, ``/dev/shm/kandinsky-shm-<pid>-*``);
  :func:`sweep` removes those of launchers that are gone (and only the current user's), at every
  start, so what a SIGKILLed launcher left is removed by the next one.
- :func:`check_ports_free` says which port is taken before anything starts.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
import shutil
import signal
import socket
import tempfile
from pathlib import Path

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

log = logging.getLogger(__name__)
SHM_DIR = Path("/dev/shm")
SHM_PREFIX = "kandinsky-shm"
DIR_PREFIXES = ("kandinsky-triton", "kandinsky-repo", "kandinsky-cancel", "kandinsky-replicas")
_OWNED = re.compile(r"^(?:kandinsky-triton|kandinsky-repo|kandinsky-cancel|kandinsky-replicas|kandinsky-shm)-(\d+)-")
_PR_SET_PDEATHSIG = 1


class PortInUse(KandinskyTrtError, OSError):
    """A port the server was asked to listen on is taken by another process."""


def owned_name(prefix: str) -> str:
    """``prefix-<this pid>-``: the start of a name :func:`sweep` can attribute to its launcher."""
    return f"{prefix}-{os.getpid()}-"


def make_dir(prefix: str) -> Path:
    """A private temporary directory named after this process (see :func:`sweep`)."""
    return Path(tempfile.mkdtemp(prefix=owned_name(prefix)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stale(path: Path) -> bool:
    match = _OWNED.match(path.name)
    if not match or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
        return False
    try:
        return path.lstat().st_uid == os.getuid()
    except OSError:
        return False


def sweep() -> list[Path]:
    """Remove directories and shared-memory regions of this user's launchers that are gone."""
    removed = []
    candidates = [p for p in Path(tempfile.gettempdir()).glob("kandinsky-*")]
    if SHM_DIR.is_dir():
        candidates += list(SHM_DIR.glob(f"{SHM_PREFIX}-*"))
    for path in candidates:
        if not _stale(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    if removed:
        log.info("removed %d leftovers of dead launchers: %s", len(removed), ", ".join(str(p) for p in removed))
    return removed


def secure_regions(prefix: str) -> int:
    """chmod 0600 the shared-memory regions named ``prefix...``; returns how many were changed.

    The Python backend creates its regions with mode 0644 whatever the umask (Boost.Interprocess
    sets the mode explicitly), so the launcher narrows them: right after a load, before readiness,
    and on every watchdog poll.
    """
    changed = 0
    if SHM_DIR.is_dir():
        for path in SHM_DIR.glob(f"{prefix}*"):
            try:
                if path.stat().st_mode & 0o077:
                    path.chmod(0o600)
                    changed += 1
            except OSError:
                continue
    return changed


def remove_regions(prefix: str) -> None:
    """Remove the shared-memory regions whose names start with ``prefix`` (one server's)."""
    if SHM_DIR.is_dir():
        for path in SHM_DIR.glob(f"{prefix}*"):
            path.unlink(missing_ok=True)


def child_setup(parent_pid: int):
    """``preexec_fn`` for the server: die with the launcher, create files readable by no one else."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        os.umask(0o077)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the launcher died before prctl: follow it now
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """``{"--http-port": 8000, ...}``: raise :class:`PortInUse` naming the first taken one (0 = any)."""
    for flag, port in ports.items():
        if not port:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds: TIME_WAIT is fine
            try:
                s.bind((host, port))
            except OSError as err:
                if err.errno == errno.EADDRINUSE:
                    raise PortInUse(f"{flag}: expected a free port, found {port} in use") from None
                raise PortInUse(f"{flag}: expected a port that {host} can bind, found {port}: {err.strerror}") from None
