"""Start, wait for and stop a ``tritonserver`` process on a model repository.

The binary is the one bundled in the ``nvidia-pytriton`` wheel (Python backend only) or, failing
that, a ``tritonserver`` on PATH (NVIDIA's container, with its own backends). The bundled one needs
three things its wheel leaves to the caller (what pytriton itself does, read from its source):

- a backend directory whose ``python/`` holds ``libtriton_python.so`` *and* the stub built for this
  interpreter's version (the wheel keeps one stub per Python version apart);
- this interpreter's ``bin/`` first on PATH: the stub embeds Python and finds its prefix by looking
  up ``python3`` on PATH, so a venv's ``python3`` makes the model see the venv's packages (and
  ``kandinsky_trt``);
- this interpreter's own libdir first on ``LD_LIBRARY_PATH``: the stub links ``libpython3.X.so``
  by name, which otherwise resolves to the system's build of that version; mixing it with another
  build's standard library breaks e.g. multiprocessing inside the model.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError
from kandinsky_trt.runtime.serve import hygiene
from kandinsky_trt.runtime.serve.front import FrontConfig, HttpFront
from kandinsky_trt.runtime.serve.cancel import TOKEN_HEADER
from kandinsky_trt.runtime.serve.limits import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_REQUEST_BYTES
from kandinsky_trt.runtime.serve.watchdog import StubWatchdog

log = logging.getLogger(__name__)


class ServerError(KandinskyTrtError, RuntimeError):
    """tritonserver is missing, did not become ready, or exited."""


@dataclass(frozen=True)
class ServerConfig:
    """Where the server listens; ports of 0 are replaced by free ones when it starts."""

    repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    startup_timeout_s: float = 120.0
    log_verbose: int = 0
    exit_timeout_s: int = 10  # how long Triton waits for in-flight requests on SIGTERM
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # HTTP bodies over it: 413 from the front
    model: str = "kandinsky"  # the model the watchdog reloads when its stub dies ("" = no watchdog)
    cancel_dir: Path | None = None  # the front marks disconnected HTTP requests here (see cancel.py)
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # HTTP connections the front holds at once

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free now (the server binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def with_free_ports(config: ServerConfig) -> ServerConfig:
    ports = {f: getattr(config, f) or free_port(config.host) for f in ("http_port", "grpc_port", "metrics_port")}
    return dataclasses.replace(config, **ports)


@dataclass(frozen=True)
class TritonInstall:
    """A tritonserver binary, its backend directory and the environment it needs."""

    binary: Path
    backend_dir: Path | None  # None: the binary's own default (/opt/tritonserver/backends)
    env: dict


def _pytriton_root() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    return Path(spec.origin).parent if spec and spec.origin else None


def _bundled_backends(root: Path, workdir: Path) -> Path:
    """``workdir/backends/python`` = the wheel's Python backend + the stub for this interpreter."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerError(f"tritonserver: expected a Python backend stub for Python {version} in nvidia-pytriton, "
                          f"found none at {stub}")
    target = workdir / "backends" / "python"
    shutil.copytree(root / "tritonserver" / "backends" / "python", target, dirs_exist_ok=True)
    shutil.copy2(stub, target / "triton_python_backend_stub")
    return workdir / "backends"


def _environment(extra_libs: list[str]) -> dict:
    env = dict(os.environ)
    libdir = sysconfig.get_config_var("LIBDIR")
    libs = [p for p in [libdir, *extra_libs, env.get("LD_LIBRARY_PATH", "")] if p]
    env["LD_LIBRARY_PATH"] = ":".join(libs)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def find_tritonserver(workdir: Path) -> TritonInstall:
    """The bundled server (prepared under ``workdir``), else ``tritonserver`` on PATH."""
    root = _pytriton_root()
    if root is not None and (root / "tritonserver" / "bin" / "tritonserver").is_file():
        libs = root.parent / "nvidia_pytriton.libs"
        return TritonInstall(root / "tritonserver" / "bin" / "tritonserver", _bundled_backends(root, workdir),
                             _environment([str(libs)]))
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonInstall(Path(on_path), None, _environment([]))
    raise ServerError("tritonserver: expected the serve extra (pip install 'kandinsky-trt[serve]', which bundles "
                      "it) or a tritonserver on PATH (NVIDIA's Triton container), found neither")


def server_command(install: TritonInstall, config: ServerConfig, http_port: int, shm_prefix: str) -> list[str]:
    """Triton's HTTP on ``http_port`` (loopback, behind the front); models loaded explicitly so the
    watchdog can reload them; the Python stubs' shared memory named ``shm_prefix...``."""
    cmd = [str(install.binary), f"--model-repository={config.repository}",
           f"--http-address=127.0.0.1", f"--http-port={http_port}",
           f"--grpc-address={config.host}", f"--grpc-port={config.grpc_port}",
           f"--metrics-address={config.host}", f"--metrics-port={config.metrics_port}",
           "--allow-metrics=true", "--allow-gpu-metrics=false", f"--log-verbose={config.log_verbose}",
           "--exit-on-error=true", "--disable-auto-complete-config", f"--exit-timeout-secs={config.exit_timeout_s}",
           "--model-control-mode=explicit", "--load-model=*", "--strict-readiness=true",
           f"--backend-config=python,shm-region-prefix-name={shm_prefix}"]
    if config.cancel_dir is not None:  # the front's cancel token reaches the model as a request parameter
        cmd.append(f"--http-header-forward-pattern=^{TOKEN_HEADER}$")
    if install.backend_dir is not None:
        cmd.append(f"--backend-directory={install.backend_dir}")
    return cmd


