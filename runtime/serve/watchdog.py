"""Readiness that tells the truth: reload the model when its Python stub process dies.

Triton 2.51 keeps answering ready (server and model) after a Python backend stub dies; every
inference then fails with "Stub process ... is not healthy" and nothing restarts it. The launcher
runs Triton with ``--model-control-mode=explicit``, and this watchdog polls the stub processes
(children of tritonserver, every :data:`POLL_S`). When one is gone (or a zombie) under a live
server (a killed process group takes the server too; then nothing is reloaded) it unloads the
model through Triton's repository API, which makes the model and ``/v2/health/ready`` (strict
readiness) answer not-ready at once, then loads it again: ready again once the new stubs have
loaded every network. It lives in the launcher process, so it works wherever ``kandinsky-trt
serve`` is the entrypoint (a container included), and probes need nothing but Triton's endpoints.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

from kandinsky_trt.runtime.serve.hygiene import secure_regions

log = logging.getLogger(__name__)
POLL_S = 0.5
# A killed server's process group loses its stubs and tritonserver together, but the stubs may be
# seen dead a moment before the server is: a stub death counts only if the server outlives this.
SERVER_GRACE_S = 0.2
STUB_NAME = "triton_python_backend_stub"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    """Running: neither gone nor a zombie waiting for its parent's ``wait``."""
    state = _stat(pid)
    return state is not None and state[0] != "Z"


def stubs_of(server_pid: int) -> set[int]:
    """PIDs of the live Python-backend stubs whose parent is ``server_pid``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        stat = _stat(int(entry.name))
        if stat is None or stat[1] != server_pid or stat[0] == "Z":
            continue
        try:
            if STUB_NAME in (entry / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found


def _post(url: str, timeout_s: float) -> None:
    request = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=timeout_s):
        pass


class StubWatchdog:
    """Polls ``server_pid``'s stubs; reloads ``model`` through ``http_url`` when one has died."""

    def __init__(self, server_pid: int, http_url: str, model: str, shm_prefix: str,
                 load_timeout_s: float = 600.0) -> None:
        self.server_pid, self.http_url, self.model = server_pid, http_url, model
        self.shm_prefix, self.load_timeout_s = shm_prefix, load_timeout_s
        self.reloads = 0
        # Told a one-line reason while the model is not loaded, None once it is (the HTTP front's
        # ``set_unavailable``: infer requests then get 503, which a balancer retries elsewhere).
        self.notify: Callable[[str | None], None] = lambda reason: None
        self._stop = threading.Event()
        self._stubs = stubs_of(server_pid)
        self._thread = threading.Thread(target=self._run, name="kandinsky-stub-watchdog", daemon=True)

    def start(self) -> "StubWatchdog":
        log.info("watching %d Python stub(s) of tritonserver %d", len(self._stubs), self.server_pid)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)  # a reload in flight ends with the server

    def _run(self) -> None:
        while not self._stop.wait(POLL_S):
            if not _alive(self.server_pid):
                return  # the server's own death: the front's connections fail, the launcher reports it
            secure_regions(self.shm_prefix)
            dead = {pid for pid in self._stubs if not _alive(pid)}
            if dead:
                if self._stop.wait(SERVER_GRACE_S) or not _alive(self.server_pid):
                    return  # the stubs died with the server (a killed process group): nothing to reload
                self._reload(dead)

    def _secure_while(self, loading: threading.Event) -> None:
        """New stubs get new regions: narrow them as they appear, not only after the load."""
        while not loading.wait(0.02):
            secure_regions(self.shm_prefix)

    def _reload(self, dead: set[int]) -> None:
        log.error("Python stub process(es) %s of model %r died; reloading the model (not ready meanwhile)",
                  sorted(dead), self.model)
        base = f"http://{self.http_url}/v2/repository/models/{self.model}"
        started = time.monotonic()
        loading = threading.Event()
        threading.Thread(target=self._secure_while, args=(loading,), daemon=True).start()
        self.notify(f"model {self.model!r}: expected ready, found it reloading after its model process died; "
                    f"retry")
        try:
            _post(f"{base}/unload", 60.0)
            _post(f"{base}/load", self.load_timeout_s)
        except (urllib.error.URLError, OSError) as err:
            log.error("reloading %r failed (%s); the model stays not ready", self.model, err)
            self._stubs = set()  # nothing left to watch; readiness says the truth (not ready)
            return
        finally:
            loading.set()
            secure_regions(self.shm_prefix)
        self.reloads += 1
        self.notify(None)
        self._stubs = stubs_of(self.server_pid)
        log.warning("model %r reloaded in %.1f s; watching stub(s) %s", self.model, time.monotonic() - started,
                    sorted(self._stubs))
