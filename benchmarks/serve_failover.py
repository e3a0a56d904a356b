"""Failover of ``kandinsky-trt serve --replicas N`` under a bounded client load, measured.

    python -m kandinsky_trt.benchmarks.serve_failover --artifacts A --out benchmarks/results --name STEM

Starts ``serve --replicas 2`` on free loopback ports and computes the serial Python API's image
for every seed meanwhile; then ``--clients`` threads send seeded text2img requests through the
balancer's HTTP port back to back (bounded by ``--max-requests`` and the phase time limits) while
it SIGKILLs one replica's ``tritonserver``, then the other replica's model process (the Python
backend stub), each time polling HAProxy's stats socket every 50 ms for the seconds until the
replica is out of rotation and back in. Then SIGTERM to the launcher: how long it takes, and
whether any process it ran (haproxy, every tritonserver and stub seen) or any port is left.
Every answer is compared bit for bit with the Python API's image for its seed; ``retried`` is
HAProxy's count (``wretr`` + ``wredis`` of the HTTP backend). Writes ``STEM.json`` and ``STEM.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from kandinsky_trt.benchmarks.environment import MachineInfo, collect_versions

log = logging.getLogger(__name__)
PROMPT = "a red cat"
STUB = "triton_python_backend_stub"


@dataclass(frozen=True)
class FailoverConfig:
    artifacts: Path
    replicas: int = 2
    clients: int = 2
    seeds: int = 4  # request i uses seed i % seeds
    steps: int = 2
    max_requests: int = 400
    startup_timeout_s: float = 240.0
    phase_timeout_s: float = 60.0  # per wait: out of rotation, back in rotation
    stub_out_timeout_s: float = 20.0  # a dead stub must take its replica out "within seconds"
    # Checks faster than a tiny model's restart (~1-2 s on an idle 2-core VM), so the balancer is
    # seen taking the dead replica out; the default (1 s) would miss a restart that quick.
    health_interval_s: float = 0.25


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
        except (OSError, IndexError, ValueError):
            continue
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def port_free(port: int) -> bool:
    from kandinsky_trt.runtime.serve.hygiene import check_ports_free

    try:
        check_ports_free("127.0.0.1", {"port": port})
    except OSError:
        return False
    return True


class ServeProcess:
    """``kandinsky-trt serve --replicas N`` as a child process, and the processes it runs."""

    def __init__(self, config: FailoverConfig) -> None:
        from kandinsky_trt.runtime.serve.launcher import free_port

        self.ports = {name: free_port() for name in ("http", "grpc", "metrics")}
        cmd = [sys.executable, "-m", "kandinsky_trt.runtime.cli.main", "serve", "--replicas", str(config.replicas),
               "--artifacts", str(config.artifacts), "--startup-timeout", str(config.startup_timeout_s),
               "--health-interval", str(config.health_interval_s),
               *(a for name, port in self.ports.items() for a in (f"--{name}-port", str(port)))]
        self.process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.seen: set[int] = set()  # every haproxy / tritonserver / stub PID seen
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    def output(self) -> str:
        return "".join(self.lines)

    def wait_serving(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(line.startswith("serving ") for line in self.lines):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"serve --replicas: expected 'serving' within {timeout_s:.0f} s, found:\n"
                                   + self.output()[-4000:])
            time.sleep(0.2)
        time.sleep(0.2)  # the rest of the banner

    def _field(self, marker: str) -> str:
        for line in self.lines:
            if marker in line:
                return line.split(marker, 1)[1].split()[0].rstrip(",")
        raise RuntimeError(f"serve --replicas: expected {marker!r} in its banner, found:\n{self.output()}")

    @property
    def socket_path(self) -> Path:
        return Path(self._field("; socket "))

    def triton_pid(self, replica: str) -> int:
        """The replica's current tritonserver, found by its gRPC port (the same across restarts)."""
        banner = [line for line in self.lines if line.startswith(f"  replica {replica}: ")]
        if not banner:
            raise RuntimeError(f"replica {replica}: expected it in the banner, found:\n{self.output()}")
        grpc_port = banner[0].split(" grpc 127.0.0.1:", 1)[1].split(",")[0]
        for pid in _children(self.process.pid):
            cmd = _cmdline(pid)
            if "tritonserver" in cmd and f"--grpc-port={grpc_port} " in cmd:
                return pid
        raise RuntimeError(f"replica {replica}: expected a tritonserver with --grpc-port={grpc_port}, found none")

    def stub_pid(self, replica: str) -> int:
        stubs = [p for p in _children(self.triton_pid(replica)) if STUB in _cmdline(p)]
        if not stubs:
            raise RuntimeError(f"replica {replica}: expected a {STUB} child of its tritonserver, found none")
        return stubs[0]

    def all_ports(self) -> list[int]:
        """The balancer's ports and every replica's (from the banner)."""
        banner = [line for line in self.lines if line.startswith("  replica ")]
        return [*self.ports.values(), *(int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", "".join(banner)))]

    def note_processes(self) -> None:
        """Remember every haproxy, tritonserver and stub under the launcher (checked after it stops)."""
        for pid in _children(self.process.pid):
            self.seen.add(pid)
            self.seen.update(p for p in _children(pid) if STUB in _cmdline(p))

    def kill_leftovers(self) -> list[int]:
        """SIGKILL, by PID, whatever of ours is still alive; returns those PIDs."""
        left = [pid for pid in sorted(self.seen) if alive(pid)]
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)
        return left


def reference_images(config: FailoverConfig) -> dict[int, np.ndarray]:
    """The serial Python API's images for every seed, with the same artifacts (``generator=seed``)."""
    from kandinsky_trt.runtime import KandinskyCombinedPipeline
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(config.artifacts) as components:
        pipe = KandinskyCombinedPipeline(components=components)
        size = dict(height=components.profile.height, width=components.profile.width)
        return {seed: np.stack([np.asarray(i) for i in pipe(
            PROMPT, num_inference_steps=config.steps, prior_num_inference_steps=config.steps, generator=seed,
            **size).images])[None] for seed in range(config.seeds)}


@dataclass
class Outcome:
    seed: int
    ok: bool
    equal: bool
    error: str = ""


class Load:
    """``clients`` threads sending seeded text2img requests through the balancer until stopped."""

    def __init__(self, config: FailoverConfig, url: str, references: dict[int, np.ndarray], size: dict) -> None:
        self.config, self.url, self.references, self.size = config, url, references, size
        self.outcomes: list[Outcome] = []
        self._next = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(config.clients)]

    def start(self) -> "Load":
        for t in self._threads:
            t.start()
        return self

    def done(self) -> int:
        return len(self.outcomes)

    def wait_for(self, more: int, timeout_s: float) -> None:
        target, deadline = self.done() + more, time.monotonic() + timeout_s
        while self.done() < target and time.monotonic() < deadline and not self._stop.is_set():
            time.sleep(0.05)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=120)

    def _client(self) -> None:
        from kandinsky_trt.runtime.serve.client import ClientError, Target, infer, item_arrays

        c = self.config
        while not self._stop.is_set():
            with self._lock:
                if self._next >= c.max_requests:
                    self._stop.set()
                    return
                seed, self._next = self._next % c.seeds, self._next + 1
            fields = dict(task="text2img", prompt=PROMPT, seed=seed, num_inference_steps=c.steps,
                          prior_steps=c.steps, **self.size)
            try:
                images = infer(Target(self.url, "http", 120.0), item_arrays(fields))["images"]
                outcome = Outcome(seed, True, bool(np.array_equal(images, self.references[seed])))
            except ClientError as err:
                outcome = Outcome(seed, False, False, str(err))
            with self._lock:
                self.outcomes.append(outcome)


