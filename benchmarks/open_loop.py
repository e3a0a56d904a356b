"""Open-loop load on three servers side by side: step-level, request-level and no batching (issue 20, item 5).

    .venv/bin/python -m kandinsky_trt.benchmarks.open_loop --artifacts A --name STEM [--out benchmarks/results]

Starts ``kandinsky-trt serve`` three times on loopback (``--scheduling step``, the default request-level
dynamic batching, ``--no-batching``), each once, on the same artifacts. Requests arrive on a Poisson
clock, independent of responses: each is sent from its own thread at its scheduled time, and the
sender never waits for earlier answers. The workload is the simulation's
(:func:`~kandinsky_trt.benchmarks.sched_sim.arrivals`): decoder steps from {10, 25, 50, 100}, prior
steps from {5, 25}, text2img and img2img (fixed strength; img2img runs only that tail of its decoder
steps), the artifacts' size, distinct seeds; seeded, so every contender gets the same arrival times
and the same requests (and every rate the same requests, in time scaled by the rate).

Calibration: each (task, prior steps, decoder steps) combination is sent alone to the step server
``--calibration-reps`` times; the mean of the combinations' median latencies is the mean service
time, its inverse the saturation rate; the rates are ``--fractions`` of it. Each rate point sends the
arrivals falling in ``--window-s`` (at most ``--max-requests``; stretched to hold at least
``--min-arrivals``) and waits at most ``--drain-s`` more:
a request without an answer by then is counted unfinished (its client gives up then) and never waited
for. The contenders take turns at each rate in rotating order (rate i starts with contender i mod 3),
and a point starts only once the server's process tree is quiet (what an abandoned request left
running has ended, bounded by ``--quiet-timeout-s``). Metrics are read from each server's ``/metrics``
before and after each point. Writes ``STEM.{json,md,png}`` (:mod:`open_loop_report`).
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import threading
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from kandinsky_trt.benchmarks import open_loop_report as report
from kandinsky_trt.benchmarks.sched_sim import Workload, arrivals, steps_run
from kandinsky_trt.benchmarks.serve_cli import ServeCli
from kandinsky_trt.runtime.scheduling.work import Request

log = logging.getLogger(__name__)
SERVER_FLAGS = {report.STEP: ("--scheduling", "step"), report.REQUEST: (), report.NONE: ("--no-batching",)}
REFUSAL = re.compile(r"queue (is )?full|maximum queue size|exceeds.*queue|unavailable|\b503\b", re.IGNORECASE)
QUIET_CPU_SHARE = 0.1  # a server's tree is quiet below this share of one core over QUIET_SAMPLE_S
QUIET_SAMPLE_S = 0.5


@dataclass(frozen=True)
class LoadConfig:
    """What one run sends: rates as ``fractions`` of the calibrated saturation rate."""

    fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.25)
    window_s: float = 35.0
    drain_s: float = 20.0
    max_requests: int = 200
    min_arrivals: int = 1  # a point's window is stretched until it holds this many arrivals
    calibration_reps: int = 2
    strength: float = 0.5
    seed: int = 0
    quiet_timeout_s: float = 30.0


# -- the workload ------------------------------------------------------------------------------------


def plan_point(workload: Workload, config: "LoadConfig") -> tuple[list[tuple[float, Request]], float]:
    """One rate point's arrivals and window: those in ``config.window_s``, or, where fewer than
    ``config.min_arrivals`` fall there, the window stretched to just before the next arrival after
    that many (so it holds exactly ``min_arrivals``)."""
    drawn = arrivals(replace(workload, requests=max(config.max_requests, config.min_arrivals + 1)))
    inside = [a for a in drawn if a[0] < config.window_s][:config.max_requests]
    if len(inside) >= config.min_arrivals:
        return inside, config.window_s
    return drawn[:config.min_arrivals], drawn[config.min_arrivals][0]


def picture(height: int, width: int, seed: int) -> np.ndarray:
    """An img2img input: a seeded colour ramp (uint8, HxWx3)."""
    ramp = np.add.outer(np.arange(height), np.arange(width)) * (1 + seed % 7)
    return np.stack([(ramp + 60 * c + seed) % 256 for c in range(3)], axis=-1).astype(np.uint8)


def request_fields(index: int, request: Request, seed_base: int = 1000) -> dict:
    """The served request's fields for one drawn :class:`Request` (one prompt, no negative prompt, so
    the step server runs it in its loops rather than as a serial pipeline call)."""
    fields = dict(task=request.task, prompt=f"a lighthouse at dusk, study {index}", seed=seed_base + index,
                  height=request.height, width=request.width, num_inference_steps=request.decoder_steps,
                  prior_steps=request.prior_steps)
    if request.task == "img2img":
        fields.update(image=picture(request.height, request.width, index), strength=request.strength)
    return fields


def combinations(workload: Workload) -> list[Request]:
    """Every (task, prior steps, decoder steps) combination the workload draws, once."""
    return [Request(f"c{i}", task=task, height=workload.size[0], width=workload.size[1], prior_steps=p,
                    decoder_steps=d, strength=workload.strength if task == "img2img" else None)
            for i, (task, p, d) in enumerate((t, p, d) for t in workload.tasks for p in workload.prior_steps
                                             for d in workload.decoder_steps)]


def classify(message: str, elapsed_s: float, bound_s: float) -> str:
    """An error answer: refused (queue full, unavailable), unfinished (the client gave up at the
    bound), or failed (anything else)."""
    if elapsed_s >= bound_s - 0.25:
        return report.UNFINISHED
    return report.REFUSED if REFUSAL.search(message) else report.FAILED


# -- sending -------------------------------------------------------------------------------------------


def send_point(url: str, plan: list[tuple[float, Request]], bound_s: float) -> tuple[list[dict], float]:
    """Send ``plan`` open loop to ``url``; returns one record per arrival and the dispatcher's largest lag
    behind the schedule (s). Latency counts from the *scheduled* arrival. Nothing is waited for past
    ``bound_s`` from the point's start: what has no answer by then is unfinished."""
    from kandinsky_trt.runtime.serve.client import ClientError, Target, infer, item_arrays

    payloads = [item_arrays(request_fields(i, r)) for i, (_, r) in enumerate(plan)]
    records = [dict(index=i, at_s=t, task=r.task, prior_steps=r.prior_steps, decoder_steps=r.decoder_steps,
                    status=report.UNFINISHED, latency_s=None, error=None) for i, (t, r) in enumerate(plan)]
    lock, closed, start = threading.Lock(), [False], time.perf_counter() + 0.05

    def send(record: dict, arrays: dict) -> None:
        left = start + bound_s - time.perf_counter()
        status, error = report.DONE, None
        try:
            infer(Target(url, "http", timeout_s=max(left, 0.01)), arrays)
        except ClientError as err:
            error = str(err)
            status = classify(error, time.perf_counter() - start, bound_s)
        elapsed = time.perf_counter() - start
        with lock:
            if not closed[0] and elapsed <= bound_s:
                record.update(status=status, error=error, latency_s=elapsed - record["at_s"])

    threads, lag = [], 0.0
    for record, arrays in zip(records, payloads):
        wait = start + record["at_s"] - time.perf_counter()
        if wait > 0:
            time.sleep(wait)
        lag = max(lag, time.perf_counter() - start - record["at_s"])
        threads.append(threading.Thread(target=send, args=(record, arrays), daemon=True))
        threads[-1].start()
    for thread in threads:
        thread.join(max(0.0, start + bound_s - time.perf_counter()))
    with lock:
        closed[0] = True
        return [dict(r) for r in records], lag


