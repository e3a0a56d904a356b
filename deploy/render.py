"""Render the Kubernetes deployment (``deploy/k8s/``) and the Prometheus-adapter rule from the code.

``python deploy/render.py`` (re)writes the committed files; ``--check`` only compares them (as
``tests/test_deploy.py`` does). Nothing that must match the server is restated here: the ports are
:class:`ServerConfig`'s defaults and the model name is the serving contract's; the start-up
allowance, memory request and volume size are computed from the measured results in
``benchmarks/results/`` (:mod:`sizing`). The health paths and Triton's metric names below are
checked against a real tritonserver by the test. Needs PyYAML (the ``dev`` extra).
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

if str(Path(__file__).resolve().parent) not in sys.path:  # sizing.py beside this file (deploy/ is no package)
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import sizing  # noqa: E402

from kandinsky_trt.runtime.contract.errors import KandinskyTrtError  # noqa: E402
from kandinsky_trt.runtime.serve.contract import MODEL_NAME  # noqa: E402
from kandinsky_trt.runtime.serve.launcher import ServerConfig  # noqa: E402
from kandinsky_trt.runtime.serve.limits import (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE_SIZE,  # noqa: E402
                                                 DEFAULT_MAX_REQUEST_BYTES, DEFAULT_QUEUE_TIMEOUT_S)

HERE = Path(__file__).resolve().parent
K8S_DIR = HERE / "k8s"
ADAPTER_VALUES = HERE / "prometheus-adapter" / "values.yaml"

# The image: NVIDIA's Triton release whose TensorRT built the plans (deploy/Dockerfile pins the same pair).
TRITON_TAG = "25.02-py3"
TENSORRT_VERSION = "10.8.0.43"
ENTRYPOINT = "/usr/local/bin/kandinsky-entrypoint"  # where deploy/Dockerfile puts deploy/entrypoint.sh

READY_PATH = "/v2/health/ready"  # KServe v2 health endpoints, as Triton serves them
LIVE_PATH = "/v2/health/live"
METRICS_PATH = "/metrics"
QUEUE_METRIC = "nv_inference_queue_duration_us"  # Triton's cumulative queue and compute times
COMPUTE_METRIC = "nv_inference_compute_infer_duration_us"
HPA_METRIC = "kandinsky_queue_compute_ratio"  # what the adapter rule exposes to the HPA

ARTIFACTS_MOUNT = "/artifacts"
POD_HOST = "0.0.0.0"  # serve binds every interface of the pod (the kubelet's probes and the Service reach it)
PRESTOP_SLEEP_S = 10  # endpoints drop the pod before Triton stops taking requests
EXIT_TIMEOUT_S = 30  # serve's (Triton's) wait for in-flight requests after SIGTERM
LABELS = {"app.kubernetes.io/name": "kandinsky-trt", "app.kubernetes.io/component": "triton"}


@dataclass(frozen=True)
class DeployConfig:
    """What differs between clusters; every other value comes from the code or the measurements."""

    name: str = "kandinsky-triton"
    image: str = f"registry.example.com/kandinsky-trt:0.3.0-triton{TRITON_TAG}"  # your registry: --image
    artifacts_claim: str = "kandinsky-artifacts"
    min_replicas: int = 2  # a PDB of maxUnavailable 1 then leaves one replica serving through a drain
    max_replicas: int = 8
    target_ratio: str = "500m"  # queue time per unit of compute time, averaged over the pods
    gpu_product: str | None = None  # nodeSelector nvidia.com/gpu.product: plans are built per GPU model


class DeployConfigError(KandinskyTrtError, ValueError):
    """A renderer option out of range."""


def check_config(config: DeployConfig) -> DeployConfig:
    """One-line errors for options that would render a deployment that cannot do its job."""
    if config.min_replicas < 2:  # the PDB's maxUnavailable 1 must leave one replica serving
        raise DeployConfigError(f"min_replicas: expected an integer >= 2, found {config.min_replicas}")
    if config.max_replicas < config.min_replicas:
        raise DeployConfigError(f"max_replicas: expected >= min_replicas ({config.min_replicas}), "
                                f"found {config.max_replicas}")
    if not re.fullmatch(r"(\d+m|\d+(\.\d+)?)", config.target_ratio) or float(config.target_ratio.rstrip("m")) == 0:
        raise DeployConfigError(f"target_ratio: expected a positive quantity such as 500m or 1.5, "
                                f"found {config.target_ratio!r}")
    for name in ("name", "image", "artifacts_claim"):
        if not getattr(config, name):
            raise DeployConfigError(f"{name}: expected a non-empty string, found {getattr(config, name)!r}")
    return config


def ports() -> dict[str, int]:
    """Triton's three listeners, as ``kandinsky-trt serve`` starts them (ServerConfig's defaults)."""
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    return {"http": defaults["http_port"], "grpc": defaults["grpc_port"], "metrics": defaults["metrics_port"]}


def serve_args() -> list[str]:
    """The ``kandinsky-trt serve`` flags after the entrypoint's (artifacts, backend, device, instances):
    every interface of the pod, the rendered ports, the drain, the start-up allowance and the limits
    (their defaults, stated so a cluster operator sees and can change them)."""
    p = ports()
    return [f"--host={POD_HOST}", f"--http-port={p['http']}", f"--grpc-port={p['grpc']}",
            f"--metrics-port={p['metrics']}", f"--exit-timeout={EXIT_TIMEOUT_S}",
            f"--startup-timeout={sizing.startup_allowance().probe_window_s}",
            f"--max-request-bytes={DEFAULT_MAX_REQUEST_BYTES}", f"--max-connections={DEFAULT_MAX_CONNECTIONS}",
            f"--max-queue-size={DEFAULT_MAX_QUEUE_SIZE}", f"--queue-timeout={DEFAULT_QUEUE_TIMEOUT_S:g}"]


def _entrypoint_env() -> list[dict]:
    env = {"KANDINSKY_ARTIFACTS": ARTIFACTS_MOUNT, "KANDINSKY_BACKEND": "trt", "KANDINSKY_DEVICE": "cuda",
           "KANDINSKY_INSTANCES": "1"}
    return [{"name": k, "value": v} for k, v in env.items()]


def _probes(startup: sizing.StartupAllowance) -> dict:
    def get(path: str) -> dict:
        return {"httpGet": {"path": path, "port": "http"}}

    return {
        "startupProbe": {**get(READY_PATH), "periodSeconds": startup.period_s,
                         "failureThreshold": startup.failure_threshold, "timeoutSeconds": 5},
        "readinessProbe": {**get(READY_PATH), "periodSeconds": 5, "failureThreshold": 2, "timeoutSeconds": 3},
        "livenessProbe": {**get(LIVE_PATH), "periodSeconds": 10, "failureThreshold": 3, "timeoutSeconds": 5},
    }


def _container(config: DeployConfig, memory: str, startup: sizing.StartupAllowance) -> dict:
    gpu = {"nvidia.com/gpu": 1}
    return {
        "name": "triton", "image": config.image, "command": [ENTRYPOINT], "args": serve_args(),
        "env": _entrypoint_env(),
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in ports().items()],
        "resources": {"requests": {"cpu": "2", "memory": memory, **gpu}, "limits": {"memory": memory, **gpu}},
        "volumeMounts": [{"name": "artifacts", "mountPath": ARTIFACTS_MOUNT, "readOnly": True},
                         {"name": "dshm", "mountPath": "/dev/shm"}],
        **_probes(startup),
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "securityContext": {"allowPrivilegeEscalation": False},
    }


def _pod_spec(config: DeployConfig, memory: str, startup: sizing.StartupAllowance) -> dict:
    spec = {
        "terminationGracePeriodSeconds": PRESTOP_SLEEP_S + EXIT_TIMEOUT_S + 20,
        "containers": [_container(config, memory, startup)],
        "volumes": [
            {"name": "artifacts", "persistentVolumeClaim": {"claimName": config.artifacts_claim, "readOnly": True}},
            # Triton's Python backend passes tensors through /dev/shm; a container's default is 64 MiB.
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    }
    if config.gpu_product:
        spec["nodeSelector"] = {"nvidia.com/gpu.product": config.gpu_product}
    return spec


def deployment(config: DeployConfig) -> dict:
    """No ``replicas``: the HPA owns the count (an applied manifest would reset it)."""
    startup = sizing.startup_allowance()
    memory = sizing.memory_request()
    metrics = ports()["metrics"]
    template = {
        "metadata": {"labels": dict(LABELS), "annotations": {
            "prometheus.io/scrape": "true", "prometheus.io/port": str(metrics), "prometheus.io/path": METRICS_PATH}},
        "spec": _pod_spec(config, memory, startup),
    }
    return {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": config.name, "labels": dict(LABELS)},
        "spec": {
            "selector": {"matchLabels": dict(LABELS)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "minReadySeconds": 10,
            "progressDeadlineSeconds": startup.probe_window_s + 300,
            "template": template,
        },
    }


def service(config: DeployConfig) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": config.name, "labels": dict(LABELS)},
        "spec": {"selector": dict(LABELS), "type": "ClusterIP",
                 "ports": [{"name": n, "port": p, "targetPort": n, "protocol": "TCP"} for n, p in ports().items()]},
    }


def disruption_budget(config: DeployConfig) -> dict:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": {"name": config.name, "labels": dict(LABELS)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": dict(LABELS)}},
    }


def autoscaler(config: DeployConfig) -> dict:
    """Scale on the pods' mean queue-to-compute ratio; slow down, since a new pod takes minutes to load."""
    window = sizing.startup_allowance().probe_window_s
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": config.name, "labels": dict(LABELS)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": config.name},
            "minReplicas": config.min_replicas, "maxReplicas": config.max_replicas,
            "metrics": [{"type": "Pods", "pods": {"metric": {"name": HPA_METRIC},
                                                  "target": {"type": "AverageValue", "averageValue": config.target_ratio}}}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 60, "policies": [{"type": "Pods", "value": 2, "periodSeconds": 120}]},
                "scaleDown": {"stabilizationWindowSeconds": window,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]},
            },
        },
    }


