"""The Python-backend model ``kandinsky``: Triton's tensors in and out of :class:`Executor`.

Runs inside Triton's Python stub, with this project's interpreter (see ``launcher``).
``initialize`` loads one :class:`Components` from the ``artifacts`` parameter of ``config.pbtxt``
and loads every network at once, so "ready" means ready to serve (and a TensorRT plan built with
another TensorRT version than the server's fails here, by the backend's manifest check, not on the
first request). ``execute`` answers each request with its outputs or a ``TritonError`` of its own:
with request-level scheduling (the default) it runs the batch Triton hands it to its end
(:class:`Executor`); with ``scheduling=step`` it hands every request to the step scheduler
(:class:`~kandinsky_trt.runtime.serve.stepped.StepService`) and returns at once, and each request is
answered through its response sender when its images are done.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.serve.cancel import CancelMarks, token_of
from kandinsky_trt.runtime.serve.contract import INPUT_NAMES
from kandinsky_trt.runtime.serve.limits import DEFAULT_MAX_QUEUE_SIZE, DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelParameters:
    """The string parameters ``triton-repo`` writes into ``config.pbtxt``."""

    artifacts: str
    backend: str = "ort"
    device: str = "cpu"
    cuda_graph: bool = True
    max_images: int = 16
    batching: bool = True
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    cancel_dir: str | None = None  # the HTTP front's cancel marks (see cancel.py)
    scheduling: str = "request"  # "step": requests join and leave the running batch at every step (stepped.py)
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # step scheduling: requests waiting beyond it are refused (503)
    request_timeout_s: float | None = None  # step scheduling: default deadline when a request sends no timeout

    @classmethod
    def from_model_config(cls, model_config: str) -> "ModelParameters":
        params = {k: v["string_value"] for k, v in json.loads(model_config).get("parameters", {}).items()}
        timeout = params.get("request_timeout_s")
        return cls(artifacts=params["artifacts"], backend=params.get("backend", "ort"),
                   device=params.get("device", "cpu"), cuda_graph=params.get("cuda_graph", "true") == "true",
                   max_images=int(params.get("max_images", 16)), batching=params.get("batching", "true") == "true",
                   max_request_bytes=int(params.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)),
                   cancel_dir=params.get("cancel_dir"), scheduling=params.get("scheduling", "request"),
                   max_queue_size=int(params.get("max_queue_size", DEFAULT_MAX_QUEUE_SIZE)),
                   request_timeout_s=float(timeout) if timeout else None)


def load_components(params: ModelParameters):
    from kandinsky_trt.runtime.pipelines.components import Components

    components = Components(params.artifacts, params.backend, params.device, params.cuda_graph)
    for network in components.manifest.networks:  # load everything now: readiness means loaded
        components.session(network)
    return components


def load_executor(params: ModelParameters):
    from kandinsky_trt.runtime.serve.executor import Executor, ExecutorConfig

    return Executor(load_components(params), ExecutorConfig(max_images=params.max_images, batching=params.batching))


def load_step_service(params: ModelParameters, pb_utils, instance: str):
    from kandinsky_trt.runtime.serve.step_metrics import TritonStepMetrics
    from kandinsky_trt.runtime.serve.stepped import StepService

    metrics = TritonStepMetrics(pb_utils, instance)  # held by ``publish``, so as long as the service

    def publish(service, idle: bool) -> None:  # throttled while busy; at once when the work runs out
        metrics.publish(service.scheduler.metrics.snapshot(), service.scheduler.occupancy(), force=idle)

    return StepService(load_components(params), params.max_images, params.max_queue_size, params.request_timeout_s,
                       on_round=publish)


METRIC = "kandinsky_requests_total"
OUTCOMES = ("success", "error", "cancelled", "refused")


class RequestCounter:
    """``kandinsky_requests_total{outcome="success"|"error"|"cancelled"|"refused"}`` on Triton's /metrics
    (refused: answered UNAVAILABLE by the step scheduler, e.g. its queue was full).

    Triton's own ``nv_inference_request_failure`` does not see a Python model's per-request errors
    (they are responses, so Triton counts them as successes), hence this counter of our own.
    """

    def __init__(self, pb_utils) -> None:
        # The family must outlive its metrics (the backend refuses to count on a deleted family).
        self.family = pb_utils.MetricFamily(name=METRIC, description="kandinsky requests answered, by outcome",
                                            kind=pb_utils.MetricFamily.COUNTER)
        self.metrics = {outcome: self.family.Metric(labels={"outcome": outcome}) for outcome in OUTCOMES}

    def count(self, outcome: str) -> None:
        self.metrics[outcome].increment(1)


def request_bytes(inputs: dict[str, np.ndarray]) -> int:
    """What a request's tensors hold (BYTES elements by their length)."""
    total = 0
    for array in inputs.values():
        total += sum(len(v) for v in array.reshape(-1)) if array.dtype == object else array.nbytes
    return total


