"""HAProxy in front of N tritonserver replicas: its configuration, its process, its state.

The balancer does what a Kubernetes Service with readiness probes does for pods, one level finer:

- **Health check**: ``GET /v2/health/ready`` on each replica's HTTP port every ``check_interval_s``;
  ``fall`` failures in a row take the replica out of rotation, ``rise`` successes put it back
  (Kubernetes' ``periodSeconds`` / ``failureThreshold`` / ``successThreshold``). A replica that
  stops answering is out within about ``fall * check_interval_s`` plus one check timeout; back
  ``rise * check_interval_s`` after it is ready again. The gRPC side *tracks* the HTTP side's
  verdict (one check per replica, as one readiness probe covers a pod's ports).
- **Retries**: seeded requests are idempotent (same seed, same image on every replica), so a request
  that failed on a replica is sent again to another one (``retry-on all-retryable-errors``: refused
  or reset connections, an empty answer, 500/502/503/504; ``option redispatch 1``: each retry goes to
  another replica where there is one). HAProxy retries a request only when its whole body is in its
  buffer: ``option http-buffer-request`` waits for the body before choosing a replica, and
  ``tune.bufsize`` (1 MiB) bounds the bodies that can be retried (larger ones are forwarded, not
  retried: a 3 MB body was served through it); buffers are taken per active connection only.
- **Balancing**: ``leastconn`` (requests take seconds; the replica with fewest in flight gets the next).
- **gRPC** over cleartext HTTP/2 (``proto h2`` on both sides). gRPC errors travel as HTTP 200 with a
  ``grpc-status`` trailer, so HAProxy retries gRPC only on connection failures and empty answers.

The process runs in the foreground of its own session with a parent-death signal (SIGKILL when the
launcher dies, even by SIGKILL) and is stopped by PID.
"""

from __future__ import annotations

import csv
import ctypes
import io
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError

log = logging.getLogger(__name__)
HTTP_BACKEND = "triton_http"
GRPC_BACKEND = "triton_grpc"
_PR_SET_PDEATHSIG = 1


class BalancerError(KandinskyTrtError, RuntimeError):
    """HAProxy is missing, refused its configuration, or exited."""


@dataclass(frozen=True)
class Upstream:
    """One replica as the balancer sees it."""

    name: str
    http_port: int
    grpc_port: int


@dataclass(frozen=True)
class HealthCheck:
    """Readiness probing of every replica (HAProxy ``inter`` / ``fall`` / ``rise`` / ``timeout check``)."""

    interval_s: float = 1.0
    fall: int = 2
    rise: int = 2
    timeout_s: float = 1.0

    @property
    def out_within_s(self) -> float:
        """Longest time from "stops answering ready" to "out of rotation"."""
        return self.fall * self.interval_s + self.timeout_s

    @property
    def back_within_s(self) -> float:
        """Longest time from "ready again" to "back in rotation"."""
        return self.rise * self.interval_s + self.timeout_s

    def describe(self) -> str:
        return (f"GET /v2/health/ready every {self.interval_s:g} s (timeout {self.timeout_s:g} s); out of rotation "
                f"after {self.fall} failures (<= {self.out_within_s:g} s), back after {self.rise} successes "
                f"(<= {self.back_within_s:g} s)")


@dataclass(frozen=True)
class BalancerConfig:
    host: str
    http_port: int
    grpc_port: int
    upstreams: tuple[Upstream, ...]
    workdir: Path
    metrics_port: int = 0  # HAProxy's Prometheus metrics (/metrics) and stats page (/stats); 0 = none
    check: HealthCheck = HealthCheck()
    retries: int = 3
    timeout_s: int = 600  # a request may take this long (client and server side)
    max_retry_body_bytes: int = 1 << 20  # tune.bufsize: bodies up to it can be retried

    @property
    def socket_path(self) -> Path:
        return self.workdir / "haproxy.sock"


def _ms(seconds: float) -> str:
    return f"{int(round(seconds * 1000))}ms"


def _head(c: BalancerConfig) -> list[str]:
    return [
        "global",
        "    maxconn 512",
        f"    tune.bufsize {c.max_retry_body_bytes}",
        f"    stats socket {c.socket_path} mode 600 level admin",
        "    log stderr format short local0 notice",
        "",
        "defaults",
        "    mode http",
        "    log global",
        "    option http-buffer-request",
        f"    retries {c.retries}",
        "    retry-on all-retryable-errors",
        "    option redispatch 1",
        "    timeout connect 2s",
        f"    timeout client {c.timeout_s}s",
        f"    timeout server {c.timeout_s}s",
        "    timeout http-request 60s",
        "    timeout queue 60s",
        f"    timeout check {_ms(c.check.timeout_s)}",
        "",
    ]


