"""Serving on a real tritonserver (the one bundled in nvidia-pytriton), on loopback and free ports.

One server per module, started from the CLI (`kandinsky-trt serve`) on the batch-2 tiny artifacts,
waited for with a bounded loop and stopped by PID at teardown, also when a test fails. The
kill-and-restart test runs a server of its own.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from serve_helpers import assert_same, python_api, request_counts, running_server, task_fields

from kandinsky_trt.runtime.serve.client import ClientError, Target, infer, item_arrays, make_client
from kandinsky_trt.runtime.serve.contract import INPUTS
from kandinsky_trt.runtime.serve.launcher import ServerConfig, TritonServer, is_ready

pytest.importorskip("pytriton", reason="needs the serve extra (nvidia-pytriton)")
pytest.importorskip("tritonclient.grpc", reason="needs the serve extra (tritonclient[grpc])")

TASKS = ("text2img", "img2img", "inpaint", "prior", "interpolate")
QUEUE_DELAY_US = 500_000  # long enough that two requests sent together share a batch on a busy CI machine


@pytest.fixture(scope="module")
def server(artifacts_fp32_b2_wide):
    with running_server(artifacts_fp32_b2_wide[0], "--max-queue-delay-us", str(QUEUE_DELAY_US)) as cli:
        yield cli
    assert "stopped" in "".join(cli.lines)


@pytest.fixture(scope="module")
def components(artifacts_fp32_b2_wide):
    from kandinsky_trt.runtime.pipelines.components import Components

    with Components(artifacts_fp32_b2_wide[0]) as c:
        yield c


def _fields(components, task: str, seed: int) -> dict:
    return task_fields(task, seed, components.profile.height, components.profile.width, prompt=f"prompt {seed}")


def _target(server, protocol: str) -> Target:
    return Target(server.config.http_url if protocol == "http" else server.config.grpc_url, protocol, 120.0)


def test_cli_server_is_up_with_the_contract(server):
    client = make_client(_target(server, "http"))
    try:
        assert client.is_server_ready() and client.is_model_ready("kandinsky")
        metadata = client.get_model_metadata("kandinsky")
    finally:
        client.close()
    assert [(t["name"], t["datatype"]) for t in metadata["inputs"]] == [(t.name, t.datatype) for t in INPUTS]
    assert "no authentication" in "".join(server.lines)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_every_task_equals_the_python_api(server, components, protocol):
    for seed, task in enumerate(TASKS):
        fields = _fields(components, task, seed)
        assert_same(infer(_target(server, protocol), item_arrays(fields)), python_api(components, fields))


def _statistics(server) -> int:
    client = make_client(_target(server, "http"))
    try:
        stats = client.get_inference_statistics("kandinsky")["model_stats"][0]
    finally:
        client.close()
    return int(stats["execution_count"])


def _send_together(server, fields_list: list[dict], protocol: str = "http") -> list:
    barrier = threading.Barrier(len(fields_list))

    def send(fields):
        arrays, target = item_arrays(fields), _target(server, protocol)
        client = make_client(target)
        try:
            barrier.wait(timeout=30)
            return infer(target, arrays, client)
        except ClientError as err:
            return err
        finally:
            client.close()

    with ThreadPoolExecutor(len(fields_list)) as pool:
        return list(pool.map(send, fields_list))


def test_batched_equals_serial(server, components):
    """Two requests that Triton batches into one model execution give the Python API's serial images."""
    fields = [_fields(components, "text2img", 11), _fields(components, "text2img", 12)]
    for _ in range(3):  # bounded: on a loaded machine the two may miss one batch window
        before = _statistics(server)
        results = _send_together(server, fields)
        if _statistics(server) - before == 1:
            break
    else:
        pytest.fail("two requests sent together were never executed as one batch")
    for f, result in zip(fields, results):
        assert_same(result, python_api(components, f))


