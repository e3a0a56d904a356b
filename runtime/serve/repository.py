"""``kandinsky-trt triton-repo``: write a Triton model repository for one artifacts directory.

Layout: ``REPO/kandinsky/config.pbtxt`` (generated from the contract and the manifest) and
``REPO/kandinsky/1/model.py``, a two-line file that imports
:class:`kandinsky_trt.runtime.serve.model.TritonPythonModel`, so the model's code is the installed
package's and the repository holds no copy of it. Files are written through temporary names and
``config.pbtxt`` last, so a half-written repository never looks complete.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kandinsky_trt.runtime.contract import manifest as mf
from kandinsky_trt.runtime.backends.registry import check_backend
from kandinsky_trt.runtime.contract.errors import PipelineInputError
from kandinsky_trt.runtime.serve.contract import MODEL_NAME, ModelConfig, config_pbtxt
from kandinsky_trt.runtime.serve.limits import (DEFAULT_MAX_QUEUE_SIZE, DEFAULT_MAX_REQUEST_BYTES,
                                                 DEFAULT_QUEUE_TIMEOUT_S)

SCHEDULING = ("request", "step")
STEP_TRITON_QUEUE_FACTOR = 4  # step scheduling: Triton's queue bound over the scheduler's (see with_queue_policy)
MODEL_PY = (
    '"""Triton Python-backend entry point, written by `kandinsky-trt triton-repo`."""\n'
    "from kandinsky_trt.runtime.serve.model import TritonPythonModel  # noqa: F401\n"
)


@dataclass(frozen=True)
class RepoConfig:
    artifacts: Path
    out: Path
    backend: str = "ort"
    device: str = "cpu"
    instances: int = 1
    max_queue_delay_us: int = 2000
    max_batch_size: int | None = None  # None: the largest profile batch
    max_images: int = 16
    batching: bool = True  # False: dynamic batching off (Triton delivers one request at a time)
    max_queue_size: int = DEFAULT_MAX_QUEUE_SIZE  # waiting requests beyond it: refused at once
    queue_timeout_s: float = DEFAULT_QUEUE_TIMEOUT_S  # waited longer: refused without running
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # the model refuses requests holding more
    cancel_dir: str | None = None  # where the HTTP front marks requests whose client has gone
    scheduling: str = "request"  # "step": requests join and leave the running batch at every step
    request_timeout_s: float | None = None  # step scheduling: the deadline of a request that sends none


def _check(config: RepoConfig) -> None:
    check_backend(config.backend)
    for name in ("instances", "max_images", "max_queue_size", "max_request_bytes"):
        if getattr(config, name) < 1:
            raise PipelineInputError(f"{name}: expected an integer >= 1, found {getattr(config, name)}")
    if not config.queue_timeout_s > 0:
        raise PipelineInputError(f"queue_timeout_s: expected a number of seconds > 0, found {config.queue_timeout_s}")
    if config.max_queue_delay_us < 0:
        raise PipelineInputError(f"max_queue_delay_us: expected >= 0, found {config.max_queue_delay_us}")
    if config.scheduling not in SCHEDULING:
        raise PipelineInputError(f"scheduling: expected one of {SCHEDULING}, found {config.scheduling!r}")
    if config.scheduling == "step" and not config.batching:
        raise PipelineInputError("scheduling: expected request-level scheduling with batching off, found step "
                                 "scheduling (it batches at every step; leave batching on)")
    if config.request_timeout_s is not None and not config.request_timeout_s > 0:
        raise PipelineInputError(f"request_timeout_s: expected a number of seconds > 0, found {config.request_timeout_s}")
    if config.max_batch_size is not None and config.max_batch_size < 1:
        raise PipelineInputError(f"max_batch_size: expected an integer >= 1, found {config.max_batch_size}")


def model_config(config: RepoConfig, manifest: mf.Manifest) -> ModelConfig:
    """Batch from the profile, embedding width from the model dims; nothing restated by hand."""
    params = (("artifacts", str(Path(config.artifacts).resolve())), ("backend", config.backend),
              ("device", config.device), ("max_images", str(config.max_images)),
              ("batching", "true" if config.batching else "false"),
              ("max_request_bytes", str(config.max_request_bytes)))
    if config.cancel_dir is not None:
        params += (("cancel_dir", str(config.cancel_dir)),)
    if config.scheduling == "step":
        params += (("scheduling", "step"), ("max_queue_size", str(config.max_queue_size)))
        if config.request_timeout_s is not None:
            params += (("request_timeout_s", repr(float(config.request_timeout_s))),)
    batch = config.max_batch_size or max(manifest.batches())
    return ModelConfig(
        max_batch_size=batch if config.batching else 1, embed_dim=manifest.model_dims.clip_dim,
        max_queue_delay_us=config.max_queue_delay_us, instances=config.instances,
        kind="KIND_GPU" if config.device == "cuda" else "KIND_CPU", parameters=params)


def with_queue_policy(pbtxt: str, config: RepoConfig) -> str:
    """The dynamic batcher's queue bounded: beyond ``max_queue_size`` waiting requests Triton refuses
    at once; a request still queued after ``queue_timeout_s`` (or the shorter timeout its client
    sends, the KServe ``timeout`` parameter in us) is refused without running, so an abandoned
    request does not wait for its turn to compute.

    With step scheduling the requests wait in the model's scheduler (bounded by ``max_queue_size``,
    refused with "queue full"); Triton's queue only holds them until ``execute`` hands them over,
    which returns at once, so its bound is set four times as large: the scheduler's is the one clients meet,
    and a burst faster than ``execute`` still meets a bound."""
    size = config.max_queue_size * (STEP_TRITON_QUEUE_FACTOR if config.scheduling == "step" else 1)
    policy = (f"  default_queue_policy {{\n    max_queue_size: {size}\n    timeout_action: REJECT\n"
              f"    default_timeout_microseconds: {round(config.queue_timeout_s * 1e6)}\n"
              f"    allow_timeout_override: true\n  }}\n")
    head, marker, tail = pbtxt.partition("dynamic_batching {\n")
    if not marker:
        raise ValueError("config.pbtxt: expected a dynamic_batching block, found none")
    return head + marker + policy + tail


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_repository(config: RepoConfig) -> Path:
    """Write (or overwrite) ``config.out/kandinsky``; returns the path of its ``config.pbtxt``."""
    _check(config)
    manifest = mf.load_manifest(config.artifacts)
    model_dir = Path(config.out) / MODEL_NAME
    _write(model_dir / "1" / "model.py", MODEL_PY)
    target = model_dir / "config.pbtxt"
    _write(target, with_queue_policy(config_pbtxt(model_config(config, manifest)), config))
    return target
