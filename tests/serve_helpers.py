"""Helpers of the serving tests: a CLI server, the Python API's reference results and request fields."""

from __future__ import annotations

import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kandinsky_trt.benchmarks.serve_cli import ServeCli
from kandinsky_trt.runtime.serve.launcher import ServerConfig, is_ready

STEPS = dict(num_inference_steps=3, prior_steps=2)


def make_image(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_mask(height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4: 3 * height // 4, width // 4: 3 * width // 4] = 255
    return mask


def task_fields(task: str, seed: int, height: int, width: int, prompt: str = "a red cat") -> dict:
    """Request fields of one item of ``task`` (small step counts, the artifacts' size)."""
    fields = dict(task=task, prompt=prompt, seed=seed, height=height, width=width, **STEPS)
    if task == "prior":
        fields = dict(task=task, prompt=prompt, seed=seed, prior_steps=2, negative_prompt="blurry")
    if task in ("img2img", "inpaint", "interpolate"):
        fields["image"] = make_image(height, width, seed)
    if task == "img2img":
        fields["strength"] = 0.6
    if task == "inpaint":
        fields["mask"] = make_mask(height, width)
    return fields


def python_api(components, fields: dict) -> dict[str, np.ndarray]:
    """What a Python user gets for the same arguments and ``generator=seed`` (the public API only)."""
    from kandinsky_trt.runtime import (KandinskyCombinedPipeline, KandinskyImg2ImgCombinedPipeline,
                                       KandinskyInpaintCombinedPipeline, KandinskyPipeline, KandinskyPriorPipeline)

    f = fields
    if f["task"] == "prior":
        out = KandinskyPriorPipeline(components=components)(
            f["prompt"], negative_prompt=f.get("negative_prompt"), num_inference_steps=f["prior_steps"],
            generator=f["seed"])
        return {"image_embeds": out.image_embeds[None], "negative_image_embeds": out.negative_image_embeds[None]}
    common = dict(height=f["height"], width=f["width"], num_inference_steps=f["num_inference_steps"],
                  generator=f["seed"])
    sent = {"guidance_scale": "guidance_scale", "negative_prompt": "negative_prompt",
            "num_images": "num_images_per_prompt"}
    common.update({kwarg: f[name] for name, kwarg in sent.items() if name in f and f["task"] != "interpolate"})
    if f["task"] == "interpolate":
        prior = KandinskyPriorPipeline(components=components)
        mix = prior.interpolate([f["prompt"], Image.fromarray(f["image"])], [0.5, 0.5],
                                num_inference_steps=f["prior_steps"], generator=f["seed"])
        images = KandinskyPipeline(components=components)("", mix.image_embeds, mix.negative_image_embeds,
                                                          **common).images
    else:
        common["prior_num_inference_steps"] = f["prior_steps"]
        if f["task"] == "text2img":
            images = KandinskyCombinedPipeline(components=components)(f["prompt"], **common).images
        elif f["task"] == "img2img":
            images = KandinskyImg2ImgCombinedPipeline(components=components)(
                f["prompt"], f["image"], strength=f["strength"], **common).images
        else:
            images = KandinskyInpaintCombinedPipeline(components=components)(
                f["prompt"], f["image"], f["mask"] / 255.0, **common).images
    return {"images": np.stack([np.asarray(i) for i in images])[None]}


def metric_values(server, family: str) -> list[tuple[dict, float]]:
    """One metric family on the server's /metrics: (labels, value) per line."""
    text = urllib.request.urlopen(server.config.metrics_url, timeout=10).read().decode()
    values = []
    for line in text.splitlines():
        name, _, rest = line.partition("{")
        if name == family or line.startswith(family + " "):
            labels = dict(pair.split("=", 1) for pair in rest.split("}")[0].split(",") if "=" in pair)
            values.append(({k: v.strip('"') for k, v in labels.items()}, float(line.rsplit(" ", 1)[1])))
    return values


def metric_sum(server, family: str, **labels: str) -> float:
    """The sum of ``family``'s values whose labels include ``labels`` (e.g. over model instances)."""
    return sum(v for found, v in metric_values(server, family) if labels.items() <= found.items())


def request_counts(server) -> dict[str, float]:
    """``kandinsky_requests_total`` by outcome (0 for an outcome not yet counted)."""
    counts = {"success": 0.0, "error": 0.0, "cancelled": 0.0, "refused": 0.0}
    for labels, value in metric_values(server, "kandinsky_requests_total"):
        counts[labels["outcome"]] += value
    return counts


def assert_same(served: dict, expected: dict) -> None:
    assert sorted(served) == sorted(expected)
    for name, value in expected.items():
        assert served[name].dtype == value.dtype and served[name].shape == value.shape, name
        np.testing.assert_array_equal(served[name], value, err_msg=name)


class CliServer(ServeCli):
    """``kandinsky-trt serve`` in a subprocess on free loopback ports (``ServeCli``), with its URLs."""

    def __init__(self, artifacts: Path, *extra: str, new_session: bool = False, ports: dict | None = None) -> None:
        super().__init__(artifacts, *extra, ports=ports, new_session=new_session)
        self.config = ServerConfig(Path("."), http_port=self.ports["http"], grpc_port=self.ports["grpc"],
                                   metrics_port=self.ports["metrics"])

    def wait_ready(self, timeout_s: float = 180.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail("kandinsky-trt serve exited:\n" + "".join(self.lines))
            if is_ready(self.config) and any("tritonserver pid" in line for line in self.lines):
                return
            time.sleep(0.25)
        pytest.fail("kandinsky-trt serve not ready in time:\n" + "".join(self.lines))

    def cancel_dir(self) -> Path:
        """The front's cancel-marks directory of this server (``kandinsky-cancel-<cli pid>-*``)."""
        import tempfile

        found = list(Path(tempfile.gettempdir()).glob(f"kandinsky-cancel-{self.process.pid}-*"))
        assert len(found) == 1, found
        return found[0]


@contextmanager
def running_server(artifacts: Path, *extra: str):
    """A module's ``serve`` process: ready on entry; on exit stopped, and it must have exited 0."""
    cli = CliServer(artifacts, *extra)
    try:
        cli.wait_ready()
        yield cli
    finally:
        cli.stop()
    assert cli.process.returncode == 0, "".join(cli.lines)
