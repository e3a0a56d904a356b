"""Helpers for the C++ host's hostile-input and fuzz tests (tests/test_cpp_hostile.py,
tests/test_cpp_fuzz.py): building runtime/cpp with CMake, and a small hand-made artifacts directory
and recording: no export needed. Two networks (``unet`` and its step graph ``unet_step``), one
constant, one tokenizer file and a 2-step decoder table; the recording is computed here in float32
with the step graph's operation order, so the unmodified set replays with difference 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "cpp"

def build(out: Path, compiler: str, *options: str, build_type: str = "RelWithDebInfo") -> Path:
    """Configures and builds runtime/cpp into `out` with `compiler` (skipped without cmake,
    nlohmann-json or the compiler, except in CI, where that fails: .ci/run installs them)."""
    missing = [tool for tool in ("cmake", compiler) if shutil.which(tool) is None]
    if not Path("/usr/include/nlohmann/json.hpp").is_file():
        missing.append("nlohmann-json3-dev")
    if missing:
        message = f"the C++ host tests need {', '.join(missing)}"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs them in .ci/run)")
        pytest.skip(message)
    env = {**os.environ, "CXX": shutil.which(compiler)}
    for command in (["cmake", "-S", str(SOURCE), "-B", str(out), f"-DCMAKE_BUILD_TYPE={build_type}", *options],
                    ["cmake", "--build", str(out), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stdout + done.stderr
    return out


COLUMNS = ["p", "q", "clip_min", "clip_max", "u", "v", "w", "r", "s", "learned", "log_var_min", "log_var_max"]
F32_MAX = float(np.finfo(np.float32).max)
ROWS = [[1.5, -0.5, -F32_MAX, F32_MAX, 0.3, 0.6, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0],
        [1.25, -0.25, -F32_MAX, F32_MAX, 0.2, 0.7, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0]]
LATENTS = [1, 4, 8, 8]
OUTPUT = [2, 8, 8, 8]  # [uncond; cond] rows, channels + learned-variance channels
GUIDANCE = 4.0


def _tensor(name: str, shape: list[int]) -> dict:
    return {"name": name, "dtype": "float32", "shape": list(shape)}


def _network(name: str, inputs: list[dict], outputs: list[dict]) -> dict:
    return {"name": name, "onnx": f"{name}.onnx", "external_data": [], "engine": None,
            "profiles": [{"profile": 0, "inputs": inputs, "outputs": outputs}]}


def manifest_dict() -> dict:
    """The manifest (without its `files` records, which `write_artifacts` adds)."""
    step_inputs = [_tensor("latents", LATENTS), _tensor("model_output", OUTPUT), _tensor("coefficients", [1, 12]),
                   _tensor("noise", LATENTS), _tensor("guidance_scale", [1, 1]), _tensor("x0_prev", LATENTS)]
    step_outputs = [_tensor("latents_next", LATENTS), _tensor("x0", LATENTS), _tensor("model_input", [2, 4, 8, 8])]
    table = {"kind": "DDIMScheduler", "num_inference_steps": 2, "init_noise_sigma": 1.0, "columns": COLUMNS,
             "timesteps": [500, 0], "stochastic": [False, False], "coefficients": [list(row) for row in ROWS]}
    return {
        "schema_version": 4, "precision": "fp32",
        "profiles": [{"batch": 1, "height": 64, "width": 64, "cfg": True}],
        "networks": [_network("unet", [_tensor("sample", [2, 4, 8, 8]), _tensor("timestep", [2])],
                              [_tensor("noise_pred", OUTPUT)]),
                     _network("unet_step", step_inputs, step_outputs)],
        "constants": [{"name": "zero_image_embeds", "file": "zero.f32.bin", "dtype": "float32", "shape": [1, 32],
                       "sha256": ""}],
        "tokenizers": {"decoder": {"file": "tokenizer.json", "max_length": 77, "pad_id": 1}},
        "schedulers": {"decoder": {"config": {}, "tables": {"2": table}}},
    }


def write_artifacts(out: Path, manifest: dict | None = None) -> dict:
    """Writes the files and manifest.json (sizes and sha256 filled in); returns the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = manifest or manifest_dict()
    contents = {"unet.onnx": b"not a real graph: the host program runs no networks",
                "unet_step.onnx": b"step graph bytes",
                "zero.f32.bin": np.linspace(-1, 1, 32, dtype="<f4").tobytes(),
                "tokenizer.json": b'{"model": {}}'}
    for name, data in contents.items():
        (out / name).write_bytes(data)
    manifest["constants"][0]["sha256"] = hashlib.sha256(contents["zero.f32.bin"]).hexdigest()
    manifest["files"] = {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                         for name, data in contents.items()}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def _step(row: list[float], x, x0_prev, out, noise):
    p, q, lo, hi, u, v, w, r, s = (np.float32(c) for c in row[:9])
    uncond, cond = out[0:1, :4], out[1:2, :4]
    eps = uncond + np.float32(GUIDANCE) * (cond - uncond)
    x0 = np.minimum(np.maximum(p * x + q * eps, lo), hi)
    return u * x0 + v * x + w * eps + r * x0_prev + s * noise, x0


def write_recording(out: Path, seed: int = 0) -> Path:
    """recording.json + float32 files the way tests/test_cpp_host.py lays them out."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(LATENTS).astype(np.float32)
    outputs = rng.standard_normal([len(ROWS)] + OUTPUT).astype(np.float32)
    noise = np.zeros([len(ROWS)] + LATENTS, np.float32)
    arrays = {"latents": x, "x0_prev": np.zeros(LATENTS, np.float32), "model_outputs": outputs, "noise": noise}
    expected, expected_x0, x0 = [], [], np.zeros(LATENTS, np.float32)
    for i, row in enumerate(ROWS):
        x, x0 = _step(row, x, x0, outputs[i], noise[i])
        expected.append(x)
        expected_x0.append(x0)
    arrays.update(expected=np.stack(expected), expected_x0=np.stack(expected_x0))
    out.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.ascontiguousarray(array, "<f4").tofile(out / f"{name}.f32")
    (out / "recording.json").write_text(json.dumps(dict(
        network="unet", step_graph="unet_step", steps=len(ROWS),
        rows=[dict(scheduler="decoder", num_inference_steps=2, start=0, guidance_scale=GUIDANCE)],
        files={name: f"{name}.f32" for name in arrays})))
    return out