def artifacts_claim(config: DeployConfig) -> dict:
    """ReadOnlyMany: every replica, on any node, mounts the same artifacts (populated beforehand)."""
    return {
        "apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": config.artifacts_claim, "labels": dict(LABELS)},
        "spec": {"accessModes": ["ReadOnlyMany"], "resources": {"requests": {"storage": sizing.claim_size()}}},
    }


def adapter_rule() -> dict:
    """prometheus-adapter rule: rate of queue time over rate of compute time, per pod, for our model."""
    match = f'<<.LabelMatchers>>,model="{MODEL_NAME}"'
    query = (f"sum(rate({QUEUE_METRIC}{{{match}}}[1m])) by (<<.GroupBy>>) / "
             f"clamp_min(sum(rate({COMPUTE_METRIC}{{{match}}}[1m])) by (<<.GroupBy>>), 1)")
    return {
        "seriesQuery": f'{QUEUE_METRIC}{{namespace!="",pod!=""}}',
        "resources": {"overrides": {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}},
        "name": {"matches": f"^{QUEUE_METRIC}$", "as": HPA_METRIC},
        "metricsQuery": query,
    }


def objects(config: DeployConfig) -> dict[str, dict]:
    """File name -> Kubernetes object, in apply order."""
    return {"pvc.yaml": artifacts_claim(config), "deployment.yaml": deployment(config), "service.yaml": service(config),
            "pdb.yaml": disruption_budget(config), "hpa.yaml": autoscaler(config)}


def _dump(data) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=120)


HEADER = "# Generated by `python deploy/render.py`; edit the renderer, not this file.\n"


def rendered_files(config: DeployConfig = DeployConfig()) -> dict[Path, str]:
    files = {K8S_DIR / name: HEADER + _dump(obj) for name, obj in objects(config).items()}
    files[K8S_DIR / "kustomization.yaml"] = HEADER + _dump(
        {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": list(objects(config))})
    files[ADAPTER_VALUES] = HEADER + "# Helm values for prometheus-community/prometheus-adapter.\n" + _dump(
        {"rules": {"default": False, "custom": [adapter_rule()]}})
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed files; write nothing")
    for field in dataclasses.fields(DeployConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default) if field.default else str,
                            default=field.default, help=f"default {field.default!r}")
    args = vars(parser.parse_args(argv))
    check = args.pop("check")
    try:
        files = rendered_files(check_config(DeployConfig(**args)))
    except DeployConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if check:
        for path in stale:
            print(f"{path}: expected the rendered text, found it differs (run python deploy/render.py)")
        return 1 if stale else 0
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