def _wait_state(socket_path: Path, replica: str, want_in: bool, timeout_s: float) -> float | None:
    """Seconds until ``replica`` is in (or out of) rotation per HAProxy, polled every 50 ms; None if never."""
    from kandinsky_trt.runtime.serve.balancer import in_rotation, server_states

    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if in_rotation(server_states(socket_path)[replica]) == want_in:
            return round(time.monotonic() - start, 2)
        time.sleep(0.05)
    return None


def _retries(socket_path: Path) -> int:
    from kandinsky_trt.runtime.serve.balancer import HTTP_BACKEND, stats

    row = next(r for r in stats(socket_path) if r["pxname"] == HTTP_BACKEND and r["svname"] == "BACKEND")
    return int(row["wretr"] or 0) + int(row["wredis"] or 0)


def run_phase(serve: ServeProcess, load: Load, kill: str, replica: str) -> dict:
    """Kill ``replica``'s tritonserver (``kill_server``) or its stub (``kill_stub``) mid-load; measure."""
    c = load.config
    load.wait_for(2 * c.clients, c.phase_timeout_s)  # under load
    serve.note_processes()
    before_done, before_retries = load.done(), _retries(serve.socket_path)
    pid = serve.triton_pid(replica) if kill == "kill_server" else serve.stub_pid(replica)
    os.kill(pid, signal.SIGKILL)
    out_s = _wait_state(serve.socket_path, replica, False,
                        c.phase_timeout_s if kill == "kill_server" else c.stub_out_timeout_s)
    back_s = None
    if out_s is not None:
        back_s = _wait_state(serve.socket_path, replica, True, c.phase_timeout_s)
        back_s = None if back_s is None else round(out_s + back_s, 2)
    serve.note_processes()
    load.wait_for(2 * c.clients, c.phase_timeout_s)  # and served again after it
    return {"kill": kill, "replica": replica, "pid": pid, "out_of_rotation_s": out_s,
            "back_in_rotation_s": back_s, "requests": load.done() - before_done,
            "retried": _retries(serve.socket_path) - before_retries}


