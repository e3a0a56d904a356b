"""CLI commands of the serving layer: ``triton-repo``, ``serve`` and ``client``.

Registered from ``runtime/cli/main.py``'s ``build_parser`` through :func:`add_commands`; each handler
turns its arguments into the frozen configs of this package at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import shutil
import sys
import threading
from pathlib import Path

from kandinsky_trt.runtime.serve.contract import TASKS
from kandinsky_trt.runtime.serve.limits import (DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_QUEUE_SIZE, DEFAULT_MAX_REQUEST_BYTES,
                                                 DEFAULT_QUEUE_TIMEOUT_S)

DEMO_DIR = Path("kandinsky-demo")


def _repo_config(args: argparse.Namespace, artifacts: Path, out: Path):
    from kandinsky_trt.runtime.serve.repository import RepoConfig

    return RepoConfig(artifacts=artifacts, out=out, backend=args.backend, device=args.device,
                      instances=args.instances, max_queue_delay_us=args.max_queue_delay_us,
                      max_batch_size=args.max_batch_size, max_images=args.max_images,
                      batching=not args.no_batching, max_queue_size=args.max_queue_size,
                      queue_timeout_s=args.queue_timeout,
                      max_request_bytes=args.max_request_bytes, scheduling=args.scheduling,
                      request_timeout_s=args.request_timeout)


def _cmd_triton_repo(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime.serve.repository import write_repository

    path = write_repository(_repo_config(args, Path(args.artifacts), Path(args.out)))
    print(f"wrote {path} (and {path.parent / '1' / 'model.py'})")
    return 0


def _demo_artifacts() -> Path:
    """The demo's tiny artifacts, made by `kandinsky-trt demo` when missing (needs the export extra)."""
    artifacts = DEMO_DIR / "artifacts"
    if not (artifacts / "manifest.json").is_file():
        from kandinsky_trt.runtime.cli.main import main

        print(f"no --artifacts: making the demo's tiny model in {DEMO_DIR}/ (once)")
        if main(["demo", "--out", str(DEMO_DIR)]) != 0:
            from kandinsky_trt.runtime.serve.launcher import ServerError

            raise ServerError(f"--artifacts: expected the demo to make {artifacts}, found it failed")
    return artifacts


def _cmd_serve(args: argparse.Namespace) -> int:
    from kandinsky_trt.runtime.serve import hygiene
    from kandinsky_trt.runtime.serve.launcher import ServerConfig
    from kandinsky_trt.runtime.serve.repository import write_repository

    artifacts = Path(args.artifacts) if args.artifacts else _demo_artifacts()
    hygiene.check_ports_free(args.host, {"--http-port": args.http_port, "--grpc-port": args.grpc_port,
                                         "--metrics-port": args.metrics_port})  # before any work
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    repo = hygiene.make_dir("kandinsky-repo")  # named after this PID: the next start removes it if we die
    marks = hygiene.make_dir("kandinsky-cancel")  # 0700: the front's cancel marks, read by the model
    # Every server (one, or each replica) gets the same limits and the same cancel-mark directory.
    server_options = dict(startup_timeout_s=args.startup_timeout, max_request_bytes=args.max_request_bytes,
                          cancel_dir=marks, max_connections=args.max_connections, exit_timeout_s=args.exit_timeout)
    try:
        write_repository(dataclasses.replace(_repo_config(args, artifacts, repo), cancel_dir=str(marks)))
        if args.replicas is not None:
            from kandinsky_trt.runtime.serve.replicas import serve_replicas

            return serve_replicas(args, artifacts, repo, server_options, stop)
        config = ServerConfig(repo, host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                              metrics_port=args.metrics_port, **server_options)
        return _serve_until_stopped(config, artifacts, stop)
    finally:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.rmtree(marks, ignore_errors=True)


def _serve_until_stopped(config, artifacts: Path, stop: threading.Event) -> int:
    from kandinsky_trt.runtime.serve.launcher import TritonServer

    with TritonServer(config) as server:
        c = server.config
        print(f"serving {artifacts} as model 'kandinsky' (tritonserver pid {server.process.pid}; "
              f"no authentication: keep it behind a gateway)\n"
              f"  HTTP    http://{c.http_url}   (KServe v2; ready: /v2/health/ready; "
              f"bodies up to {c.max_request_bytes} bytes)\n"
              f"  gRPC    {c.grpc_url}\n  metrics {c.metrics_url}\n"
              f"try: .venv/bin/kandinsky-trt client \"a red cat\" --url {c.http_url} --out cat.png   (Ctrl-C stops)",
              flush=True)
        while not stop.wait(0.5):
            if server.process.poll() is not None:
                print(f"error: tritonserver exited with code {server.process.returncode}:\n{server.log_tail()}",
                      file=sys.stderr)
                return 1
    print("stopped")
    return 0


def _read_image(path: str | None, mode: str):
    from kandinsky_trt.runtime.serve.client import read_image

    return None if path is None else read_image(path, mode)