def test_bad_requests_get_their_error_and_the_server_keeps_serving(server, components):
    good = _fields(components, "text2img", 21)
    # (request, its error): the pipelines' messages, the model's request checks, Triton's shape check.
    bad = [({**good, "height": 128}, r"height/width: expected a size these artifacts hold \(width x height: 128x64\)"),
           ({**good, "num_inference_steps": 0}, r"num_inference_steps: expected an integer >= 1, found 0"),
           ({k: v for k, v in good.items() if k != "prompt"},
            r"prompt: expected a BYTES input tensor 'prompt', found none|missing required input\(s\) \['prompt'\]"),
           ({**_fields(components, "img2img", 1), "image": np.zeros((64, 128, 4), np.uint8)},
            r"unexpected shape for input 'image'"),
           ({**good, "num_images": 10_000}, r"num_images: expected at most 16 \(this server's limit per prompt\)")]
    for protocol in ("http", "grpc"):
        for fields, message in bad:
            with pytest.raises(ClientError, match=message) as err:
                infer(_target(server, protocol), item_arrays(fields))
            assert "\n" not in str(err.value)
    # A bad request in the same batch as a good one: the good one is served.
    results = _send_together(server, [good, bad[1][0]])
    assert_same(results[0], python_api(components, good))
    assert isinstance(results[1], ClientError) and "num_inference_steps: expected" in str(results[1])
    assert is_ready(server.config)


def test_four_clients_eight_mixed_requests_each(server, components):
    def client_run(index: int) -> list:
        protocol = ("http", "grpc")[index % 2]
        out = []
        for j in range(8):
            task = TASKS[(index + j) % len(TASKS)]
            out.append((task, infer(_target(server, protocol), item_arrays(_fields(components, task, 100 + j)))))
        return out

    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(client_run, range(4)))
    height, width = components.profile.height, components.profile.width
    for task, outputs in (r for run in runs for r in run):
        if task == "prior":
            assert outputs["image_embeds"].shape == (1, 1, components.manifest.model_dims.clip_dim)
        else:
            assert outputs["images"].shape == (1, 1, height, width, 3)
    assert sum(len(run) for run in runs) == 32


def test_metrics_count_successes_and_failures(server, components):
    before = request_counts(server)
    good = _fields(components, "prior", 31)
    infer(_target(server, "http"), item_arrays(good))
    infer(_target(server, "grpc"), item_arrays(good))
    with pytest.raises(ClientError):
        infer(_target(server, "http"), item_arrays({**good, "prior_steps": 0}))
    after = request_counts(server)
    assert after["success"] - before["success"] == 2 and after["error"] - before["error"] == 1


def test_killed_server_gives_a_clear_error_and_a_restarted_one_serves(artifacts_fp32_b2_wide, components, tmp_path):
    from kandinsky_trt.runtime.serve.repository import RepoConfig, write_repository

    write_repository(RepoConfig(artifacts_fp32_b2_wide[0], tmp_path))
    config = ServerConfig(tmp_path, http_port=0, grpc_port=0, metrics_port=0)
    # Long enough (16 images x 500 steps: many seconds) that it is still running when the server dies.
    slow = {**_fields(components, "text2img", 41), "num_inference_steps": 500, "num_images": 16}
    with TritonServer(config) as first:
        pending = ThreadPoolExecutor(1).submit(infer, Target(first.config.http_url, "http", 120.0), item_arrays(slow))
        time.sleep(1.5)  # the request is in the model by now
        os.killpg(first.process.pid, signal.SIGKILL)
        with pytest.raises(ClientError, match=r"server 127\.0\.0\.1:\d+ \(http\): no answer, the connection failed"):
            pending.result(timeout=60)
    with TritonServer(config) as second:
        fields = _fields(components, "prior", 42)
        assert_same(infer(Target(second.config.http_url, "http"), item_arrays(fields)), python_api(components, fields))


_MP_MODEL = '''
import multiprocessing
import triton_python_backend_utils as pb_utils


def _square(x):
    return x * x


class TritonPythonModel:
    def initialize(self, args):
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.map(_square, [3]) == [9]

    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor("y", pb_utils.get_input_tensor_by_name(r, "x").as_numpy())])
                for r in requests]
'''
_MP_CONFIG = '''name: "mp"
backend: "python"
max_batch_size: 1
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
'''


def test_multiprocessing_works_inside_a_served_model(tmp_path):
    """The launcher's environment (this interpreter's libdir first) lets a model use multiprocessing;
    with the system's libpython of another build it fails at load ('_thread.RLock' has no attribute
    '_recursion_count' on this machine's pyenv 3.11.7 against Debian's 3.11)."""
    (tmp_path / "mp" / "1").mkdir(parents=True)
    (tmp_path / "mp" / "config.pbtxt").write_text(_MP_CONFIG)
    (tmp_path / "mp" / "1" / "model.py").write_text(_MP_MODEL)
    with TritonServer(ServerConfig(tmp_path, http_port=0, grpc_port=0, metrics_port=0, startup_timeout_s=60)) as s:
        assert is_ready(s.config)