# -- the servers ---------------------------------------------------------------------------------------


class ServeProcess(ServeCli):
    """``kandinsky-trt serve`` in a child process on free loopback ports, named for the report."""

    def __init__(self, artifacts: Path, name: str, flags: tuple[str, ...]) -> None:
        super().__init__(artifacts, *flags)
        self.name = name
        self.ready_line = 0  # output before it is startup (readiness probes refused while tritonserver starts)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.ports['http']}"

    def wait_serving(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.triton_pid() is None:
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} server: expected 'serving ...' within {timeout_s:.0f} s, found:\n"
                                   + "".join(self.lines)[-3000:])
            time.sleep(0.2)
        self.ready_line = len(self.lines)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics", timeout=10) as answer:
            return report.parse_metrics(answer.read().decode())

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the CLI process and everything below it."""
        from kandinsky_trt.benchmarks.serve_full_size import _descendants

        total, tick = 0, os.sysconf("SC_CLK_TCK")
        for pid in [self.process.pid, *_descendants(self.process.pid)]:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)
            except (OSError, IndexError, ValueError):
                continue
        return total / tick

    def wait_quiet(self, timeout_s: float) -> float:
        """Seconds until the process tree used under :data:`QUIET_CPU_SHARE` of a core (bounded)."""
        start = time.monotonic()
        while time.monotonic() - start < timeout_s:
            before = self.cpu_s()
            time.sleep(QUIET_SAMPLE_S)
            if self.cpu_s() - before < QUIET_CPU_SHARE * QUIET_SAMPLE_S:
                break
        return time.monotonic() - start

    def problems(self) -> list[str]:
        """Output lines after startup that report errors (tracebacks, ERROR, refused), the first 20."""
        marks = ("Traceback", "ERROR", "Error", "error:", "refused a request", "exited")
        return [line.rstrip() for line in self.lines[self.ready_line:] if any(m in line for m in marks)][:20]


# -- calibration and the run ---------------------------------------------------------------------------


def warm_up(server: ServeProcess, workload: Workload) -> None:
    """One request per decoder step count (each task and prior step count among them), so every
    scheduler table and session is built before anything is timed."""
    from kandinsky_trt.runtime.serve.client import Target, infer, item_arrays

    combos = combinations(workload)
    chosen = [next(c for c in combos if c.decoder_steps == d and c.task == workload.tasks[i % len(workload.tasks)]
                   and c.prior_steps == workload.prior_steps[i % len(workload.prior_steps)])
              for i, d in enumerate(workload.decoder_steps)]
    for i, request in enumerate(chosen):
        infer(Target(server.url), item_arrays(request_fields(900 + i, request)))


def calibrate(server: ServeProcess, workload: Workload, reps: int) -> list[dict]:
    """Each combination alone, ``reps`` times (combinations interleaved within a rep)."""
    from kandinsky_trt.runtime.serve.client import Target, infer, item_arrays

    samples = []
    for rep in range(reps):
        for i, request in enumerate(combinations(workload)):
            arrays = item_arrays(request_fields(500 + 100 * rep + i, request))
            t = time.perf_counter()
            infer(Target(server.url), arrays)
            samples.append(dict(task=request.task, prior_steps=request.prior_steps, decoder_steps=request.decoder_steps,
                                decoder_steps_run=steps_run(request, "decoder"), latency_s=time.perf_counter() - t))
    return samples


def measure_point(server: ServeProcess, plan: list, window_s: float, config: LoadConfig) -> dict:
    """One contender at one rate: quiet server, metrics before, the open-loop sends, quiet, metrics after."""
    quiet_before = server.wait_quiet(config.quiet_timeout_s)
    before, cpu, load = server.metrics(), server.cpu_s(), os.getloadavg()[0]
    records, lag = send_point(server.url, plan, window_s + config.drain_s)
    quiet_after = server.wait_quiet(config.quiet_timeout_s)
    after, step = server.metrics(), server.name == report.STEP
    queue, source = report.queue_mean_s(before, after, step)
    errors = sorted({r["error"] for r in records if r["error"] and r["status"] != report.UNFINISHED})[:5]
    return {**report.summarize_point(records, window_s), "window_s": window_s, "queue_mean_s": queue,
            "queue_source": source,
            "occupancy": report.occupancy(before, after) if step else None,
            "stages": report.stage_use(before, after) if step else None, "server_cpu_s": server.cpu_s() - cpu,
            "load_avg": [load, os.getloadavg()[0]], "send_lag_max_s": lag, "quiet_wait_s": [quiet_before, quiet_after],
            "errors": errors, "server_alive": server.process.poll() is None, "records": records}


def rotation(index: int) -> list[str]:
    """Rate ``index``'s contender order: the three in turn, starting with contender ``index`` mod 3."""
    names = list(report.CONTENDERS)
    return names[index % len(names):] + names[:index % len(names)]


