"""The Python-backend model ``kandinsky``: Triton's tensors in and out of :class:`Executor`.

Runs inside Triton's Python stub, with this project's interpreter (see ``launcher``).
``initialize`` loads one :class:`Components` from the ``artifacts`` parameter of ``config.pbtxt``
and loads every network at once, so "ready" means ready to serve (and a TensorRT plan built with
another TensorRT version than the server's fails here, by the backend's manifest check, not on the
first request). ``execute`` answers each request with its outputs or a ``TritonError`` of its own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import numpy as np

from kandinsky_trt.runtime.serve.cancel import CancelMarks, token_of
from kandinsky_trt.runtime.serve.contract import INPUT_NAMES
from kandinsky_trt.runtime.serve.limits import DEFAULT_MAX_REQUEST_BYTES

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

    @classmethod
    def from_model_config(cls, model_config: str) -> "ModelParameters":
        params = {k: v["string_value"] for k, v in json.loads(model_config).get("parameters", {}).items()}
        return cls(artifacts=params["artifacts"], backend=params.get("backend", "ort"),
                   device=params.get("device", "cpu"), cuda_graph=params.get("cuda_graph", "true") == "true",
                   max_images=int(params.get("max_images", 16)), batching=params.get("batching", "true") == "true",
                   max_request_bytes=int(params.get("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES)),
                   cancel_dir=params.get("cancel_dir"))


def load_executor(params: ModelParameters):
    from kandinsky_trt.runtime.pipelines.components import Components
    from kandinsky_trt.runtime.serve.executor import Executor, ExecutorConfig

    components = Components(params.artifacts, params.backend, params.device, params.cuda_graph)
    for network in components.manifest.networks:  # load everything now: readiness means loaded
        components.session(network)
    return Executor(components, ExecutorConfig(max_images=params.max_images, batching=params.batching))


METRIC = "kandinsky_requests_total"
OUTCOMES = ("success", "error", "cancelled")


class RequestCounter:
    """``kandinsky_requests_total{outcome="success"|"error"|"cancelled"}`` on Triton's /metrics.

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
_ERRORS = {"client": ("error", "INVALID_ARG"), "server": ("error", "INTERNAL"), "cancelled": ("cancelled", "CANCELLED")}


class TritonPythonModel:
    """What Triton's Python backend instantiates once per model instance."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        self.params = ModelParameters.from_model_config(args["model_config"])
        self.executor = load_executor(self.params)
        self.counter = RequestCounter(pb_utils)
        self.marks = CancelMarks(self.params.cancel_dir) if self.params.cancel_dir else None
        log.info("kandinsky model ready: %s on %s/%s", self.params.artifacts, self.params.backend, self.params.device)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        inputs, refused = [], {}
        for index, request in enumerate(requests):
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUT_NAMES}
            arrays = {name: t.as_numpy() for name, t in tensors.items() if t is not None}
            message = oversized(arrays, self.params.max_request_bytes)
            if message is not None:  # gRPC has no transport bound in Triton 2.51: refuse before any work
                refused[index], arrays = message, {}
            inputs.append(arrays)
        gone = [self._gone(request) for request in requests]
        results = self.executor.handle(inputs, gone)
        return [self._response(pb_utils, refused.get(i), result) for i, result in enumerate(results)]

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
        self.executor.pipelines.components.close()
