"""The served model's edge (issue 18 §1) on a real tritonserver: request-size and queue bounds,
client errors as client errors, cancellation, readiness after the model process dies.

One `kandinsky-trt serve` per module (the batch-2 tiny artifacts, a small queue); the
readiness test kills its stub and runs last. Process-lifetime tests are in test_serve_lifetime.py.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from serve_helpers import request_counts, running_server, task_fields

from kandinsky_trt.runtime.serve.client import Target, build_inputs, item_arrays, make_client
from kandinsky_trt.runtime.serve.launcher import is_ready
from kandinsky_trt.runtime.serve.limits import DEFAULT_MAX_REQUEST_BYTES
from kandinsky_trt.runtime.serve.watchdog import stubs_of

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")
from tritonclient.utils import InferenceServerException  # noqa: E402

QUEUE = 4  # --max-queue-size of the module's server (the abandoned-requests test sends 3 at once)
CONNECTIONS = 8  # --max-connections of the module's server
LIMIT = DEFAULT_MAX_REQUEST_BYTES
NOT_READY_WITHIN_S = 3.0  # the watchdog polls every 0.5 s; the unload is immediate


@pytest.fixture(scope="module")
def server(artifacts_fp32_b2_wide):
    with running_server(artifacts_fp32_b2_wide[0], "--max-queue-size", str(QUEUE),
                        "--max-connections", str(CONNECTIONS)) as cli:
        yield cli


@pytest.fixture(scope="module")
def size(artifacts_fp32_b2_wide):
    from kandinsky_trt.runtime.contract import manifest as mf

    profile = mf.load_manifest(artifacts_fp32_b2_wide[0]).profiles[0]
    return profile.height, profile.width


def _post(server, path: str, body: bytes, headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=120)
    try:
        conn.request("POST", path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _json_body(total: int, name: str = "prompt") -> bytes:
    """A KServe JSON request of exactly ``total`` bytes: a small prior request padded with spaces."""
    request = {"inputs": [{"name": "task", "datatype": "BYTES", "shape": [1, 1], "data": ["prior"]},
                          {"name": name, "datatype": "BYTES", "shape": [1, 1], "data": ["a cat"]},
                          {"name": "prior_steps", "datatype": "INT32", "shape": [1, 1], "data": [2]}]}
    text = json.dumps(request).encode()
    return text[:-1] + b" " * (total - len(text)) + b"}"


def _long_string_body(total: int) -> bytes:
    """The issue's reproduction: one long string value (here of an input the model does not have)."""
    head, tail = b'{"inputs":[{"name":"nope","datatype":"BYTES","shape":[1,1],"data":["', b'"]}]}'
    return head + b"a" * (total - len(head) - len(tail)) + tail