def is_ready(config: ServerConfig, timeout_s: float = 2.0, http_url: str | None = None) -> bool:
    try:
        with urllib.request.urlopen(f"http://{http_url or config.http_url}/v2/health/ready", timeout=timeout_s) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _port_cause(log_text: str, config: ServerConfig) -> str | None:
    """The first line of Triton's log that says a port is taken, as ``--flag: expected a free port``."""
    for line in log_text.splitlines():
        if "already in use" in line or "Address already in use" in line:
            for flag, port in (("--grpc-port", config.grpc_port), ("--metrics-port", config.metrics_port)):
                if f":{port}" in line:
                    return f"{flag}: expected a free port, found {port} in use"
            return line.strip()
    return None


class TritonServer:
    """One tritonserver process behind the HTTP front: ``start()`` waits for readiness, ``stop()``
    ends it by PID and removes everything it made (work directory, shared-memory regions).

    The server dies with this process (parent-death signal) and creates files with umask 077; what a
    SIGKILLed launcher left is removed by the next one's start (:mod:`hygiene`). Use as a context
    manager.
    """

    def __init__(self, config: ServerConfig) -> None:
        hygiene.sweep()
        self.config = config
        self.process: subprocess.Popen | None = None
        self.front: HttpFront | None = None
        self.watchdog: StubWatchdog | None = None
        self._workdir = hygiene.make_dir("kandinsky-triton")
        self.shm_prefix = f"{hygiene.SHM_PREFIX}-{os.getpid()}-{self._workdir.name.rsplit('-', 1)[-1]}-"
        self.log_path = self._workdir / "tritonserver.log"
        self.triton_http_url = ""

    def start(self) -> "TritonServer":
        c = self.config
        hygiene.check_ports_free(c.host, {"--http-port": c.http_port, "--grpc-port": c.grpc_port,
                                          "--metrics-port": c.metrics_port})
        self.config = with_free_ports(c)
        try:
            self.front = HttpFront(FrontConfig(
                c.host, self.config.http_port, free_port("127.0.0.1"), c.max_request_bytes,
                str(c.cancel_dir) if c.cancel_dir else None, c.max_connections)).start()
            self.triton_http_url = f"127.0.0.1:{self.front.config.upstream_port}"
            self._launch()
            self._wait_ready()
            if self.config.model:
                self.watchdog = StubWatchdog(self.process.pid, self.triton_http_url, self.config.model,
                                             self.shm_prefix, self.config.startup_timeout_s)
                self.watchdog.notify = self.front.set_unavailable
                self.watchdog.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _launch(self) -> None:
        install = find_tritonserver(self._workdir)
        cmd = server_command(install, self.config, self.front.config.upstream_port, self.shm_prefix)
        log.info("starting %s", " ".join(cmd))
        with open(self.log_path, "wb") as out:
            # Own session: Ctrl-C in a terminal reaches us, and we stop the server ourselves; the
            # parent-death signal ends it when we die without stopping it.
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=install.env,
                                            start_new_session=True, preexec_fn=hygiene.child_setup(os.getpid()))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                text = self.log_tail(10_000)
                cause = _port_cause(text, self.config)
                first = f"{cause}\n" if cause else ""
                raise ServerError(f"{first}tritonserver: exited with code {self.process.returncode} before it was "
                                  f"ready; last log lines:\n{self.log_tail()}")
            hygiene.secure_regions(self.shm_prefix)  # as they appear, and at the latest before ready
            if is_ready(self.config, http_url=self.triton_http_url):
                hygiene.secure_regions(self.shm_prefix)
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver: expected ready within {self.config.startup_timeout_s:.0f} s, "
                          f"found not ready; last log lines:\n{self.log_tail()}")

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGTERM (Triton finishes in-flight requests for up to ``exit_timeout_s``, unloads models and
        exits), then SIGKILL its group if it has not exited in time (default: exit timeout + 10 s)."""
        if timeout_s is None:
            timeout_s = self.config.exit_timeout_s + 10.0
        if self.watchdog is not None:
            self.watchdog.stop()
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver %d did not exit in %.0f s; killing it", process.pid, timeout_s)
        if process is not None:
            try:
                os.killpg(process.pid, signal.SIGKILL)  # its own group: stubs that outlived it too
            except ProcessLookupError:
                pass
            process.wait(timeout=timeout_s)
        if self.front is not None:
            self.front.stop()
        hygiene.remove_regions(self.shm_prefix)
        shutil.rmtree(self._workdir, ignore_errors=True)

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
