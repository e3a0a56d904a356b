"""``kandinsky-trt serve --replicas 2`` behind HAProxy: failover under load, restart, stop.

The scenario is ``benchmarks/serve_failover.py`` (the script that writes the committed figures),
run once per module on the tiny fp32 artifacts: 2 client threads send seeded text2img requests
through the balancer while one replica's tritonserver is SIGKILLed, then the other replica's model
process (the Python backend stub); then SIGTERM to the launcher. Every answer is compared with the
serial Python API's image for its seed. A second launcher (one replica) answers a gRPC request
through the balancer (HTTP/2 cleartext) and is then SIGKILLed: nothing it ran may outlive it.

The stub case relies on the launcher's watchdog (readiness false once the stub dies,
``runtime/serve/watchdog.py``); the SIGKILL case on its parent-death signal (``hygiene.py``).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from kandinsky_trt.benchmarks.serve_failover import (PROMPT, FailoverConfig, ServeProcess, _cmdline, alive,
                                                     health_check, reference_images, render_markdown, run, write)
from kandinsky_trt.runtime.serve.balancer import BalancerConfig, HealthCheck, Upstream, find_haproxy, render
from kandinsky_trt.runtime.serve.watchdog import POLL_S

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.http", reason="needs the serve extra (tritonclient[http])")
pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")
if not shutil.which("haproxy") and not shutil.which("/usr/sbin/haproxy"):
    pytest.skip("needs HAProxy (apt-get install haproxy; .ci/run installs it)", allow_module_level=True)

CHECK = health_check(FailoverConfig(Path(".")))  # the check the failover runs use
POLL_SLACK_S = 1.0  # the stats socket is polled every 50 ms on a loaded 2-core machine
WATCHDOG_POLL_S = POLL_S  # how often the launcher's watchdog looks at the stubs


@pytest.fixture(scope="module")
def failover(artifacts_fp32, tmp_path_factory):
    result = run(FailoverConfig(artifacts_fp32[0], max_requests=300))
    json_path, md_path = write(result, tmp_path_factory.mktemp("failover"), "failover")
    assert json_path.is_file() and "failover under load" in md_path.read_text()
    return result


def _phase(result: dict, kill: str) -> dict:
    return next(p for p in result["phases"] if p["kill"] == kill)


def test_no_request_fails_and_every_image_is_the_python_apis(failover):
    assert failover["requests_sent"] >= 8 * 2, render_markdown(failover)
    assert failover["requests_failed"] == 0, failover["failures"]
    assert failover["requests_not_equal_to_python_api"] == 0


def test_killed_tritonserver_leaves_rotation_and_comes_back_after_its_restart(failover):
    phase = _phase(failover, "kill_server")
    assert phase["out_of_rotation_s"] is not None, render_markdown(failover)
    assert phase["out_of_rotation_s"] <= CHECK.out_within_s + POLL_SLACK_S
    assert phase["back_in_rotation_s"] is not None, render_markdown(failover)
    assert phase["requests"] > 0


def test_killed_model_process_leaves_rotation_and_comes_back_after_its_reload(failover):
    phase = _phase(failover, "kill_stub")
    assert phase["out_of_rotation_s"] is not None, render_markdown(failover)
    assert phase["out_of_rotation_s"] <= WATCHDOG_POLL_S + CHECK.out_within_s + POLL_SLACK_S
    assert phase["back_in_rotation_s"] is not None, render_markdown(failover)


def test_sigterm_stops_every_process_and_frees_every_port(failover):
    stop = failover["stop"]
    assert stop["exit_code"] == 0 and failover["stopped_cleanly"], stop
    assert stop["processes_seen"] >= 1 + 2 * 2, stop  # haproxy, 2 tritonservers and their stubs (plus restarts)
    assert stop["left_alive"] == [] and stop["ports_in_use"] == [], stop


def _grpc_and_metrics_through_the_balancer(serve: ServeProcess, config: FailoverConfig) -> None:
    """One seeded gRPC request through HAProxy (h2c) equals the Python API; HAProxy's /metrics answers."""
    from kandinsky_trt.runtime.serve.client import Target, infer, item_arrays

    reference = reference_images(config)[0]
    fields = dict(task="text2img", prompt=PROMPT, seed=0, num_inference_steps=config.steps,
                  prior_steps=config.steps, height=reference.shape[2], width=reference.shape[3])
    served = infer(Target(f"127.0.0.1:{serve.ports['grpc']}", "grpc", 120.0), item_arrays(fields))
    np.testing.assert_array_equal(served["images"], reference)
    with urllib.request.urlopen(f"http://127.0.0.1:{serve.ports['metrics']}/metrics", timeout=30) as answer:
        assert b"haproxy_server_check_status" in answer.read()


