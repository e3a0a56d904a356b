"""The served model's edge without a server: queue policy, error kinds, cancellation at a step
boundary, the front's header rules, leftovers of dead launchers."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest
from serve_helpers import task_fields

from kandinsky_trt.runtime.serve import hygiene
from kandinsky_trt.runtime.serve.client import item_arrays
from kandinsky_trt.runtime.serve.front import Refusal, _parse_head


@pytest.fixture(scope="module")
def components(artifacts_fp32_b2_wide):
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(artifacts_fp32_b2_wide[0]) as c:
        yield c


def _fields(components, task="text2img", seed=1, **extra):
    return {**task_fields(task, seed, components.profile.height, components.profile.width), **extra}


def test_config_bounds_the_queue_and_lets_clients_time_out(artifacts_fp32_b2_wide, tmp_path):
    from kandinsky_trt.runtime.contract.errors import PipelineInputError
    from kandinsky_trt.runtime.serve.repository import RepoConfig, write_repository

    text = write_repository(RepoConfig(artifacts_fp32_b2_wide[0], tmp_path, max_queue_size=5, queue_timeout_s=2.5,
                                       max_request_bytes=1000)).read_text()
    block = text[text.index("dynamic_batching {"):text.index("instance_group")]
    assert "max_queue_size: 5\n" in block and "timeout_action: REJECT" in block
    assert "allow_timeout_override: true" in block and "default_timeout_microseconds: 2500000" in block
    assert "max_queue_delay_microseconds: 2000" in block
    assert 'key: "max_request_bytes"\n  value: { string_value: "1000" }' in text
    for name in ("max_queue_size", "max_request_bytes"):
        with pytest.raises(PipelineInputError, match=f"{name}: expected an integer >= 1, found 0"):
            write_repository(RepoConfig(artifacts_fp32_b2_wide[0], tmp_path / name, **{name: 0}))
    with pytest.raises(PipelineInputError, match="queue_timeout_s: expected a number of seconds > 0, found 0"):
        write_repository(RepoConfig(artifacts_fp32_b2_wide[0], tmp_path / "t", queue_timeout_s=0))


def test_error_kinds_client_server_cancelled(components, monkeypatch):
    from kandinsky_trt.runtime.serve import executor as ex

    good = _fields(components)
    cases = [{k: v for k, v in good.items() if k != "prompt"}, {**good, "task": "paint"},
             {**good, "num_inference_steps": -3}, {**good, "height": components.profile.height + 64}]
    results = ex.Executor(components).handle([item_arrays(f) for f in cases])
    assert [r.kind for r in results] == ["client"] * len(cases), [r.error for r in results]
    monkeypatch.setattr(ex, "run_item", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    [failed] = ex.Executor(components, ex.ExecutorConfig(batching=False)).handle([item_arrays(good)])
    assert failed.kind == "server" and failed.error == "internal error: RuntimeError: boom"


class _GoneAfter:
    """``cancelled()`` that turns true at its ``n``-th call; counts the calls (= step boundaries seen)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.calls >= self.n


@pytest.mark.parametrize("task", ["text2img", "prior"])
def test_a_cancelled_request_stops_at_the_next_step(components, task):
    from kandinsky_trt.runtime.serve.executor import Executor, ExecutorConfig

    fields = _fields(components, task, num_inference_steps=50, prior_steps=50)
    for batching in (False, True):
        gone = _GoneAfter(5)
        [result] = Executor(components, ExecutorConfig(batching=batching)).handle([item_arrays(fields)], [gone])
        assert result.kind == "cancelled" and result.error == "request cancelled by the client"
        assert gone.calls == 5  # stopped at the boundary where it turned true: no step after it


def test_cancelled_before_it_starts_runs_nothing_and_a_merged_call_stops_only_when_all_have_gone(components):
    from kandinsky_trt.runtime.serve.executor import Executor

    a, b = _fields(components, seed=1), _fields(components, seed=2)
    executor = Executor(components)
    gone = _GoneAfter(1)
    [result] = executor.handle([item_arrays(a)], [gone])
    assert result.kind == "cancelled" and gone.calls == 1
    both = [_GoneAfter(3), _GoneAfter(3)]
    results = executor.handle([item_arrays(a), item_arrays(b)], both)
    assert [r.kind for r in results] == ["cancelled", "cancelled"]
    one = executor.handle([item_arrays(a), item_arrays(b)], [_GoneAfter(2), lambda: False])
    assert [r.kind for r in one] == ["success", "success"]  # the other client still waits for it