def stop_and_check(serve: ServeProcess) -> dict:
    """SIGTERM to the launcher: seconds to exit, its exit code, what is left (PIDs, ports)."""
    serve.note_processes()
    start = time.monotonic()
    serve.process.send_signal(signal.SIGTERM)
    try:
        code = serve.process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        code = None
    seconds = round(time.monotonic() - start, 2)
    deadline = time.monotonic() + 10  # a stub may take a moment to notice its parent is gone
    while any(alive(p) for p in serve.seen) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = serve.kill_leftovers()
    return {"seconds": seconds, "exit_code": code, "processes_seen": len(serve.seen), "left_alive": left,
            "ports_in_use": [p for p in serve.all_ports() if not port_free(p)]}


def run(config: FailoverConfig) -> dict:
    """The whole scenario; returns the result (see the module docstring)."""
    serve = ServeProcess(config)
    try:
        references = reference_images(config)  # while the replicas load
        serve.wait_serving(config.startup_timeout_s)
        height, width = next(iter(references.values())).shape[2:4]
        load = Load(config, f"127.0.0.1:{serve.ports['http']}", references, dict(height=height, width=width))
        load.start()
        try:
            phases = [run_phase(serve, load, "kill_server", "r0"), run_phase(serve, load, "kill_stub", "r1")]
        finally:
            load.stop()
        stop = stop_and_check(serve)
    finally:
        serve.kill_leftovers()
    return _result(config, serve, load.outcomes, phases, stop)


def _result(config: FailoverConfig, serve: ServeProcess, outcomes: list[Outcome], phases: list, stop: dict) -> dict:
    failed = [o for o in outcomes if not o.ok]
    return {
        "benchmark": "serve-replicas-failover", "machine": MachineInfo.collect().__dict__,
        "versions": collect_versions(), "config": {**asdict(config), "artifacts": str(config.artifacts)},
        "balancer": "HAProxy " + _haproxy_version(), "health_check": _health_check(config), "code": _code(),
        "requests_sent": len(outcomes), "requests_failed": len(failed),
        "requests_not_equal_to_python_api": sum(1 for o in outcomes if o.ok and not o.equal),
        "retried": sum(p["retried"] for p in phases), "failures": [o.error for o in failed][:10],
        "phases": phases, "stop": stop, "stopped_cleanly": "stopped" in serve.output(),
    }