def test_the_issues_crashing_body_no_longer_kills_the_server(server):
    """4,185,000 bytes sent as curl sends them (form-urlencoded) killed tritonserver 2.51 on SIGSEGV,
    on the model's, the logging and the repository endpoints alike."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path in ("/v2/models/kandinsky/infer", "/v2/logging", "/v2/repository/index"):
        status, _ = _post(server, path, _long_string_body(4_185_000), form)
        assert status in (200, 400), path  # Triton's own answer (an unknown input, a bad setting)
        assert is_ready(server.config) and server.process.poll() is None, path


def test_http_body_one_byte_over_the_bound_is_refused_and_at_the_bound_served(server):
    status, body = _post(server, "/v2/models/kandinsky/infer", _json_body(LIMIT + 1))
    assert status == 413
    assert json.loads(body)["error"] == (f"request body: expected at most {LIMIT} bytes (this server's limit), "
                                         f"found {LIMIT + 1}")
    assert is_ready(server.config)
    status, body = _post(server, "/v2/models/kandinsky/infer", _json_body(LIMIT))
    assert status == 200, body[:300]
    assert {o["name"] for o in json.loads(body)["outputs"]} == {"image_embeds", "negative_image_embeds"}
    status, body = _post(server, "/v2/logging", b"{}", {"Transfer-Encoding": "chunked"})
    assert status == 411 and b"expected a Content-Length" in body
    assert is_ready(server.config)


def test_http_connections_beyond_the_bound_get_503_and_the_server_stays_up(server):
    """Slow clients that hold connections open cannot take the front's memory: one more than
    --max-connections is answered 503 at once; once they go, requests are served again."""
    import socket

    held = [socket.create_connection(("127.0.0.1", server.ports["http"]), timeout=10) for _ in range(CONNECTIONS)]
    try:
        for s in held:
            s.sendall(b"POST /v2/models/kandinsky/infer HTTP/1.1\r\nHost: x\r\n")  # a head that never ends
        deadline = time.monotonic() + 10  # a loaded machine may take a moment to accept all of them
        status, body = _post(server, "/v2/health/ready", b"")
        while status != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
            status, body = _post(server, "/v2/health/ready", b"")
        assert status == 503 and f"expected at most {CONNECTIONS} open at once".encode() in body
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5
    while not is_ready(server.config) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert is_ready(server.config) and server.process.poll() is None


def test_grpc_request_over_the_bound_is_refused_by_the_model(server):
    client = make_client(Target(server.config.grpc_url, "grpc"))
    arrays = item_arrays({"task": "prior", "prompt": "a" * (LIMIT + 1), "prior_steps": 2})
    started = time.monotonic()
    try:
        with pytest.raises(InferenceServerException) as err:
            client.infer("kandinsky", build_inputs("grpc", arrays), client_timeout=120)
    finally:
        client.close()
    assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"request: expected at most {LIMIT} bytes of input tensors (this server's limit), found" in err.value.message()
    assert time.monotonic() - started < 20  # refused before the prompt is tokenized
    assert is_ready(server.config)


def _raw_infer(server, protocol: str, fields: dict | dict[str, np.ndarray], **kwargs):
    url = server.config.http_url if protocol == "http" else server.config.grpc_url
    arrays = fields if all(isinstance(v, np.ndarray) for v in fields.values()) else item_arrays(fields)
    client = make_client(Target(url, protocol, 120.0))
    try:
        return client.infer("kandinsky", build_inputs(protocol, arrays), **kwargs)
    finally:
        client.close()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_client_errors_are_400_and_invalid_argument(server, size, protocol):
    height, width = size
    good = task_fields("text2img", 1, height, width)
    bad_utf8 = {**item_arrays(good), "prompt": np.array([[b"\xff\xfe a cat"]], dtype=object)}
    cases = [({k: v for k, v in good.items() if k != "prompt"}, r"prompt"),
             ({**good, "task": "paint"}, r"task: expected one of .*found 'paint'"),
             (bad_utf8, r"prompt: expected UTF-8 text, found bytes that are not UTF-8"),
             ({**good, "num_inference_steps": -3}, r"num_inference_steps: expected an integer >= 1, found -3"),
             ({**good, "num_inference_steps": 1000}, r"num_inference_steps=1000 .*expected distinct decreasing"),
             ({**good, "height": height * 2}, r"height/width: expected a size these artifacts hold"),
             ({**good, "num_images": 10_000}, r"num_images: expected at most 16"),
             ({**good, "guidance_scale": float("nan")}, r"guidance_scale")]
    expected = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    for fields, message in cases:
        with pytest.raises(InferenceServerException, match=message) as err:
            _raw_infer(server, protocol, fields)
        assert err.value.status() == expected, (message, err.value.status(), err.value.message())
        assert "\n" not in err.value.message()
    assert is_ready(server.config)


def _timed(call) -> tuple[float, object]:
    started = time.monotonic()
    try:
        result = call()
    except InferenceServerException as err:
        result = err
    return time.monotonic() - started, result


def test_abandoned_grpc_requests_stop_at_a_step_and_count_as_cancelled(server, size):
    """A client that gives up (gRPC deadline) frees the model at the next step: the request after
    three abandoned ones waits far less than one of them computed to the end."""
    height, width = size
    long = {**task_fields("text2img", 5, height, width), "num_inference_steps": 400}
    full_s, result = _timed(lambda: _raw_infer(server, "grpc", long))
    assert not isinstance(result, Exception), result
    before = request_counts(server)
    with ThreadPoolExecutor(3) as pool:
        gone = list(pool.map(lambda _: _timed(lambda: _raw_infer(server, "grpc", long, client_timeout=0.5)),
                             range(3)))
    assert all(isinstance(r, InferenceServerException) and r.status() == "StatusCode.DEADLINE_EXCEEDED"
               for _, r in gone), gone
    next_s, result = _timed(lambda: _raw_infer(server, "grpc", task_fields("prior", 6, height, width)))
    assert not isinstance(result, Exception), result
    deadline = time.monotonic() + 10
    while request_counts(server)["cancelled"] - before["cancelled"] < 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    cancelled = request_counts(server)["cancelled"] - before["cancelled"]
    print(f"\nfull run {full_s:.2f} s; next request after 3 abandoned ones: {next_s:.2f} s; "
          f"counted cancelled: {cancelled:.0f}")
    assert next_s < full_s / 2, (full_s, next_s)
    assert cancelled >= 1


def _http_give_up(server, fields: dict, after_s: float) -> None:
    """An HTTP client that sends a request and closes its connection after ``after_s`` seconds."""
    from tritonclient.http import InferenceServerClient

    body, json_size = InferenceServerClient.generate_request_body(build_inputs("http", item_arrays(fields)))
    headers = {"Content-Type": "application/octet-stream", "kandinsky-cancel-token": "0" * 32}
    if json_size is not None:
        headers["Inference-Header-Content-Length"] = str(json_size)
    conn = http.client.HTTPConnection("127.0.0.1", server.ports["http"], timeout=after_s)
    conn.request("POST", "/v2/models/kandinsky/infer", body=body, headers=headers)
    with pytest.raises(OSError):  # socket.timeout: the client gives up
        conn.getresponse()
    conn.close()


def test_abandoned_http_requests_stop_at_a_step_and_count_as_cancelled(server, size):
    """Triton 2.51 does not notice an HTTP client that disconnects; the front does and marks the
    request's token: the model stops it at the next step, and the next request is not delayed."""
    height, width = size
    long = {**task_fields("text2img", 11, height, width), "num_inference_steps": 400}
    full_s, result = _timed(lambda: _raw_infer(server, "http", long))
    assert not isinstance(result, Exception), result
    before = request_counts(server)
    with ThreadPoolExecutor(3) as pool:
        list(pool.map(lambda _: _http_give_up(server, long, 0.5), range(3)))
    gave_up = time.monotonic()
    while request_counts(server)["cancelled"] - before["cancelled"] < 1 and time.monotonic() - gave_up < 30:
        time.sleep(0.05)
    stopped_s = time.monotonic() - gave_up
    next_s, result = _timed(lambda: _raw_infer(server, "http", task_fields("prior", 12, height, width)))
    assert not isinstance(result, Exception), result
    cancelled = request_counts(server)["cancelled"] - before["cancelled"]
    print(f"\nHTTP: full run {full_s:.2f} s; 3 clients gave up after 0.5 s: first counted cancelled "
          f"{stopped_s:.2f} s after they closed; next request {next_s:.2f} s; counted cancelled: {cancelled:.0f}")
    assert cancelled >= 1 and stopped_s < full_s / 2, (full_s, stopped_s)
    assert next_s < full_s / 2, (full_s, next_s)
    assert not list(server.cancel_dir().iterdir())  # every mark removed once its request ended


