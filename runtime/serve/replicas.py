"""``kandinsky-trt serve --replicas N``: N tritonservers behind HAProxy, each one supervised.

The one-machine version of the Kubernetes topology in ``deploy/``: every replica is a whole
:class:`~kandinsky_trt.runtime.serve.launcher.TritonServer` (one per GPU with ``--device cuda``:
replica *i* sees only GPU *i* modulo the GPUs there are, through ``CUDA_VISIBLE_DEVICES``), on free
loopback ports and the same model repository; :mod:`balancer` listens on the public ports and
health-checks each replica's ``/v2/health/ready``. A supervisor thread per replica starts its
server, waits for it to exit and starts it again on the same ports (backing off 1 s, 2 s, ... 30 s
while starts fail), like a Deployment's restart policy.

Lifetime: SIGINT/SIGTERM stop the balancer first (no new requests), then every replica (SIGTERM,
Triton finishes what is in flight for up to ``exit_timeout_s``). HAProxy runs with a parent-death
signal; each tritonserver is started by its supervisor thread, which lives exactly as long as its
server, so a parent-death signal set by the launcher (``PR_SET_PDEATHSIG`` fires when the *thread*
that forked the child ends) kills it when the launcher is SIGKILLed.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from kandinsky_trt.runtime.serve import hygiene
from kandinsky_trt.runtime.serve.balancer import Balancer, BalancerConfig, BalancerError, HealthCheck, Upstream
from kandinsky_trt.runtime.serve.hygiene import check_ports_free
from kandinsky_trt.runtime.serve.launcher import ServerConfig, ServerError, TritonServer, free_port

log = logging.getLogger(__name__)
_ENV_LOCK = threading.Lock()  # CUDA_VISIBLE_DEVICES is set in os.environ around one replica's start
_MAX_BACKOFF_S = 30.0


@dataclass(frozen=True)
class ReplicaSpec:
    name: str
    server: ServerConfig  # concrete ports: a restart listens where the balancer looks
    cuda_device: str | None = None


class Replica:
    """A supervisor thread for one tritonserver: start, restart whenever it exits, stop."""

    def __init__(self, spec: ReplicaSpec) -> None:
        self.spec = spec
        self.restarts = 0
        self.started = threading.Event()  # set after the first start, successful or not
        self.error: BaseException | None = None  # why the first start failed
        self._server: TritonServer | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"kandinsky-replica-{spec.name}", daemon=True)

    @property
    def pid(self) -> int | None:
        process = self._server.process if self._server else None
        return process.pid if process else None

    def start(self) -> "Replica":
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        self._stop.set()
        process = self._server.process if self._server else None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # also cuts short a start in progress
        self._thread.join(timeout=timeout_s)

    def _launch(self) -> TritonServer:
        self._server = TritonServer(self.spec.server)
        with _cuda_device(self.spec.cuda_device):
            return self._server.start()

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                server = self._launch()
            except Exception as err:  # noqa: BLE001 - any failed start is retried, the first one reported
                if not self.started.is_set():
                    self.error = err
                    self.started.set()
                    return
                log.error("replica %s: restart failed (%s); next try in %.0f s", self.spec.name, err, backoff)
                self._stop.wait(backoff)
                backoff = min(2 * backoff, _MAX_BACKOFF_S)
                continue
            backoff = 1.0
            log.info("replica %s: tritonserver pid %d ready", self.spec.name, server.process.pid)
            self.started.set()
            self._supervise(server)
        if self._server is not None:
            self._server.stop()

    def _supervise(self, server: TritonServer) -> None:
        """Return when the server exited (after cleaning up after it) or when asked to stop."""
        process = server.process
        while not self._stop.wait(0.2):
            if process.poll() is not None:
                log.error("replica %s: tritonserver %d exited with code %s; restarting it:\n%s", self.spec.name,
                          process.pid, process.returncode, server.log_tail(5))
                _kill_group(process.pid)  # its Python stubs, if they outlived it
                server.stop()
                self.restarts += 1
                return


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@contextmanager
def _cuda_device(device: str | None):
    """``CUDA_VISIBLE_DEVICES=device`` in this process's environment while a replica starts (the
    launcher copies the environment at start); replicas with a device start one at a time."""
    if device is None:
        yield
        return
    with _ENV_LOCK:
        before = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = device
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
            else:
                os.environ["CUDA_VISIBLE_DEVICES"] = before


def cuda_devices(count: int) -> tuple[str, ...]:
    """The GPUs replicas are spread over: ``CUDA_VISIBLE_DEVICES`` if set, else ``nvidia-smi -L``'s."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return tuple(d.strip() for d in visible.split(",") if d.strip())
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    gpus = [line for line in out.splitlines() if line.startswith("GPU ")]
    return tuple(str(i) for i in range(len(gpus))) or tuple(str(i) for i in range(count))


@dataclass(frozen=True)
class ReplicaSetConfig:
    repository: Path
    count: int
    host: str  # where the balancer listens; replicas always on 127.0.0.1
    http_port: int  # the balancer's; 0 = a free port
    grpc_port: int
    metrics_port: int  # the balancer's stats and Prometheus metrics
    startup_timeout_s: float = 300.0
    cuda: bool = False  # one GPU per replica
    check: HealthCheck = HealthCheck()
    server_options: tuple[tuple[str, object], ...] = ()  # more ServerConfig fields, the same for every replica