def render(config: BalancerConfig) -> str:
    """The HAProxy 2.6 configuration for ``config``."""
    c, chk = config, config.check
    lines = [
        *_head(c),
        "frontend kandinsky_http",
        f"    bind {c.host}:{c.http_port}",
        f"    default_backend {HTTP_BACKEND}",
        "",
        "frontend kandinsky_grpc",
        f"    bind {c.host}:{c.grpc_port} proto h2",
        f"    default_backend {GRPC_BACKEND}",
        "",
        *(_metrics_frontend(c) if c.metrics_port else []),
        f"backend {HTTP_BACKEND}",
        "    balance leastconn",
        "    option httpchk GET /v2/health/ready",
        "    http-check expect status 200",
        f"    default-server inter {_ms(chk.interval_s)} fall {chk.fall} rise {chk.rise}",
        *(f"    server {u.name} 127.0.0.1:{u.http_port} check" for u in c.upstreams),
        "",
        f"backend {GRPC_BACKEND}",
        "    balance leastconn",
        *(f"    server {u.name} 127.0.0.1:{u.grpc_port} proto h2 track {HTTP_BACKEND}/{u.name}"
          for u in c.upstreams),
        "",
    ]
    return "\n".join(lines)


def _metrics_frontend(c: BalancerConfig) -> list[str]:
    return ["frontend kandinsky_metrics",
            f"    bind {c.host}:{c.metrics_port}",
            "    http-request use-service prometheus-exporter if { path /metrics }",
            "    stats enable",
            "    stats uri /stats",
            "    stats refresh 5s",
            ""]


def find_haproxy() -> str:
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.access("/usr/sbin/haproxy", os.X_OK) else None)
    if not found:
        raise BalancerError("--replicas: expected HAProxy (Debian/Ubuntu: apt-get install haproxy), found none")
    return found


def die_with_parent(parent_pid: int):
    """``preexec_fn``: SIGKILL this child when the thread that started it dies (PR_SET_PDEATHSIG)."""
    libc = ctypes.CDLL(None, use_errno=True)

    def setup() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the launcher died before prctl: follow it now
            os.kill(os.getpid(), signal.SIGKILL)

    return setup


def stats(socket_path: Path, timeout_s: float = 2.0) -> list[dict]:
    """HAProxy's ``show stat`` (one dict per frontend, backend and server) from its stats socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout_s)
        s.connect(str(socket_path))
        s.sendall(b"show stat\n")
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    text = b"".join(chunks).decode().lstrip("# ")
    return list(csv.DictReader(io.StringIO(text)))


def server_states(socket_path: Path) -> dict[str, str]:
    """``{"r0": "UP", "r1": "DOWN", ...}`` of the HTTP backend (``UP 1/2``: going down, still in rotation)."""
    return {row["svname"]: row["status"] for row in stats(socket_path)
            if row["pxname"] == HTTP_BACKEND and row["svname"] not in ("FRONTEND", "BACKEND")}


def in_rotation(status: str) -> bool:
    return status.startswith("UP")


class Balancer:
    """One HAProxy process for ``config``: ``start()`` waits until it answers on its stats socket."""

    def __init__(self, config: BalancerConfig) -> None:
        self.config = config
        self.process: subprocess.Popen | None = None
        self.config_path = config.workdir / "haproxy.cfg"
        self.log_path = config.workdir / "haproxy.log"

    def start(self, timeout_s: float = 30.0) -> "Balancer":
        self.config_path.write_text(render(self.config))
        cmd = [find_haproxy(), "-db", "-f", str(self.config_path)]
        log.info("starting %s", " ".join(cmd))
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=die_with_parent(os.getpid()))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BalancerError(f"haproxy: exited with code {self.process.returncode} at start:\n{self.log_tail()}")
            try:
                server_states(self.config.socket_path)
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise BalancerError(f"haproxy: expected its stats socket within {timeout_s:.0f} s, found none")

    def states(self) -> dict[str, str]:
        return server_states(self.config.socket_path)

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (HAProxy closes at once), SIGKILL if it has not exited in time."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=timeout_s)