def sweep(servers: dict[str, ServeProcess], workload: Workload, idle: dict, config: LoadConfig) -> dict:
    contenders = {name: [] for name in report.CONTENDERS}
    for i, fraction in enumerate(config.fractions):
        rate = fraction * idle["saturation_per_s"]
        plan, window = plan_point(replace(workload, rate_per_s=rate), config)
        for name in rotation(i):
            log.info("rate %.3f/s (%g x saturation), %d arrivals in %.0f s: %s", rate, fraction, len(plan), window,
                     name)
            point = measure_point(servers[name], plan, window, config)
            contenders[name].append({"fraction": fraction, "rate_per_s": rate, "turn": rotation(i).index(name),
                                     **point})
            log.info("  done %d refused %d unfinished %d failed %d; p50 %s p99 %s", point["completed"],
                     point["refused"], point["unfinished"], point["failed"], point["p50_s"], point["p99_s"])
    return contenders


def start_servers(artifacts: Path) -> dict[str, ServeProcess]:
    servers = {name: ServeProcess(artifacts, name, flags) for name, flags in SERVER_FLAGS.items()}
    try:
        for server in servers.values():
            server.wait_serving()
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


NOTES = [
    "Measured on loopback: client and servers share the host's cores. The host was shared with another "
    "engineer's work (see the load column): one run per point, so single points are noisy.",
    "Latency counts from the scheduled arrival to the response (a late sender counts against the server). "
    "Points start from an empty server (no warm-up share left out), so low-rate points include no backlog.",
    "Static shapes: the step server's loops always run at the largest profile batch (their slots), occupied "
    "or not; request-level batches and no-batching calls run at the smallest profile batch holding them. With "
    "one batch-B profile a lone request costs B rows in every contender.",
]