def test_a_request_queued_past_its_timeout_is_refused_without_running(server, size):
    """HTTP does not report a client that disconnects (Triton 2.51); a queue timeout bounds the wait."""
    height, width = size
    long = {**task_fields("text2img", 7, height, width), "num_inference_steps": 999}  # > 3 s on an idle VM
    before = request_counts(server)
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(lambda: _timed(lambda: _raw_infer(server, "grpc", long, client_timeout=3.0)))
        time.sleep(1.0)  # the long one is in the model now; the next request queues behind it
        waited, result = _timed(lambda: _raw_infer(server, "http", task_fields("prior", 8, height, width),
                                                   timeout=300_000))
        busy_s, busy_result = busy.result(timeout=60)
    # the busy request held the model until its client's deadline cancelled it
    assert isinstance(busy_result, InferenceServerException) and busy_s >= 2.5, (busy_s, busy_result)
    assert isinstance(result, InferenceServerException) and "timeout" in result.message().lower(), result
    after = request_counts(server)
    assert after["success"] == before["success"]  # the queued request never ran
    print(f"\nqueued request with a 0.3 s timeout refused after {waited:.2f} s (the model was busy)")
    assert waited < 10


def test_queue_is_bounded(server, size):
    """More waiting requests than --max-queue-size are refused at once, the rest are served."""
    height, width = size
    long = {**task_fields("text2img", 9, height, width), "num_inference_steps": 60}
    clients = 3 * QUEUE  # more than can execute (a batch of 2) and wait (QUEUE) together

    def send(_):
        barrier.wait(timeout=30)
        return _timed(lambda: _raw_infer(server, "grpc", long, client_timeout=120))[1]

    barrier = threading.Barrier(clients)
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(send, range(clients)))
    refused = [r for r in results if isinstance(r, InferenceServerException)]
    assert refused and all("Exceeds maximum queue size" in r.message() for r in refused), results
    assert len(results) - len(refused) >= QUEUE  # the queue's worth (and what was executing) was served
    assert is_ready(server.config)


def _model_ready(server) -> bool:
    try:
        url = f"http://{server.config.http_url}/v2/models/kandinsky/ready"
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_zz_readiness_turns_false_when_the_stub_dies_and_service_comes_back(server, size):
    """Runs last in the module: it kills the model's process."""
    height, width = size
    stubs = stubs_of(server.triton_pid())
    assert stubs, "no Python stub found under tritonserver"
    os.kill(min(stubs), signal.SIGKILL)
    killed = time.monotonic()
    while is_ready(server.config, timeout_s=1) and time.monotonic() - killed < 10:
        time.sleep(0.05)
    not_ready_s = time.monotonic() - killed
    assert not_ready_s < NOT_READY_WITHIN_S and not _model_ready(server)
    while not is_ready(server.config, timeout_s=1) and time.monotonic() - killed < 120:
        time.sleep(0.1)
    ready_s = time.monotonic() - killed
    print(f"\nstub killed: not ready after {not_ready_s:.2f} s, ready again after {ready_s:.2f} s")
    assert is_ready(server.config) and _model_ready(server)
    assert stubs_of(server.triton_pid()).isdisjoint(stubs)
    result = _raw_infer(server, "http", task_fields("prior", 10, height, width))
    assert result.as_numpy("image_embeds").shape[0] == 1
    assert "reloading the model" in "".join(server.lines)  # the launcher says why it was not ready