def _cmd_client(args: argparse.Namespace) -> int:
    from PIL import Image

    from kandinsky_trt.runtime.serve.client import Target, infer, item_arrays

    task = args.task or ("inpaint" if args.mask else "img2img" if args.image else "text2img")
    fields = dict(task=task, prompt=args.prompt, negative_prompt=args.negative_prompt, seed=args.seed,
                  num_images=args.num_images, guidance_scale=args.guidance, num_inference_steps=args.steps,
                  prior_steps=args.prior_steps, height=args.height, width=args.width, strength=args.strength,
                  image=_read_image(args.image, "RGB"), mask=_read_image(args.mask, "L"))
    outputs = infer(Target(args.url, args.protocol, args.timeout), item_arrays(fields))
    if "images" not in outputs:
        for name, value in sorted(outputs.items()):
            print(f"{name}: shape {list(value.shape)}, first values {value.reshape(-1)[:4]}")
        return 0
    images = outputs["images"][0]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(images):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{i}{out.suffix}")
        Image.fromarray(array).save(path)
        print(f"wrote {path}")
    return 0


def _add_server_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=("ort", "torch", "trt"), default="ort", help="default ort (ONNX Runtime)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: instance_group KIND_GPU")
    p.add_argument("--instances", type=int, default=1, help="model instances (each loads every network; default 1)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000,
                   help="how long the dynamic batcher waits to fill a batch (default 2000 us)")
    p.add_argument("--max-batch-size", type=int,
                   help="requests per batch (default: the largest batch of the artifacts' profiles)")
    p.add_argument("--max-images", type=int, default=16, help="largest num_images a request may ask (default 16)")
    p.add_argument("--no-batching", action="store_true", help="one request per model call (to compare)")
    p.add_argument("--max-queue-size", type=int, default=DEFAULT_MAX_QUEUE_SIZE,
                   help=f"requests waiting beyond it are refused at once (default {DEFAULT_MAX_QUEUE_SIZE})")
    p.add_argument("--queue-timeout", type=float, default=DEFAULT_QUEUE_TIMEOUT_S,
                   help=f"seconds a request may wait for the model before it is refused unrun (default "
                        f"{DEFAULT_QUEUE_TIMEOUT_S:.0f}; a client may ask for less)")
    p.add_argument("--scheduling", choices=("request", "step"), default="request",
                   help="request: a batch runs to its end (default); step: requests join and leave the running "
                        "batch at every denoising step (the queue bound is --max-queue-size)")
    p.add_argument("--request-timeout", type=float,
                   help="step scheduling: seconds after which a request leaves at the next step, when it sends no "
                        "KServe timeout of its own (default: none)")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest HTTP request body (413 above; default {DEFAULT_MAX_REQUEST_BYTES}); the model "
                        "refuses larger gRPC requests")


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, found {text!r}")
    return int(text)


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 60:  # NaN fails too
        raise argparse.ArgumentTypeError(f"expected seconds in [0.1, 60], found {text!r}")
    return value


def add_commands(sub) -> None:
    """Add ``triton-repo``, ``serve`` and ``client`` to the ``kandinsky-trt`` sub-parsers."""
    p = sub.add_parser("triton-repo", help="write a Triton model repository (model 'kandinsky') for artifacts")
    p.add_argument("--artifacts", required=True, help="artifacts directory from `export`")
    p.add_argument("--out", required=True, help="model repository directory to write")
    _add_server_args(p)
    p.set_defaults(func=_cmd_triton_repo)

    p = sub.add_parser("serve", help="serve artifacts on Triton Inference Server (HTTP + gRPC, KServe v2)")
    p.add_argument("--artifacts", help="artifacts directory (default: the demo's tiny model, made if missing)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; no authentication)")
    p.add_argument("--http-port", type=int, default=8000, help="0 = a free port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=8001, help="0 = a free port (default 8001)")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus /metrics; 0 = a free port (default 8002)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="seconds to wait for readiness (default 300)")
    p.add_argument("--replicas", type=_positive_int, help="N tritonservers (one per GPU with --device cuda) behind "
                   "HAProxy on the ports above, health-checked and restarted when they die")
    p.add_argument("--health-interval", type=_interval, default=1.0,
                   help="with --replicas: seconds between HAProxy's readiness checks of each replica; one is out "
                        "of rotation after 2 failed checks, back after 2 good ones (default 1)")
    p.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                   help=f"HTTP connections held at once; more get 503 (default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--exit-timeout", type=int, default=10,
                   help="on SIGTERM/Ctrl-C, seconds in-flight requests may finish before the server exits (default 10)")
    _add_server_args(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("client", help="send one request to a served 'kandinsky' model and save the images")
    p.add_argument("prompt", help="what to draw")
    p.add_argument("--url", default="127.0.0.1:8000", help="host:port (default 127.0.0.1:8000, HTTP)")
    p.add_argument("--protocol", choices=("http", "grpc"), default="http")
    p.add_argument("--task", choices=TASKS, help="default text2img (img2img with --image, inpaint with --mask)")
    p.add_argument("--out", default="out.png", help="output image (several: out-0.png, ...)")
    p.add_argument("--image", help="input image (img2img, inpaint, interpolate)")
    p.add_argument("--mask", help="inpaint mask image: white = repaint")
    p.add_argument("--strength", type=float, help="img2img strength; interpolate: the image's weight")
    p.add_argument("--negative-prompt")
    p.add_argument("--seed", type=int, help="same seed, same image as the Python API's generator=seed")
    p.add_argument("--num-images", type=int)
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--steps", type=int, help="decoder steps (default: the pipeline's)")
    p.add_argument("--prior-steps", type=int, help="prior steps (default: the pipeline's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the answer (default 600)")
    p.set_defaults(func=_cmd_client)