def test_oversized_counts_bytes_elements_by_length():
    from kandinsky_trt.runtime.serve.model import oversized, request_bytes

    arrays = {"prompt": np.array([[b"x" * 100]], dtype=object), "seed": np.zeros((1, 1), np.int64)}
    assert request_bytes(arrays) == 108
    assert oversized(arrays, 108) is None
    assert oversized(arrays, 107) == ("request: expected at most 107 bytes of input tensors (this server's limit), "
                                      "found 108")


def _head(*lines: str) -> bytes:
    return ("\r\n".join(["POST /v2/logging HTTP/1.1", "Host: x", *lines]) + "\r\n\r\n").encode()


def test_front_header_rules():
    forward, length, expect = _parse_head(_head("Content-Length: 10", "Expect: 100-continue",
                                                "Content-Type: application/x-www-form-urlencoded"), 10)
    assert (length, expect) == (10, True)
    assert b"Expect" not in forward and b"form-urlencoded" not in forward and b"Content-Length: 10" in forward
    with pytest.raises(Refusal, match=r"expected at most 10 bytes \(this server's limit\), found 11") as err:
        _parse_head(_head("Content-Length: 11"), 10)
    assert err.value.status.startswith("413") and err.value.discard == 11
    with pytest.raises(Refusal) as err:
        _parse_head(_head("Content-Length: 11", "Expect: 100-continue"), 10)
    assert err.value.discard == 0  # the client has not sent the body: nothing to read
    for bad in (["Content-Length: -1"], ["Content-Length: 1", "Content-Length: 2"], ["Content-Length: 1e3"]):
        with pytest.raises(Refusal, match="Content-Length: expected one integer"):
            _parse_head(_head(*bad), 10)
    with pytest.raises(Refusal, match="expected a Content-Length header, found Transfer-Encoding: chunked"):
        _parse_head(_head("Transfer-Encoding: chunked"), 10)


def test_sweep_removes_only_dead_launchers_leftovers(tmp_path, monkeypatch):
    monkeypatch.setattr(hygiene, "SHM_DIR", tmp_path / "shm")
    monkeypatch.setattr(hygiene.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    live = str(os.getppid())
    for name in (f"kandinsky-repo-{dead}-a", f"kandinsky-triton-{dead}-b", f"kandinsky-repo-{live}-c",
                 "kandinsky-repo-old", f"kandinsky-repo-{os.getpid()}-d", f"kandinsky-cancel-{dead}-e"):
        (tmp_path / "tmp" / name).mkdir(parents=True)
    (tmp_path / "shm").mkdir()
    for name in (f"kandinsky-shm-{dead}-x-1", f"kandinsky-shm-{live}-y-1", "triton_python_backend_shm_region_z"):
        (tmp_path / "shm" / name).write_bytes(b"prompt")
    removed = {p.name for p in hygiene.sweep()}
    assert removed == {f"kandinsky-repo-{dead}-a", f"kandinsky-triton-{dead}-b", f"kandinsky-cancel-{dead}-e",
                       f"kandinsky-shm-{dead}-x-1"}
    assert len(list((tmp_path / "tmp").iterdir())) == 3 and len(list((tmp_path / "shm").iterdir())) == 2


def test_secure_regions_narrows_to_owner_only(tmp_path, monkeypatch):
    monkeypatch.setattr(hygiene, "SHM_DIR", tmp_path)
    region = tmp_path / "kandinsky-shm-1-a-uuid"
    region.write_bytes(b"prompt")
    region.chmod(0o644)
    assert hygiene.secure_regions("kandinsky-shm-1-a-") == 1
    assert region.stat().st_mode & 0o777 == 0o600
    assert hygiene.secure_regions("kandinsky-shm-1-a-") == 0


def test_front_answers_503_when_tritonserver_does_not_accept():
    import http.client

    from kandinsky_trt.runtime.serve.front import FrontConfig, HttpFront
    from kandinsky_trt.runtime.serve.launcher import free_port

    front = HttpFront(FrontConfig("127.0.0.1", 0, free_port())).start()  # nothing listens upstream
    try:
        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=10)
        conn.request("GET", "/v2/health/ready")
        response = conn.getresponse()
        assert response.status == 503
        assert b"expected tritonserver to accept the request, found it not answering" in response.read()
        conn.close()
    finally:
        front.stop()


class _Upstream:
    """A stand-in tritonserver HTTP port: records each request head, answers 200 once ``release`` is set."""

    def __init__(self) -> None:
        import socket
        import threading

        self.heads, self.release = [], threading.Event()
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import threading

        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            self.heads.append(data.split(b"\r\n\r\n")[0].decode())
            self.release.wait(30)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def close(self) -> None:
        self.sock.close()


def _front(upstream_port: int, **bounds):
    from kandinsky_trt.runtime.serve.front import FrontConfig, HttpFront

    return HttpFront(FrontConfig("127.0.0.1", 0, upstream_port, **bounds)).start()