def test_sigkill_of_the_launcher_leaves_no_process(artifacts_fp32):
    config = FailoverConfig(artifacts_fp32[0], replicas=1, seeds=1)
    serve = ServeProcess(config)
    try:
        serve.wait_serving(240.0)
        _grpc_and_metrics_through_the_balancer(serve, config)
        serve.note_processes()
        haproxy = [p for p in serve.seen if "haproxy" in _cmdline(p)]
        servers = [p for p in serve.seen if p not in haproxy]
        assert haproxy and servers, serve.output()
        serve.process.send_signal(signal.SIGKILL)
        serve.process.wait(timeout=30)
        deadline = time.monotonic() + 10.0
        while any(alive(p) for p in serve.seen) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(alive(p) for p in haproxy), "haproxy outlived its launcher"
        left = [p for p in servers if alive(p)]
    finally:
        serve.kill_leftovers()
    assert left == [], "tritonserver or its stub outlived the launcher"


def test_balancer_configuration_is_valid_for_haproxy(tmp_path):
    upstreams = (Upstream("r0", 18010, 18011), Upstream("r1", 18020, 18021))
    config = BalancerConfig("127.0.0.1", 18000, 18001, upstreams, tmp_path, metrics_port=18002)
    (tmp_path / "haproxy.cfg").write_text(render(config))
    check = subprocess.run([find_haproxy(), "-c", "-f", str(tmp_path / "haproxy.cfg")], capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0 and "WARNING" not in check.stdout + check.stderr, check.stdout + check.stderr
    text = render(config)
    assert "option httpchk GET /v2/health/ready" in text and "retry-on all-retryable-errors" in text
    assert "track triton_http/r1" in text and "proto h2" in text


def test_replicas_argument_and_busy_port_are_one_line_errors(tmp_path):
    from kandinsky_trt.runtime.cli.main import main
    from kandinsky_trt.runtime.serve.hygiene import PortInUse
    from kandinsky_trt.runtime.serve.replicas import ReplicaSet, ReplicaSetConfig

    with pytest.raises(SystemExit):
        main(["serve", "--replicas", "0"])

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortInUse, match=rf"--http-port: expected a free port, found {port} in use"):
            ReplicaSet(ReplicaSetConfig(tmp_path, 2, "127.0.0.1", port, 0, 0), tmp_path)


def test_server_flags_reach_every_replica(tmp_path):
    """The limits ``serve`` gives its one server (request bytes, connections, cancel marks, exit
    timeout) reach every replica's ServerConfig; each replica gets its own loopback ports."""
    from kandinsky_trt.runtime.serve.replicas import ReplicaSetConfig, replica_specs

    options = (("cancel_dir", tmp_path), ("exit_timeout_s", 7), ("max_connections", 9),
               ("max_request_bytes", 1234))
    specs = replica_specs(ReplicaSetConfig(tmp_path, 2, "127.0.0.1", 0, 0, 0, 60.0, server_options=options))
    assert len(specs) == 2
    for spec in specs:
        assert {name: getattr(spec.server, name) for name, _ in options} == dict(options)
        assert spec.server.host == "127.0.0.1" and spec.server.http_port > 0
    assert specs[0].server.http_port != specs[1].server.http_port


def test_readme_failover_row_is_the_committed_result():
    import json

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    result = json.loads((root / "benchmarks/results/cpu-2core_tiny_serve-replicas-failover.json").read_text())
    server, stub = _phase(result, "kill_server"), _phase(result, "kill_stub")
    row = (f"| {result['requests_sent']} | {result['requests_failed']} | {result['retried']} | "
           f"{server['out_of_rotation_s']:.2f} s / {server['back_in_rotation_s']:.2f} s | "
           f"{stub['out_of_rotation_s']:.2f} s / {stub['back_in_rotation_s']:.2f} s | "
           f"{result['stop']['seconds']:.2f} s, nothing |")
    assert row in readme, row
    assert result["requests_failed"] == 0 and result["stop"]["left_alive"] == []