def _code() -> dict:
    """Which serving code ran: the commit, and whether the stub watchdog and the launcher's
    parent-death signal (the hardening branch's modules) were there."""
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    git = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True, text=True)
    has = lambda name: importlib.util.find_spec(f"kandinsky_trt.runtime.serve.{name}") is not None  # noqa: E731
    return {"git": git.stdout.strip(), "stub_watchdog": has("watchdog"), "launcher_parent_death_signal": has("hygiene")}


def _haproxy_version() -> str:
    from kandinsky_trt.runtime.serve.balancer import find_haproxy

    out = subprocess.run([find_haproxy(), "-v"], capture_output=True, text=True, timeout=30).stdout
    return out.split("version ", 1)[1].split()[0] if "version " in out else "?"


def health_check(config: FailoverConfig):
    """The balancer's readiness check as ``serve --health-interval`` configures it for this run."""
    from kandinsky_trt.runtime.serve.balancer import HealthCheck

    return HealthCheck(interval_s=config.health_interval_s)


def _health_check(config: FailoverConfig) -> dict:
    check = health_check(config)
    return {**asdict(check), "out_within_s": check.out_within_s, "back_within_s": check.back_within_s}


def render_markdown(result: dict) -> str:
    m, chk = result["machine"], result["health_check"]
    lines = [f"# serve --replicas {result['config']['replicas']}: failover under load",
             "", f"Machine: {m['cpu_model']}, {m['cores']} logical cores, {m['ram_gb']} GB RAM (CPU only; "
             f"tiny fp32 artifacts, {result['config']['steps']} steps). Balancer: {result['balancer']}; health check "
             f"every {chk['interval_s']:g} s, out after {chk['fall']} failures, back after {chk['rise']} successes.",
             "", f"Code: {result['code']['git']}; stub watchdog: {result['code']['stub_watchdog']}.",
             "", f"Requests sent: {result['requests_sent']} ({result['config']['clients']} client threads), "
             f"failed: {result['requests_failed']}, image not equal to the Python API's: "
             f"{result['requests_not_equal_to_python_api']}, retried by the balancer: {result['retried']}.",
             "", "| kill (SIGKILL) | replica | requests during | retried | out of rotation after | back in rotation after |",
             "|---|---|---:|---:|---:|---:|"]
    for p in result["phases"]:
        out = "never" if p["out_of_rotation_s"] is None else f"{p['out_of_rotation_s']:.2f} s"
        back = "-" if p["back_in_rotation_s"] is None else f"{p['back_in_rotation_s']:.2f} s"
        what = "its tritonserver" if p["kill"] == "kill_server" else "its model process (Python stub)"
        lines.append(f"| {what} | {p['replica']} | {p['requests']} | {p['retried']} | {out} | {back} |")
    s = result["stop"]
    lines += ["", "Seconds are from the kill, read from HAProxy's stats socket every 50 ms; 'back' includes the "
              "restart (or model reload).", "", f"SIGTERM to the launcher: exited with code {s['exit_code']} in "
              f"{s['seconds']:.2f} s; of the {s['processes_seen']} processes it ran (haproxy, tritonservers, stubs) "
              f"{len(s['left_alive'])} left alive; ports still in use: {len(s['ports_in_use'])}.", ""]
    return "\n".join(lines)


def write(result: dict, out: Path, name: str) -> tuple[Path, Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / f"{name}.json", out / f"{name}.md"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    md_path.write_text(render_markdown(result))
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifacts", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path, help="folder for NAME.json and NAME.md")
    p.add_argument("--name", default="cpu-2core_tiny_serve-replicas-failover")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=400)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = run(FailoverConfig(args.artifacts, clients=args.clients, max_requests=args.max_requests))
    for path in write(result, args.out, args.name):
        print(f"wrote {path}")
    print(render_markdown(result))
    return 0 if result["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
