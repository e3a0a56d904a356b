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

from kandinsky_trt.runtime.serve.contract import INPUT_NAMES

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

    @classmethod
    def from_model_config(cls, model_config: str) -> "ModelParameters":
        params = {k: v["string_value"] for k, v in json.loads(model_config).get("parameters", {}).items()}
        return cls(artifacts=params["artifacts"], backend=params.get("backend", "ort"),
                   device=params.get("device", "cpu"), cuda_graph=params.get("cuda_graph", "true") == "true",
                   max_images=int(params.get("max_images", 16)), batching=params.get("batching", "true") == "true")


def load_executor(params: ModelParameters):
    from kandinsky_trt.runtime.pipelines.components import Components
    from kandinsky_trt.runtime.serve.executor import Executor, ExecutorConfig

    components = Components(params.artifacts, params.backend, params.device, params.cuda_graph)
    for network in components.manifest.networks:  # load everything now: readiness means loaded
        components.session(network)
    return Executor(components, ExecutorConfig(max_images=params.max_images, batching=params.batching))


METRIC = "kandinsky_requests_total"


class RequestCounter:
    """``kandinsky_requests_total{outcome="success"|"error"}`` on Triton's /metrics.

    Triton's own ``nv_inference_request_failure`` does not see a Python model's per-request errors
    (they are responses, so Triton counts them as successes), hence this counter of our own.
    """

    def __init__(self, pb_utils) -> None:
        # The family must outlive its metrics (the backend refuses to count on a deleted family).
        self.family = pb_utils.MetricFamily(name=METRIC, description="kandinsky requests answered, by outcome",
                                            kind=pb_utils.MetricFamily.COUNTER)
        self.metrics = {outcome: self.family.Metric(labels={"outcome": outcome}) for outcome in ("success", "error")}

    def count(self, outcome: str) -> None:
        self.metrics[outcome].increment(1)


class TritonPythonModel:
    """What Triton's Python backend instantiates once per model instance."""

    def initialize(self, args: dict) -> None:
        import triton_python_backend_utils as pb_utils

        params = ModelParameters.from_model_config(args["model_config"])
        self.executor = load_executor(params)
        self.counter = RequestCounter(pb_utils)
        log.info("kandinsky model ready: %s on %s/%s", params.artifacts, params.backend, params.device)

    def execute(self, requests: list) -> list:
        import triton_python_backend_utils as pb_utils

        inputs = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUT_NAMES}
            inputs.append({name: t.as_numpy() for name, t in tensors.items() if t is not None})
        responses = []
        for result in self.executor.handle(inputs):
            self.counter.count("error" if result.error is not None else "success")
            if result.error is not None:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(result.error)))
            else:
                outputs = [pb_utils.Tensor(name, array) for name, array in result.outputs.items()]
                responses.append(pb_utils.InferenceResponse(output_tensors=outputs))
        return responses

    def finalize(self) -> None:
        self.executor.pipelines.components.close()
