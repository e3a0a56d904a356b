"""Step-level batching on a real tritonserver (``kandinsky-trt serve --scheduling step``; issue 20).

One server per module on the batch-2 tiny artifacts (two slots per loop) with a small queue. Plain
clients, unchanged: KServe JSON over HTTP (what ``curl`` sends), tritonclient HTTP and gRPC.
Mixed step counts, tasks and guidance sharing steps give the Python API's images for each request
alone; a short request admitted while a long one runs finishes first; a full queue is refused at
once with 503 while the server stays ready; a gone client frees its slot; /metrics counts it all.
The service's mechanics without Triton: tests/test_serve_steps_units.py.
"""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import assert_same, metric_sum, python_api, request_counts, running_server, task_fields

from kandinsky_trt.runtime.pipelines.components import Components
from kandinsky_trt.runtime.serve.client import Target, build_inputs, item_arrays, make_client
from kandinsky_trt.runtime.serve.launcher import is_ready

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")
from tritonclient.utils import InferenceServerException  # noqa: E402

QUEUE = 5  # --max-queue-size: requests waiting in the scheduler's stage queues
H, W = 64, 128


@pytest.fixture(scope="module")
def server(artifacts_fp32_b2_wide):
    with running_server(artifacts_fp32_b2_wide[0], "--scheduling", "step", "--max-queue-size", str(QUEUE)) as cli:
        yield cli


@pytest.fixture(scope="module")
def components(artifacts_fp32_b2_wide):
    with Components(artifacts_fp32_b2_wide[0]) as c:
        yield c


def fields(task: str, seed: int, steps: int, **extra) -> dict:
    return {**task_fields(task, seed, H, W), "num_inference_steps": steps, **extra}


def infer(server, protocol: str, request: dict, **kwargs) -> dict[str, np.ndarray]:
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    client = make_client(Target(url, protocol, 120.0))
    try:
        result = client.infer("kandinsky", build_inputs(protocol, item_arrays(request)), **kwargs)
        return {"images": result.as_numpy("images")}
    finally:
        client.close()