def replica_specs(config: ReplicaSetConfig) -> list[ReplicaSpec]:
    devices = cuda_devices(config.count) if config.cuda else ()
    specs = []
    for i in range(config.count):
        server = ServerConfig(config.repository, host="127.0.0.1", http_port=free_port(), grpc_port=free_port(),
                              metrics_port=free_port(), startup_timeout_s=config.startup_timeout_s,
                              **dict(config.server_options))
        specs.append(ReplicaSpec(f"r{i}", server, devices[i % len(devices)] if devices else None))
    return specs


class ReplicaSet:
    """N supervised replicas and the balancer in front of them; a context manager."""

    def __init__(self, config: ReplicaSetConfig, workdir: Path) -> None:
        ports = {"--http-port": config.http_port, "--grpc-port": config.grpc_port,
                 "--metrics-port": config.metrics_port}
        check_ports_free(config.host, ports)
        self.config = replace(config, **{f[2:].replace("-", "_"): p or free_port(config.host)
                                         for f, p in ports.items()})
        self.replicas = [Replica(spec) for spec in replica_specs(self.config)]
        upstreams = tuple(Upstream(r.spec.name, r.spec.server.http_port, r.spec.server.grpc_port)
                          for r in self.replicas)
        c = self.config
        self.balancer = Balancer(BalancerConfig(c.host, c.http_port, c.grpc_port, upstreams, workdir,
                                                check=c.check, metrics_port=c.metrics_port))

    def start(self, stop: threading.Event) -> bool:
        """Start every replica, then the balancer once all are ready; False if ``stop`` was set meanwhile."""
        for replica in self.replicas:
            replica.start()
        for replica in self.replicas:
            while not replica.started.wait(0.2):
                if stop.is_set():
                    return False
            if replica.error is not None:
                if stop.is_set():
                    return False
                raise ServerError(f"replica {replica.spec.name}: {replica.error}")
        self.balancer.start()
        deadline = time.monotonic() + self.config.check.back_within_s + 30.0
        while not all(s.startswith("UP") for s in self.balancer.states().values()):
            if stop.wait(0.2):
                return False
            if time.monotonic() > deadline:
                raise BalancerError(f"haproxy: expected every replica up, found {self.balancer.states()}")
        return True

    def stop(self) -> None:
        self.balancer.stop()  # no new requests first
        threads = [threading.Thread(target=r.stop) for r in self.replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def describe(self) -> str:
        c = self.config
        lines = [f"  HTTP    http://{c.host}:{c.http_port}   (KServe v2; ready: /v2/health/ready = some replica ready)",
                 f"  gRPC    {c.host}:{c.grpc_port}",
                 f"  balancer HAProxy pid {self.balancer.process.pid}: http://{c.host}:{c.metrics_port}/metrics "
                 f"(Prometheus), /stats; socket {self.balancer.config.socket_path}",
                 f"  health  {c.check.describe()}"]
        for r in self.replicas:
            s = r.spec.server
            gpu = f", CUDA_VISIBLE_DEVICES={r.spec.cuda_device}" if r.spec.cuda_device is not None else ""
            lines.append(f"  replica {r.spec.name}: tritonserver pid {r.pid}, http {s.http_url}, grpc {s.grpc_url}, "
                         f"metrics {s.metrics_url}{gpu}")
        return "\n".join(lines)


def serve_replicas(args: argparse.Namespace, artifacts: Path, repository: Path, server_options: dict,
                   stop: threading.Event) -> int:
    """The ``serve --replicas N`` command: run until ``stop`` is set or the balancer dies.

    ``server_options`` are ServerConfig fields beyond the address (limits, cancel marks, timeouts),
    the same for every replica; ``repository`` is the model repository they all serve.
    """
    options = dict(server_options)
    startup_timeout_s = options.pop("startup_timeout_s")
    workdir = hygiene.make_dir("kandinsky-replicas")  # named after this PID, like the launcher's own
    try:
        config = ReplicaSetConfig(repository, args.replicas, args.host, args.http_port, args.grpc_port,
                                  args.metrics_port, startup_timeout_s, cuda=args.device == "cuda",
                                  check=HealthCheck(interval_s=args.health_interval),
                                  server_options=tuple(sorted(options.items())))
        return _run(ReplicaSet(config, workdir), artifacts, stop)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _run(replica_set: ReplicaSet, artifacts: Path, stop: threading.Event) -> int:
    try:
        if not replica_set.start(stop):
            print("stopped")
            return 0
        print(f"serving {artifacts} as model 'kandinsky' on {len(replica_set.replicas)} replicas behind HAProxy "
              f"(no authentication: keep it behind a gateway)\n{replica_set.describe()}\n"
              f"try: .venv/bin/kandinsky-trt client \"a red cat\" --url {replica_set.config.host}:"
              f"{replica_set.config.http_port} --out cat.png   (Ctrl-C stops)", flush=True)
        balancer = replica_set.balancer.process
        while not stop.wait(0.5):
            if balancer.poll() is not None:
                log.error("error: haproxy exited with code %s:\n%s", balancer.returncode,
                          replica_set.balancer.log_tail())
                return 1
    finally:
        replica_set.stop()
    print("stopped")
    return 0