def oversized(inputs: dict[str, np.ndarray], limit: int) -> str | None:
    size = request_bytes(inputs)
    if size <= limit:
        return None
    return f"request: expected at most {limit} bytes of input tensors (this server's limit), found {size}"


# Response kind -> (counter outcome, TritonError code name): 400/INVALID_ARGUMENT for the client's
# mistakes, 500/INTERNAL for ours.
_ERRORS = {"client": ("error", "INVALID_ARG"), "server": ("error", "INTERNAL"), "cancelled": ("cancelled", "CANCELLED"),
           "unavailable": ("refused", "UNAVAILABLE")}


class TritonPythonModel:
    """What Triton's Python backend instantiates once per model instance."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.params = ModelParameters.from_model_config(args["model_config"])
        self.counter = RequestCounter(pb_utils)
        self.marks = CancelMarks(self.params.cancel_dir) if self.params.cancel_dir else None
        self.executor = self.service = None
        if self.params.scheduling == "step":
            self.service = load_step_service(self.params, pb_utils, args.get("model_instance_name", "kandinsky"))
        else:
            self.executor = load_executor(self.params)
        log.info("kandinsky model ready: %s on %s/%s, %s scheduling", self.params.artifacts, self.params.backend,
                 self.params.device, self.params.scheduling)

    def execute(self, requests: list) -> list | None:
        import triton_python_backend_utils as pb_utils

        inputs, refused = [], {}
        for index, request in enumerate(requests):
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUT_NAMES}
            arrays = {name: t.as_numpy() for name, t in tensors.items() if t is not None}
            message = oversized(arrays, self.params.max_request_bytes)
            if message is not None:  # gRPC has no transport bound in Triton 2.51: refuse before any work
                refused[index], arrays = message, {}
            inputs.append(arrays)
        if self.service is not None:
            return self._submit(pb_utils, requests, inputs, refused)
        gone = [self._gone(request) for request in requests]
        results = self.executor.handle(inputs, gone)
        return [self._response(pb_utils, refused.get(i), result) for i, result in enumerate(results)]

    def _submit(self, pb_utils, requests: list, inputs: list, refused: dict) -> None:
        """Step scheduling: hand each request to the scheduler; its one (final) response is sent
        through its response sender when it finishes. Triton's Python backend (2.48 and later) lets a
        model that is not decoupled answer this way when ``execute`` returns None, so plain HTTP and
        gRPC infer, ``curl`` included, work unchanged."""
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for index, (request, arrays) in enumerate(zip(requests, inputs)):
            sender = request.get_response_sender()
            if index in refused:
                sender.send(self._response(pb_utils, refused[index], None), flags=final)
                continue
            reply = lambda result, s=sender: s.send(self._response(pb_utils, None, result), flags=final)  # noqa: E731
            timeout_us = request.timeout()  # the client's KServe ``timeout`` parameter, 0 when not sent
            self.service.submit(arrays, self._gone(request), reply, timeout_us / 1e6 if timeout_us else None)
        return None

    def _gone(self, request):
        """Triton's cancellation (gRPC) or the HTTP front's mark of this request's token."""
        if self.marks is None:
            return request.is_cancelled
        return self.marks.gone(token_of(request.parameters()), request.is_cancelled)

    def _response(self, pb_utils, refused: str | None, result):
        if refused is not None:
            self.counter.count("error")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(refused, pb_utils.TritonError.INVALID_ARG))
        if result.error is None:
            self.counter.count("success")
            return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(n, a) for n, a in result.outputs.items()])
        outcome, code = _ERRORS[result.kind]
        self.counter.count(outcome)
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(result.error, getattr(pb_utils.TritonError, code)))

    def finalize(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service.pipelines.components.close()
        else:
            self.executor.pipelines.components.close()
