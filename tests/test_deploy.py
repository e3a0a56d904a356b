"""The Kubernetes deployment (deploy/): rendered, validated offline, and checked against the server.

- The committed manifests are exactly what ``deploy/render.py`` renders.
- Every object validates (strict: no unknown fields) against the Kubernetes OpenAPI schemas that
  ``kubernetes-validate`` bundles, for the pinned versions; a typo fails (the validator is live).
- Ports, probes, Service, HPA metric and adapter rule agree with each other and with the code
  (ServerConfig's defaults, the model name, the pipeline defaults); the Dockerfile's pins and the
  renderer's agree; the sizing follows the committed measurements.
- With the serve extra: the image's entrypoint runs for real (``kandinsky-trt serve`` on CPU, ONNX
  Runtime, the tiny model) with the rendered serve flags; the probe paths, the metric names the
  adapter rule reads, our counter, the front (the 4.2 MB form-urlencoded body that killed a bare
  tritonserver) and the SIGTERM drain are checked on that real server.

Not verifiable here: a cluster (scheduling, the GPU device plugin, probes by a kubelet, the HPA and
the adapter against a real Prometheus), Docker (the image build), TensorRT and GPUs.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kv_utils = pytest.importorskip("kubernetes_validate.utils", reason="needs the dev extra (kubernetes-validate)")

from kandinsky_trt.runtime.serve.contract import MODEL_NAME  # noqa: E402
from kandinsky_trt.runtime.serve.launcher import ServerConfig, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSIONS = ("1.29.0", "1.33.0")  # oldest and a recent release still in managed clusters


def _load(name: str):
    """deploy/ is a folder of scripts, not a package; render.py imports sizing.py the same way."""
    if str(DEPLOY) not in sys.path:
        sys.path.insert(0, str(DEPLOY))
    module = importlib.import_module(name)
    assert Path(module.__file__).parent == DEPLOY, module.__file__
    return module


render = _load("render")
sizing = _load("sizing")
capacity = _load("capacity")


def _manifests() -> dict[str, dict]:
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted((DEPLOY / "k8s").glob("*.yaml"))
            if p.name != "kustomization.yaml"}


def _kind(kind: str) -> dict:
    (obj,) = [o for o in _manifests().values() if o["kind"] == kind]
    return obj


def _container() -> dict:
    (c,) = _kind("Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def _env() -> dict[str, str]:
    return {e["name"]: e["value"] for e in _container()["env"]}


def test_committed_files_are_what_the_renderer_writes(capsys):
    assert render.main(["--check"]) == 0, capsys.readouterr().out
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(_manifests())


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(version):
    kinds = set()
    for name, obj in _manifests().items():
        assert kv_utils.validate(obj, version, strict=True), name
        kinds.add(obj["kind"])
    assert kinds == {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler", "PersistentVolumeClaim"}


@pytest.mark.parametrize("break_it", ["typo", "type"])
def test_the_validator_rejects_a_broken_object(break_it):
    obj = _kind("Deployment")
    container = obj["spec"]["template"]["spec"]["containers"][0]
    if break_it == "typo":
        container["livenesProbe"] = container.pop("livenessProbe")
    else:
        container["ports"][0]["containerPort"] = str(container["ports"][0]["containerPort"])
    with pytest.raises(kv_utils.ValidationError):
        kv_utils.validate(obj, KUBERNETES_VERSIONS[0], strict=True)


def test_validation_works_without_network():
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode:
        pytest.skip("cannot make a network namespace here (unshare -n)")
    code = ("import sys, yaml; from kubernetes_validate.utils import validate; "
            "[validate(yaml.safe_load(open(p)), sys.argv[1], strict=True) for p in sys.argv[2:]]")
    files = [str(DEPLOY / "k8s" / n) for n in _manifests()]
    done = subprocess.run(["unshare", "-n", sys.executable, "-c", code, KUBERNETES_VERSIONS[0], *files],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_kubectl_kustomize_renders_the_same_objects():
    """Where a kubectl is installed (not in CI's packages): its kustomize builds exactly our objects."""
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl here")
    done = subprocess.run(["kubectl", "kustomize", str(DEPLOY / "k8s")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    built = sorted((o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(done.stdout))
    assert built == sorted((o["kind"], o["metadata"]["name"]) for o in _manifests().values())


def test_ports_are_the_servers_and_probes_service_use_them():
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    expected = {"http": defaults["http_port"], "grpc": defaults["grpc_port"], "metrics": defaults["metrics_port"]}
    container = _container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == expected
    for name, port in expected.items():
        assert f"--{name}-port={port}" in container["args"]
    service = _kind("Service")["spec"]["ports"]
    assert {p["name"]: (p["port"], p["targetPort"]) for p in service} == {n: (p, n) for n, p in expected.items()}
    probes = {k: container[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert {p["port"] for p in probes.values()} == {"http"}
    assert probes["readinessProbe"]["path"] == probes["startupProbe"]["path"] == render.READY_PATH
    assert probes["livenessProbe"]["path"] == render.LIVE_PATH
    annotations = _kind("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(expected["metrics"])


def test_pod_wiring_selectors_volumes_and_the_entrypoint_environment():
    deployment, pod = _kind("Deployment"), _kind("Deployment")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"] == labels == _kind("Service")["spec"]["selector"]
    assert _kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == labels
    mounts = {m["name"]: m for m in _container()["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    assert set(mounts) == set(volumes)
    claim = volumes["artifacts"]["persistentVolumeClaim"]
    assert claim["readOnly"] and mounts["artifacts"]["readOnly"]
    assert claim["claimName"] == _kind("PersistentVolumeClaim")["metadata"]["name"]
    env = _env()
    assert mounts["artifacts"]["mountPath"] == env["KANDINSKY_ARTIFACTS"]
    assert _container()["resources"]["limits"]["nvidia.com/gpu"] == 1
    from kandinsky_trt.runtime.cli.main import build_parser

    # What the entrypoint runs: `serve` takes every flag the pod passes (argparse exits on an unknown one).
    entrypoint = (DEPLOY / "entrypoint.sh").read_text()
    assert "exec kandinsky-trt serve " in entrypoint and "triton-repo" not in entrypoint
    args = build_parser().parse_args(["serve", "--artifacts", env["KANDINSKY_ARTIFACTS"], "--backend",
                                      env["KANDINSKY_BACKEND"], "--device", env["KANDINSKY_DEVICE"],
                                      "--instances", env["KANDINSKY_INSTANCES"], *_container()["args"]])
    assert (args.backend, args.device, args.host) == ("trt", "cuda", "0.0.0.0")
    assert args.exit_timeout == render.EXIT_TIMEOUT_S


def test_rollout_keeps_serving_and_shutdown_drains():
    deployment = _kind("Deployment")["spec"]
    assert deployment["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    assert "replicas" not in deployment  # the HPA owns the count
    hpa = _kind("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"]["name"] == _kind("Deployment")["metadata"]["name"]
    assert _kind("PodDisruptionBudget")["spec"]["maxUnavailable"] < hpa["minReplicas"] <= hpa["maxReplicas"]
    container, pod = _container(), _kind("Deployment")["spec"]["template"]["spec"]
    sleep = int(container["lifecycle"]["preStop"]["exec"]["command"][1])
    exit_timeout = int(next(a for a in container["args"] if a.startswith("--exit-timeout=")).split("=")[1])
    assert pod["terminationGracePeriodSeconds"] > sleep + exit_timeout
    startup = container["startupProbe"]
    assert deployment["progressDeadlineSeconds"] > startup["periodSeconds"] * startup["failureThreshold"]


def test_hpa_metric_is_the_adapter_rules_output():
    values = yaml.safe_load((DEPLOY / "prometheus-adapter" / "values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    (metric,) = _kind("HorizontalPodAutoscaler")["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == rule["name"]["as"]
    assert re.fullmatch(rule["name"]["matches"], render.QUEUE_METRIC)
    assert rule["seriesQuery"].startswith(render.QUEUE_METRIC + "{")
    query = rule["metricsQuery"]
    assert query.count(f'model="{MODEL_NAME}"') == 2
    ratio = re.fullmatch(rf"sum\(rate\({render.QUEUE_METRIC}\{{[^}}]*\}}\[(\w+)\]\)\) by \(<<.GroupBy>>\) / "
                         rf"clamp_min\(sum\(rate\({render.COMPUTE_METRIC}\{{[^}}]*\}}\[(\w+)\]\)\) by \(<<.GroupBy>>\), 1\)",
                         query)
    assert ratio and ratio.group(1) == ratio.group(2), query  # queue time over compute time, one window


def test_sizing_follows_the_measurements():
    allowance = sizing.startup_allowance()
    startup = _container()["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= allowance.seconds
    assert allowance.seconds >= 2 * allowance.artifacts_gib * allowance.load_s_per_gib
    memory = _container()["resources"]["requests"]["memory"]
    assert memory == _container()["resources"]["limits"]["memory"] and memory.endswith("Gi")
    assert int(memory[:-2]) * 2**30 >= sizing.peak_server_rss_bytes()
    readme = (DEPLOY / "README.md").read_text()
    for figure in (f"{allowance.seconds:.0f} s", f"failureThreshold {startup['failureThreshold']}", memory):
        assert figure in readme, figure


def test_dockerfile_pins_agree_with_the_renderer():
    text = (DEPLOY / "Dockerfile").read_text()
    assert f"ARG TRITON_TAG={render.TRITON_TAG}" in text
    assert f"ARG TENSORRT_VERSION={render.TENSORRT_VERSION}" in text
    assert '"tensorrt-cu12==${TENSORRT_VERSION}"' in text
    assert f"COPY deploy/entrypoint.sh {render.ENTRYPOINT}" in text
    assert f'ENTRYPOINT ["{render.ENTRYPOINT}"]' in text and _container()["command"] == [render.ENTRYPOINT]
    assert render.TRITON_TAG in _container()["image"]
    pip_line = next(line for line in text.splitlines() if "pip install /src" in line)
    assert re.search(r"pip install /src ", pip_line) and "torch" not in pip_line  # no extras: the runtime only
    package_dir = re.search(r"^package-dir = \{(.*)\}$", (ROOT / "pyproject.toml").read_text(), re.MULTILINE).group(1)
    folders = set(re.findall(r'= "([^"]+)"', package_dir))
    assert folders  # every folder setuptools packages must be in the image, or pip install fails
    for folder in folders:
        assert f"COPY {folder} /src/{folder}" in text, folder


@pytest.mark.parametrize("option, value, message", [
    ("--min-replicas", "1", "min_replicas: expected an integer >= 2, found 1"),
    ("--max-replicas", "1", "max_replicas: expected >= min_replicas (2), found 1"),
    ("--target-ratio", "0m", "target_ratio: expected a positive quantity such as 500m or 1.5, found '0m'"),
    ("--target-ratio", "half", "target_ratio: expected a positive quantity such as 500m or 1.5, found 'half'"),
    ("--image", "", "image: expected a non-empty string, found ''"),
])
def test_renderer_refuses_bad_options_in_one_line(capsys, option, value, message):
    before = {p: p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml")}
    assert render.main([option, value]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert {p: p.read_text() for p in (DEPLOY / "k8s").glob("*.yaml")} == before  # nothing written


def test_replica_count_formula():
    assert capacity.replicas_for(2.0, 1.0, 1.0) == 2
    assert capacity.replicas_for(2.0, 1.0, 0.7) == 3
    assert capacity.replicas_for(0.1, 5.0) == 1
    for bad in (dict(target_rps=0), dict(per_replica_rps=-1.0), dict(utilization=1.5), dict(target_rps=float("nan"))):
        kwargs = {"target_rps": 1.0, "per_replica_rps": 1.0, "utilization": 0.7, **bad}
        with pytest.raises(capacity.CapacityError, match=rf"^{next(iter(bad))}: expected "):
            capacity.replicas_for(**kwargs)


def test_capacity_cli_refuses_a_bad_rate_in_one_line(capsys):
    assert capacity.main(["--target-rps", "-3"]) == 2
    assert capsys.readouterr().err == "error: target_rps: expected a finite number > 0, found -3.0\n"


def test_capacity_inputs_are_the_committed_measurements():
    full = capacity.measured_throughput(capacity.SERVE_RESULTS["full-size"])
    assert full.concurrency == 2 and abs(full.requests_per_s - 0.01964) < 1e-4  # the README's serving table
    assert capacity.default_steps() == (100, 25)
    floors = {"prior_text_encoder": 1.0, "prior": 2.0, "text_encoder": 3.0, "unet": 10.0, "movq_decoder": 5.0}
    assert capacity.floor_ms_per_request(floors, 100, 25) == 1 + 2 * 25 + 3 + 10 * 100 + 5


def test_gpu_floors_equal_the_committed_benchmark_bounds():
    pytest.importorskip("torch")
    committed = json.loads((ROOT / "benchmarks" / "results" /
                                          "cpu-2core_full-size_unet-movq_fp32_ort-vs-torch.json").read_text())
    floors = capacity.gpu_floors_ms(committed["device"]["reference_gpu"])
    for network, bound in committed["device"]["lower_bound_ms"].items():
        assert floors[network] == pytest.approx(bound, rel=1e-6)
    with pytest.raises(capacity.CapacityError, match="^gpu: expected"):
        capacity.gpu_floors_ms("Voodoo 2")
    floor = capacity.floor_ms_per_request(floors, *capacity.default_steps())
    readme = (ROOT / "README.md").read_text()  # the scale-out section quotes these
    assert f"{floor:.1f} ms" in readme and f"≤ {1e3 / floor:.2f} |" in readme
    for e in (0.5, 0.1):
        rate = e * 1e3 / floor
        assert f"| {rate:.2f} | {capacity.replicas_for(10, rate, 0.7)} |" in readme


def test_readme_cpu_capacity_rows_are_computed_from_the_results():
    readme = (ROOT / "README.md").read_text()
    for path, digits in zip(capacity.SERVE_RESULTS.values(), (".2f", ".3g")):
        m = capacity.measured_throughput(path)
        assert f"| {m.requests_per_s:{digits}} | {capacity.replicas_for(10, m.requests_per_s, 0.7)} |" in readme


# --- the entrypoint and the rendered flags on a real tritonserver (the serve extra's, CPU) ---

def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except (urllib.error.URLError, OSError):
        return 0, ""


@pytest.fixture
def entrypoint_server(tmp_path, artifacts_fp32):
    """deploy/entrypoint.sh with the rendered args, then loopback and free ports (the last flag wins)."""
    pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
    pytest.importorskip("tritonclient.http", reason="needs the serve extra (tritonclient)")
    ports = {n: free_port() for n in ("http", "grpc", "metrics")}
    env = {**os.environ, **_env(), "KANDINSKY_ARTIFACTS": str(artifacts_fp32[0]), "KANDINSKY_BACKEND": "ort",
           "KANDINSKY_DEVICE": "cpu", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    local = ["--host=127.0.0.1", *(f"--{n}-port={p}" for n, p in ports.items())]
    log = open(tmp_path / "server.log", "wb")
    process = subprocess.Popen([str(DEPLOY / "entrypoint.sh"), *_container()["args"], *local], env=env, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield process, ports, tmp_path / "server.log"
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        log.close()


def _wait_ready(process, url: str, log: Path, timeout_s: float = 180.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text(errors="replace")[-3000:]
        if _get(url)[0] == 200:
            return
        time.sleep(0.5)
    pytest.fail("not ready in time:\n" + log.read_text(errors="replace")[-3000:])


# What the README's scale-out section says to watch, besides the HPA's two: each must be real.
WATCHED = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_pending_request_count",
           "nv_inference_request_duration_us")


def _sample(metrics: str, name: str) -> float:
    match = re.search(rf'^{name}\{{[^}}]*model="{MODEL_NAME}"[^}}]*\}} (\S+)$', metrics, re.MULTILINE)
    assert match, f"{name} for model {MODEL_NAME} not on /metrics"
    return float(match.group(1))


def test_entrypoint_and_rendered_flags_on_a_real_tritonserver(entrypoint_server):
    from serve_helpers import task_fields

    from kandinsky_trt.runtime.serve.client import Target, infer, item_arrays
    from kandinsky_trt.runtime.serve.model import METRIC

    process, ports, log = entrypoint_server
    http = f"http://127.0.0.1:{ports['http']}"
    _wait_ready(process, http + render.READY_PATH, log)
    assert _get(http + render.LIVE_PATH)[0] == 200
    # entrypoint.sh exec'd: the process Kubernetes signals is `kandinsky-trt serve` itself
    assert b"serve" in Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
    # The body that killed the bare tritonserver the old entrypoint ran (issue 18 §1.1): the front drops
    # its form-urlencoded type; Triton answers (an unknown input) and stays up.
    from http.client import HTTPConnection

    body = b'{"inputs":[{"name":"nope","datatype":"BYTES","shape":[1,1],"data":["' + b"a" * 4_185_000 + b'"]}]}'
    conn = HTTPConnection("127.0.0.1", ports["http"], timeout=60)
    conn.request("POST", "/v2/logging", body=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert conn.getresponse().status in (200, 400)
    conn.close()
    assert process.poll() is None and _get(http + render.READY_PATH)[0] == 200
    fields = task_fields("text2img", 0, 64, 64)
    assert infer(Target(f"127.0.0.1:{ports['http']}", "http", 120.0), item_arrays(fields))["images"].shape[-1] == 3
    status, metrics = _get(f"http://127.0.0.1:{ports['metrics']}{render.METRICS_PATH}")
    assert status == 200
    assert _sample(metrics, render.COMPUTE_METRIC) > 0  # the ratio's denominator is measured
    assert _sample(metrics, render.QUEUE_METRIC) >= 0
    assert _sample(metrics, "nv_inference_request_success") == 1
    readme = (ROOT / "README.md").read_text()
    for name in (*WATCHED, render.QUEUE_METRIC, render.COMPUTE_METRIC):
        assert name in readme, name
        _sample(metrics, name)  # on this server's /metrics, for our model
    assert METRIC in readme
    assert re.search(rf'^{METRIC}\{{[^}}]*outcome="success"[^}}]*\}} 1$', metrics, re.MULTILINE), metrics[-2000:]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == 0, log.read_text(errors="replace")[-3000:]