def json_infer(server, request: dict) -> tuple[int, dict]:
    """KServe JSON over plain HTTP, as ``curl -d @body.json`` sends it (images as BYTES-free UINT8 lists)."""
    inputs = []
    for name, array in item_arrays(request).items():
        datatype = "BYTES" if array.dtype == object else {"int32": "INT32", "float32": "FP32", "uint8": "UINT8",
                                                           "int64": "INT64"}[array.dtype.name]
        data = [v.decode() for v in array.reshape(-1)] if array.dtype == object else array.reshape(-1).tolist()
        inputs.append({"name": name, "datatype": datatype, "shape": list(array.shape), "data": data})
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=120)
    try:
        conn.request("POST", "/v2/models/kandinsky/infer", body=json.dumps({"inputs": inputs}),
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def sched(server, family: str, event: str | None = None, stage: str | None = None) -> float:
    """A scheduler metric summed over the model's instances (one here)."""
    labels = {k: v for k, v in (("event", event), ("stage", stage)) if v is not None}
    return metric_sum(server, f"kandinsky_sched_{family}", **labels)


def wait_for(check, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out waiting for the server"
        time.sleep(0.02)


def test_mixed_requests_share_steps_and_each_equals_the_python_api_alone(server, components):
    # the first runs 60 steps, so the others (sent at once) share its decoder steps even on a loaded host
    requests = [("http", fields("text2img", 1, 60)), ("grpc", fields("img2img", 2, 6, guidance_scale=7.0)),
                ("http", fields("text2img", 3, 2, guidance_scale=1.0)),
                ("grpc", fields("inpaint", 4, 5, negative_prompt="blurry"))]
    rows_before = sched(server, "rows_run_total", stage="decoder")
    calls_before = sched(server, "calls_total", stage="decoder")
    with ThreadPoolExecutor(len(requests) + 1) as pool:
        served = [pool.submit(infer, server, protocol, request) for protocol, request in requests]
        plain = pool.submit(json_infer, server, fields("text2img", 5, 4))
        results = [f.result() for f in served]
        status, body = plain.result()
    for (_, request), result in zip(requests, results):
        assert_same(result, python_api(components, request))
    assert status == 200, body
    (output,) = body["outputs"]
    expected = python_api(components, fields("text2img", 5, 4))["images"]
    assert output["shape"] == list(expected.shape) and output["data"] == expected.reshape(-1).tolist()
    rows = sched(server, "rows_run_total", stage="decoder") - rows_before
    calls = sched(server, "calls_total", stage="decoder") - calls_before
    assert rows > calls  # steps ran with rows of two requests at once


def test_a_short_request_admitted_while_a_long_one_runs_finishes_first(server, components):
    long, short = fields("text2img", 11, 300), fields("text2img", 12, 3)
    done = {}
    with ThreadPoolExecutor(2) as pool:
        pending = pool.submit(lambda: (infer(server, "grpc", long), done.setdefault("long", time.monotonic())))
        wait_for(lambda: sched(server, "slots_occupied", stage="decoder") >= 1)  # long is stepping
        admitted = time.monotonic()
        result = infer(server, "http", short)
        done["short"] = time.monotonic()
        long_result = pending.result()[0]
    assert done["short"] < done["long"], (done, admitted)
    assert_same(result, python_api(components, short))
    assert_same(long_result, python_api(components, long))


def test_a_full_queue_is_refused_at_once_with_503_and_the_server_stays_ready(server):
    before = request_counts(server)
    refused_before = sched(server, "requests_total", "refused")
    burst = [fields("text2img", 20 + i, 60) for i in range(2 + 2 * QUEUE + 2)]  # slots + queue, and more
    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(lambda r: json_infer(server, r), burst))
        assert is_ready(server.config)  # checked while the burst is still being served
    refused = [body for status, body in answers if status == 503]
    # the scheduler's bound ("queue full"); Triton's own (4x larger) only if the burst outran execute
    messages = [body["error"] for body in refused]
    assert any("queue full: 5 requests are waiting" in m for m in messages), answers
    assert all("queue full" in m or "Exceeds maximum queue size" in m for m in messages), messages
    assert all(status in (200, 503) for status, _ in answers), [s for s, _ in answers]
    assert is_ready(server.config)
    assert sched(server, "requests_total", "refused") - refused_before == len(refused)
    assert request_counts(server)["refused"] - before["refused"] == len(refused)


def test_a_cancelled_request_frees_its_slot_and_is_counted(server):
    cancelled_before = sched(server, "requests_total", "cancelled")
    client = make_client(Target(server.config.grpc_url, "grpc", 120.0))
    try:
        with pytest.raises(InferenceServerException, match="DEADLINE_EXCEEDED|Deadline"):
            client.infer("kandinsky", build_inputs("grpc", item_arrays(fields("text2img", 30, 999))),
                         client_timeout=1.0)
    finally:
        client.close()
    wait_for(lambda: sched(server, "requests_total", "cancelled") - cancelled_before == 1, timeout_s=30)
    wait_for(lambda: sched(server, "slots_occupied", stage="decoder") == 0 and sched(server, "queue_depth") == 0)
    assert request_counts(server)["cancelled"] >= 1


def test_an_http_client_that_hangs_up_frees_its_slot(server):
    """The HTTP front marks a request whose client closed its connection; the scheduler polls the mark
    and the request leaves at the next step, its slot free, its mark removed."""
    from tritonclient.http import InferenceServerClient

    cancelled_before = sched(server, "requests_total", "cancelled")
    body, json_size = InferenceServerClient.generate_request_body(
        build_inputs("http", item_arrays(fields("text2img", 32, 999))))
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=1.0)
    conn.request("POST", "/v2/models/kandinsky/infer", body=body,
                 headers={"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(json_size)})
    with pytest.raises(OSError):  # socket.timeout: the client gives up and closes
        conn.getresponse()
    conn.close()
    wait_for(lambda: sched(server, "requests_total", "cancelled") - cancelled_before == 1, timeout_s=30)
    wait_for(lambda: sched(server, "slots_occupied", stage="decoder") == 0)
    wait_for(lambda: not list(server.cancel_dir().iterdir()))


def test_a_request_past_its_timeout_leaves_at_a_step_with_503(server):
    timed_before = sched(server, "requests_total", "timed_out")
    with pytest.raises(InferenceServerException) as err:
        infer(server, "http", fields("text2img", 31, 999), timeout=300_000)  # KServe timeout: 0.3 s in us
    assert err.value.status() == "503" and "timed out after 0.3 s" in str(err.value)
    wait_for(lambda: sched(server, "requests_total", "timed_out") - timed_before == 1, timeout_s=5)


def test_metrics_count_every_stage(server):
    for stage in ("encode", "prior", "decoder", "decode"):
        admitted = sched(server, "rows_total", "admitted", stage)
        assert admitted >= 10 and sched(server, "calls_total", stage=stage) >= 1, stage
        assert sched(server, "busy_seconds_total", stage=stage) > 0, stage
        run, offered = sched(server, "rows_run_total", stage=stage), sched(server, "rows_offered_total", stage=stage)
        assert 0 < run <= offered, stage
    # text2img and img2img share two decoder slots, inpaint has its own two
    assert sched(server, "slots", stage="decoder") == 4 and sched(server, "slots", stage="prior") == 2
    ended = sched(server, "ended_total")
    events = {e: sched(server, "requests_total", e) for e in ("submitted", "completed", "cancelled", "timed_out",
                                                              "failed", "refused")}
    assert events["completed"] >= 10 and events["failed"] == 0
    assert ended == events["completed"] + events["cancelled"] + events["timed_out"] + events["failed"]
    assert sched(server, "queue_seconds_total") > 0


def test_requests_held_when_the_model_process_dies_get_503_and_the_server_serves_again(server, components):
    """Runs last: it kills the model's stub. Triton never answers the requests a step-scheduled model
    held (their response senders die with the stub); the front answers them 503 (retryable) as soon as
    the watchdog sees the death, and the reloaded model serves."""
    import os
    import signal

    from kandinsky_trt.runtime.serve.watchdog import stubs_of

    held = [fields("text2img", 40 + i, 999) for i in range(2)]
    with ThreadPoolExecutor(len(held)) as pool:
        answers = [pool.submit(json_infer, server, request) for request in held]
        wait_for(lambda: sched(server, "slots_occupied", stage="decoder") >= 1)
        (stub,) = stubs_of(server.triton_pid())
        killed = time.monotonic()
        os.kill(stub, signal.SIGKILL)
        results = [a.result(timeout=60) for a in answers]
        answered_s = time.monotonic() - killed
    assert [status for status, _ in results] == [503, 503], results
    assert all("model process died" in body["error"] for _, body in results), results
    assert answered_s < 10, answered_s  # the watchdog polls every 0.5 s; not the clients' own timeouts
    wait_for(lambda: is_ready(server.config), timeout_s=120)
    request = fields("text2img", 42, 3)
    assert_same(infer(server, "http", request), python_api(components, request))