def run(args: argparse.Namespace) -> dict:
    from kandinsky_trt.benchmarks.environment import MachineInfo, collect_versions
    from kandinsky_trt.runtime.contract import manifest as mf

    artifacts, config = Path(args.artifacts), load_config(args)
    manifest = mf.load_manifest(artifacts)
    workload = Workload(rate_per_s=1.0, requests=config.max_requests, seed=config.seed, strength=config.strength,
                        size=(manifest.profile.height, manifest.profile.width))
    servers = start_servers(artifacts)
    try:
        for server in servers.values():
            warm_up(server, workload)
        idle = report.idle_summary(calibrate(servers[report.STEP], workload, config.calibration_reps))
        log.info("idle: mean service %.3f s, saturation %.3f req/s", idle["mean_service_s"], idle["saturation_per_s"])
        contenders = sweep(servers, workload, idle, config)
        problems = {name: s.problems() for name, s in servers.items()}
    finally:
        exits = {name: s.stop() for name, s in servers.items()}
    result = {"kind": "open-loop", "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": MachineInfo.collect().__dict__, "machine_label": args.machine, "versions": collect_versions(),
              "artifacts": {"label": args.label, "precision": manifest.precision,
                            "profiles": [f"{p.batch}x{p.height}x{p.width}" for p in manifest.profiles]},
              "workload": {k: v for k, v in workload.__dict__.items() if k not in ("rate_per_s", "requests")},
              "config": config.__dict__, "servers": {n: " ".join(f) or "(default)" for n, f in SERVER_FLAGS.items()},
              "notes": NOTES, "idle": idle, "contenders": contenders, "server_problems": problems,
              "server_exit_codes": exits}
    result["goals"] = report.goals(contenders, idle)
    return result


def load_config(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(tuple(args.fractions), args.window_s, args.drain_s, args.max_requests, args.min_arrivals,
                      args.calibration_reps, args.strength, args.seed, args.quiet_timeout_s)


def build_parser() -> argparse.ArgumentParser:
    d = LoadConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--artifacts", required=True, help="artifacts directory from `export`")
    p.add_argument("--name", required=True, help="output file stem")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--label", default="tiny checkpoint", help="what the artifacts are, for the report")
    p.add_argument("--machine", default="2-core CPU VM, no GPU")
    p.add_argument("--fractions", type=float, nargs="+", default=list(d.fractions), help="rates, x saturation")
    p.add_argument("--window-s", type=float, default=d.window_s, help="arrival window per point (s)")
    p.add_argument("--drain-s", type=float, default=d.drain_s, help="wait past the window per point (s)")
    p.add_argument("--max-requests", type=int, default=d.max_requests, help="arrivals per point at most")
    p.add_argument("--min-arrivals", type=int, default=d.min_arrivals,
                   help="stretch a point's window until it holds this many arrivals (default 1)")
    p.add_argument("--calibration-reps", type=int, default=d.calibration_reps)
    p.add_argument("--strength", type=float, default=d.strength, help="img2img strength (default 0.5)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--quiet-timeout-s", type=float, default=d.quiet_timeout_s)
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """One-line errors (``parser.error``) for values the run cannot use."""
    if not (Path(args.artifacts) / "manifest.json").is_file():
        parser.error(f"--artifacts: expected a directory holding manifest.json, found {args.artifacts!r}")
    if any(not f > 0 for f in args.fractions):
        parser.error(f"--fractions: expected positive numbers, found {args.fractions}")
    for name in ("window_s", "drain_s", "quiet_timeout_s"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')}: expected seconds > 0, found {getattr(args, name)}")
    for name in ("max_requests", "min_arrivals", "calibration_reps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a whole number >= 1, found {getattr(args, name)}")
    if not 0 < args.strength <= 1:
        parser.error(f"--strength: expected a number in (0, 1], found {args.strength}")


def main(argv=None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    result = run(args)
    for path in report.write_results(result, Path(args.out), args.name):
        print(path)


if __name__ == "__main__":
    main()