def _send(port: int, data: bytes, timeout: float = 10.0):
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.sendall(data)
    return s


def _read_all(s) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_front_marks_a_disconnected_request_until_triton_answers_it(tmp_path):
    """The front's half of HTTP cancellation: a fresh token per request (the client's own is dropped),
    marked when the client closes with its response pending, unmarked once Triton has answered."""
    import time

    from kandinsky_trt.runtime.serve.cancel import TOKEN_HEADER, CancelMarks, token_of

    upstream = _Upstream()
    front = _front(upstream.port, cancel_dir=str(tmp_path))
    try:
        forged = "f" * 32
        s = _send(front.port, f"POST /v2/x HTTP/1.1\r\nHost: x\r\n{TOKEN_HEADER}: {forged}\r\n"
                              f"Content-Length: 2\r\n\r\n{{}}".encode())
        while not upstream.heads:
            time.sleep(0.01)
        fields = dict(line.split(": ", 1) for line in upstream.heads[0].split("\r\n")[1:])
        token = token_of({k: v for k, v in fields.items()})
        assert token is not None and token != forged and list(fields).count(TOKEN_HEADER) == 1
        assert not list(tmp_path.iterdir())  # pending, client still there: not marked
        s.close()
        deadline = time.monotonic() + 5
        while not CancelMarks(tmp_path).is_marked(token) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [p.name for p in tmp_path.iterdir()] == [token]
        upstream.release.set()  # Triton answers the (cancelled) request: the mark goes
        while list(tmp_path.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not list(tmp_path.iterdir())
        s = _send(front.port, b"GET /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert _read_all(s).endswith(b"\r\n\r\nok")  # answered normally: nothing marked
        s.close()
        time.sleep(0.2)
        assert not list(tmp_path.iterdir())
    finally:
        front.stop()
        upstream.close()


def test_cancel_tokens_are_only_well_formed_ones():
    from kandinsky_trt.runtime.serve.cancel import CancelMarks, token_of

    good = "0123456789abcdef" * 2
    assert token_of('{"kandinsky-cancel-token": "%s"}' % good) == good
    assert token_of({"Kandinsky-Cancel-Token": good}) == good
    for bad in ("../../etc/passwd", good.upper(), good + "0", 7, None):
        assert token_of({"kandinsky-cancel-token": bad}) is None
    assert token_of("not json") is None and token_of(None) is None
    with pytest.raises(ValueError, match="expected 32 hex digits"):
        CancelMarks("/tmp").mark("../x")


def test_front_bounds_connections_and_times_out_slow_heads_and_bodies():
    """Beyond ``max_connections`` open connections: 503 at once; a head not complete within
    ``head_timeout_s``: closed; a body not complete within ``body_timeout_s``: 408; bodies beyond
    ``max_buffered_bytes`` held at once: 503."""
    import time

    upstream = _Upstream()
    upstream.release.set()
    front = _front(upstream.port, max_connections=2, head_timeout_s=0.5, body_timeout_s=0.5, max_buffered_bytes=100)
    try:
        held = [_send(front.port, b"POST /v2 HTTP/1.1\r\n") for _ in range(2)]  # slowloris: heads never end
        time.sleep(0.1)
        third = _read_all(_send(front.port, b"GET /v2 HTTP/1.1\r\nHost: x\r\n\r\n"))
        assert third.startswith(b"HTTP/1.1 503") and b"connections: expected at most 2 open at once" in third
        started = time.monotonic()
        assert [_read_all(s) for s in held] == [b"", b""]  # closed by the head timeout
        assert time.monotonic() - started < 2
        slow = _read_all(_send(front.port, b"POST /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\nabc"))
        assert slow.startswith(b"HTTP/1.1 408") and b"request body: expected 50 bytes within 0.5 s, found them slower" in slow
        big = _read_all(_send(front.port, b"POST /v2 HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\n" + b"x" * 101))
        assert big.startswith(b"HTTP/1.1 503") and b"expected room in this server's 100 bytes" in big
        ok = _read_all(_send(front.port, b"POST /v2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                         b"Content-Length: 100\r\n\r\n" + b"x" * 100))
        assert ok.startswith(b"HTTP/1.1 200") and ok.endswith(b"ok")  # the bounds still serve what fits
    finally:
        front.stop()
        upstream.close()


def test_response_length_rules():
    from kandinsky_trt.runtime.serve.front import _response_length

    assert _response_length(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", b"POST") == (200, 12)
    assert _response_length(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n", b"HEAD") == (200, 0)
    assert _response_length(b"HTTP/1.1 204 No Content\r\n\r\n", b"GET") == (204, 0)
    assert _response_length(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", b"GET") == (200, None)


def test_front_refuses_infer_with_503_while_the_model_reloads():
    """While the stub watchdog reloads the model, infer and readiness requests get 503 with the
    watchdog's reason (a balancer retries them on another replica; Triton would say "unknown model",
    400); liveness still reaches Triton; once the model is back, requests flow again."""
    upstream = _Upstream()
    upstream.release.set()
    front = _front(upstream.port)
    try:
        front.set_unavailable("model 'kandinsky': expected ready, found it reloading; retry")
        body = b'{"inputs": []}'
        infer = b"POST /v2/models/kandinsky/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        refused = _read_all(_send(front.port, infer))
        assert refused.startswith(b"HTTP/1.1 503") and b"found it reloading; retry" in refused
        for path in (b"/v2/health/ready", b"/v2/models/kandinsky/ready"):
            ready = _read_all(_send(front.port, b"GET %s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" % path))
            assert ready.startswith(b"HTTP/1.1 503"), ready
        live = _read_all(_send(front.port, b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"))
        assert live.startswith(b"HTTP/1.1 200") and len(upstream.heads) == 1  # liveness still reaches Triton
        front.set_unavailable(None)
        served = _read_all(_send(front.port, infer.replace(b"Host: x", b"Host: x\r\nConnection: close")))
        assert served.startswith(b"HTTP/1.1 200") and upstream.heads[-1].startswith("POST /v2/models/kandinsky/infer")
    finally:
        front.stop()
        upstream.close()


def test_front_answers_503_to_infer_requests_pending_when_the_model_process_dies():
    """A step-scheduled model answers through response senders that die with its process; Triton then
    never answers. The watchdog's report (``set_unavailable``) makes the front answer every pending
    infer request 503 and close its connection; a connection with no infer pending is left alone."""
    upstream = _Upstream()  # never answers until released
    front = _front(upstream.port)
    try:
        body = b'{"inputs": []}'
        infer = b"POST /v2/models/kandinsky/infer HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        held = [_send(front.port, infer) for _ in range(2)]
        metadata = _send(front.port, b"GET /v2/models/kandinsky HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        deadline = time.monotonic() + 10
        while len(upstream.heads) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        front.set_unavailable("model 'kandinsky': expected ready, found its model process died; retry")
        for s in held:
            answer = _read_all(s)  # then closed
            assert answer.startswith(b"HTTP/1.1 503") and b"found its model process died; retry" in answer, answer
        upstream.release.set()
        assert _read_all(metadata).startswith(b"HTTP/1.1 200")  # not an infer request: Triton's answer
    finally:
        front.stop()
        upstream.close()


@pytest.mark.parametrize("server_dies", [True, False], ids=["group-killed", "stub-only"])
def test_watchdog_reloads_only_when_a_stub_dies_under_a_live_server(server_dies, monkeypatch):
    """A killed process group takes tritonserver and its stubs together, and the stubs may be seen dead
    first: then nothing is reloaded and nobody is told "reloading" (the front's connections fail, which
    says what happened). A stub dying under a live server is reloaded, readiness false meanwhile."""
    from kandinsky_trt.runtime.serve import watchdog

    server, stub = 100, 101
    states = {server: ("S", 1), stub: ("Z", server), 102: ("S", server)}  # the stub is already a zombie ...
    seen = {"server": 0}

    def stat(pid):
        if pid == server:
            seen["server"] += 1
            if server_dies and seen["server"] > 1:  # ... and the server is one on the next look
                return ("Z", 1)
        return states.get(pid)

    posts, told = [], []
    monkeypatch.setattr(watchdog, "_stat", stat)
    monkeypatch.setattr(watchdog, "stubs_of", lambda pid: {stub} if not posts else {102})
    monkeypatch.setattr(watchdog, "secure_regions", lambda prefix: None)
    monkeypatch.setattr(watchdog, "_post", lambda url, timeout: posts.append(url.rsplit("/", 1)[1]))
    monkeypatch.setattr(watchdog, "POLL_S", 0.01)
    dog = watchdog.StubWatchdog(server, "127.0.0.1:1", "kandinsky", "prefix")
    dog.notify = told.append
    dog.start()
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline and (dog._thread.is_alive() if server_dies else not told[1:]):
        time.sleep(0.01)
    dog.stop()
    if server_dies:
        assert (posts, told, dog.reloads) == ([], [], 0)
    else:
        assert posts[:2] == ["unload", "load"] and told[:2] == [told[0], None] and dog.reloads == 1
        assert told[0] == "model 'kandinsky': expected ready, found it reloading after its model process died; retry"
