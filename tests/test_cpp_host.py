"""The C++ host contract, proven: runtime/cpp reads the manifest and replays the Python loop's maths.

The Python loop runs on the tiny fp32 artifacts with every network and step-graph call recorded;
the C++ program (built here with CMake) loads the same manifest, its coefficient tables and
constants, and replays the step update over the recorded model outputs. It must reproduce every
step's latents to 1e-6 relative (max |c++ - python| / max |python| per step).

Needs CMake, a C++17 compiler and nlohmann-json (Debian: cmake g++ nlohmann-json3-dev; .ci/run
installs them). Skipped where they are missing, except in CI (``CI`` set), where that fails.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from kandinsky_trt.runtime import KandinskyInpaintPipeline

from kandinsky_trt.runtime import KandinskyPipeline

from kandinsky_trt.runtime import KandinskyPriorPipeline
from kandinsky_trt.runtime.contract.schedulers import SchedulerTable, apply_step
from kandinsky_trt.runtime.pipelines.components import Components

SOURCE = Path(__file__).resolve().parents[1] / "runtime" / "cpp"
E = 32


@pytest.fixture(scope="module")
def host_program(tmp_path_factory) -> Path:
    if shutil.which("cmake") is None or not Path("/usr/include/nlohmann/json.hpp").is_file():
        message = "the C++ host contract needs cmake, g++ and nlohmann-json3-dev"
        if os.environ.get("CI"):
            pytest.fail(message + " (CI installs them in .ci/run)")
        pytest.skip(message)
    build = tmp_path_factory.mktemp("cpp-build")
    for command in (["cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", str(build), "-j2"]):
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return build / "ktrt_host_contract"


class _Recording:
    """Wraps a backend's ``load`` so every run of the loop's network and step graph is kept."""

    def __init__(self, components: Components, network: str, step_graph: str) -> None:
        self.calls: dict[str, list] = {network: [], step_graph: []}
        load = components.backend.load

        def recording_load(name: str, profile: int = 0):
            session = load(name, profile)
            if name not in self.calls:
                return session
            calls = self.calls[name]

            class Recorded:
                def __getattr__(self, attr):
                    return getattr(session, attr)

                def run(self, feeds):
                    out = session.run(feeds)
                    calls.append(({k: np.array(v) for k, v in feeds.items()}, {k: np.array(v) for k, v in out.items()}))
                    return out

            return Recorded()

        components.backend.load = recording_load

    def write(self, out: Path, record: dict, output_name: str) -> Path:
        """recording.json + raw float32 files in the layout runtime/cpp/main.cpp reads. ``record``: network,
        step_graph, scheduler, num_inference_steps, guidance_scale of the lockstep chunk: every latents
        row gets that table from its first row, with that guidance."""
        network, step_graph = record["network"], record["step_graph"]
        # The loop of slots writes the first network input itself (no identity-row run of the step
        # graph), so every step-graph run is a step and the first one reads the initial latents.
        steps = self.calls[step_graph]
        arrays = {
            "latents": steps[0][0]["latents"],
            "x0_prev": steps[0][0]["x0_prev"],
            "model_outputs": np.stack([outputs[output_name] for _, outputs in self.calls[network]]),
            "noise": np.stack([feeds["noise"] for feeds, _ in steps]),
            "expected": np.stack([outputs["latents_next"] for _, outputs in steps]),
            "expected_x0": np.stack([outputs["x0"] for _, outputs in steps]),
        }
        row = dict(scheduler=record["scheduler"], num_inference_steps=record["num_inference_steps"], start=0,
                   guidance_scale=record["guidance_scale"])
        rows = [row] * len(arrays["latents"])
        return write_recording(out, dict(network=network, step_graph=step_graph, steps=len(steps), rows=rows), arrays)


def write_recording(out: Path, record: dict, arrays: dict[str, np.ndarray]) -> Path:
    """recording.json (``record`` + the file names) and one raw little-endian float32 file per array."""
    out.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        np.ascontiguousarray(array, "<f4").tofile(out / f"{name}.f32")
    files = {name: f"{name}.f32" for name in arrays}
    (out / "recording.json").write_text(json.dumps({**record, "files": files}))
    return out


def _replay(host_program: Path, artifacts: Path, recording: Path, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(host_program), str(artifacts), str(recording), *options], capture_output=True,
                          text=True, timeout=120)


def _emb(seed: int, rows: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, E)).astype(np.float32)


CASES = {
    # loop, scheduler table key, steps (a table the manifest stores), guidance
    "decoder-ddim": ("unet", "unet_step", "noise_pred", "decoder", 50, 4.0),
    "decoder-ddpm": ("unet", "unet_step", "noise_pred", "decoder_ddpm", 100, 4.0),  # learned variance, noise
    "prior-unclip": ("prior", "prior_step", "predicted_image_embedding", "prior", 25, 4.0),  # stochastic
    "inpaint-ddim": ("unet_inpaint", "unet_inpaint_step", "noise_pred", "decoder", 50, 3.0),
}


def _run_case(case: str, artifacts: Path, seed: int = 0) -> _Recording:
    network, step_graph, _, scheduler, steps, guidance = CASES[case]
    with Components(artifacts) as components:
        recorder = _Recording(components, network, step_graph)
        common = dict(num_inference_steps=steps, guidance_scale=guidance, generator=seed)
        if case.startswith("prior"):
            KandinskyPriorPipeline(components=components)("a red cat", **common)
        elif case.startswith("inpaint"):
            h, w = components.profile.height, components.profile.width
            mask = np.zeros((h, w), np.float32)
            mask[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = 1
            image = np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)
            KandinskyInpaintPipeline(components=components)("a hat", image, mask, _emb(1), _emb(2), **common)
        else:
            KandinskyPipeline(components=components)(
                "a castle", _emb(1), _emb(2), scheduler="ddpm" if scheduler == "decoder_ddpm" else None, **common)
    return recorder


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("fixture", ["artifacts_fp32", "artifacts_fp32_b2_wide"])
def test_cpp_host_reproduces_the_python_loop(case, fixture, request, host_program, tmp_path):
    artifacts = request.getfixturevalue(fixture)[0]
    network, step_graph, output_name, scheduler, steps, guidance = CASES[case]
    recorder = _run_case(case, artifacts)
    record = dict(network=network, step_graph=step_graph, scheduler=scheduler, num_inference_steps=steps,
                  guidance_scale=guidance)
    done = _replay(host_program, artifacts, recorder.write(tmp_path / "rec", record, output_name))
    assert done.returncode == 0, done.stdout + done.stderr
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith(f"replayed {steps} steps of {step_graph}") and last.endswith("ok"), done.stdout
    assert f"bind {network}" in done.stdout and "constant zero_image_embeds" in done.stdout


def test_cpp_host_detects_a_wrong_replay(host_program, artifacts_fp32, tmp_path):
    """The comparison is real: a perturbed recorded model output makes the replay differ."""
    artifacts = artifacts_fp32[0]
    recorder = _run_case("decoder-ddim", artifacts)
    feeds, outputs = recorder.calls["unet"][10]
    outputs["noise_pred"] += 1e-3
    record = dict(network="unet", step_graph="unet_step", scheduler="decoder", num_inference_steps=50,
                  guidance_scale=4.0)
    done = _replay(host_program, artifacts, recorder.write(tmp_path / "rec", record, "noise_pred"))
    assert done.returncode == 1 and done.stdout.strip().endswith("FAIL"), done.stdout


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.update(schema_version=99), "manifest.schema_version: expected 4, found 99"),
    (lambda m: m.update(schema_version=3), "manifest.schema_version: expected 4, found 3 (the artifacts predate "
                                           "per-row timesteps and coefficients; re-run `kandinsky-trt export`)"),
    (lambda m: m.update(schema_version=2), "manifest.schema_version: expected 4, found 2 (the artifacts predate "
                                           "per-row timesteps and coefficients; re-run `kandinsky-trt export`)"),
    (lambda m: m["constants"][0].update(file="../outside.bin"),
     "expected a file name inside the artifacts directory, found '../outside.bin'"),
    (lambda m: m["constants"][0].update(file="/etc/passwd"),
     "expected a file name inside the artifacts directory, found '/etc/passwd'"),
    (lambda m: m["constants"][0].update(sha256="0" * 64), "does not match"),
    (lambda m: m.pop("profiles"), "manifest.profiles: expected the field, found none"),
    (lambda m: m["networks"][0]["profiles"].clear(), ".profiles: expected the resolved I/O of profile 0, found none"),
])
def test_cpp_host_contract_errors_are_one_line(edit, message, host_program, artifacts_fp32, tmp_path):
    artifacts = tmp_path / "artifacts"
    shutil.copytree(artifacts_fp32[0], artifacts)
    manifest = json.loads((artifacts / "manifest.json").read_text())
    edit(manifest)
    (artifacts / "manifest.json").write_text(json.dumps(manifest))
    recording = tmp_path / "rec"
    recording.mkdir()
    (recording / "recording.json").write_text(json.dumps(dict(
        network="unet", step_graph="unet_step", steps=50, files={},
        rows=[dict(scheduler="decoder", num_inference_steps=50, start=0, guidance_scale=4.0)])))
    done = _replay(host_program, artifacts, recording)
    assert done.returncode == 2
    assert message in done.stderr and done.stderr.count("\n") == 1, done.stderr


def test_cpp_host_picks_the_profile_of_a_multi_profile_set(host_program, artifacts_fp32_multi, tmp_path):
    """Two rows at 64x128 (height x width) run at the batch-2 profile of that size: the host picks
    it by --size WIDTHxHEIGHT and --batch and replays the loop on its shapes."""
    artifacts = artifacts_fp32_multi[0]
    with Components(artifacts) as components:
        recorder = _Recording(components, "unet", "unet_step")
        KandinskyPipeline(components=components)(["a castle", "a boat"], _emb(1, 2), _emb(2, 2), height=64, width=128,
                                                 num_inference_steps=50, guidance_scale=4.0, generator=0)
    record = dict(network="unet", step_graph="unet_step", scheduler="decoder", num_inference_steps=50,
                  guidance_scale=4.0)
    rec = recorder.write(tmp_path / "rec", record, "noise_pred")
    done = _replay(host_program, artifacts, rec, "--size", "128x64", "--batch", "2")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "4 profile(s), serving profile 3: batch 2 128x64" in done.stdout
    assert "bind unet_step          input  latents        float32 [2,4,8,16]" in done.stdout
    assert done.stdout.strip().endswith("ok"), done.stdout
    refused = _replay(host_program, artifacts, rec, "--size", "192x64")
    assert refused.returncode == 2 and "profile: expected one of the manifest's profiles (b1 64x64, b2 64x64, " \
        "b1 128x64, b2 128x64), found none of batch 0 at 192x64" in refused.stderr, refused.stderr


def test_cpp_host_names_a_missing_table(host_program, artifacts_fp32, tmp_path):
    recording = tmp_path / "rec"
    recording.mkdir()
    (recording / "recording.json").write_text(json.dumps(dict(
        network="unet", step_graph="unet_step", steps=7, files={},
        rows=[dict(scheduler="decoder", num_inference_steps=7, start=0, guidance_scale=4.0)])))
    done = _replay(host_program, artifacts_fp32[0], recording)
    assert done.returncode == 2
    assert "schedulers.decoder.tables: expected a table for 7 steps, found tables for 100 50" in done.stderr


def test_cpp_host_refuses_a_flipped_byte(host_program, artifacts_fp32, tmp_path):
    """Same size, other bytes: the host's own sha256 catches what the manifest's `files` records say."""
    artifacts = tmp_path / "artifacts"
    shutil.copytree(artifacts_fp32[0], artifacts)
    constant = artifacts / json.loads((artifacts / "manifest.json").read_text())["constants"][0]["file"]
    data = bytearray(constant.read_bytes())
    data[0] ^= 0xFF
    constant.write_bytes(bytes(data))
    done = _replay(host_program, artifacts, tmp_path)
    assert done.returncode == 2 and "does not match the sha256 in the manifest" in done.stderr, done.stderr


# (scheduler table, its step count, position of the first replayed step, guidance) per latents row
ROWS_AT_DIFFERENT_STEPS = (
    ("decoder", 50, 10, 1.0),  # DDIM, guidance 1
    ("decoder_ddpm", 100, 40, 5.0),  # DDPM: learned variance, noise on its stochastic steps
)


def _rows_at_different_steps(artifacts: Path, steps: int, seed: int = 0) -> tuple[dict, dict]:
    """Runs the exported unet_step (ONNX Runtime) for ``steps`` calls whose rows follow
    ROWS_AT_DIFFERENT_STEPS, from random latents and a non-zero x0; returns (record, arrays)."""
    ort = pytest.importorskip("onnxruntime")
    manifest = json.loads((artifacts / "manifest.json").read_text())
    entry = next(n for n in manifest["networks"] if n["name"] == "unet_step")
    shapes = {t["name"]: t["shape"] for t in entry["profiles"][0]["inputs"]}
    session = ort.InferenceSession(str(artifacts / entry["onnx"]), providers=["CPUExecutionProvider"])
    tables = [SchedulerTable.from_manifest(manifest["schedulers"][name]["tables"][str(n)])
              for name, n, _, _ in ROWS_AT_DIFFERENT_STEPS]
    starts = [start for _, _, start, _ in ROWS_AT_DIFFERENT_STEPS]
    guidance = np.array([[g] for *_, g in ROWS_AT_DIFFERENT_STEPS], np.float32)
    rng = np.random.default_rng(seed)
    x, x0 = (rng.standard_normal(shapes["latents"]).astype(np.float32) for _ in range(2))
    arrays = {"latents": x, "x0_prev": x0, "model_outputs": [], "noise": [], "expected": [], "expected_x0": []}
    for i in range(steps):
        out = rng.standard_normal(shapes["model_output"]).astype(np.float32)
        out[:, 4:] = np.tanh(out[:, 4:])  # learned variance in [-1, 1]
        noise = np.zeros(shapes["noise"], np.float32)
        for b, (table, start) in enumerate(zip(tables, starts)):
            if table.stochastic[start + i]:
                noise[b] = rng.standard_normal(noise.shape[1:])
        coefficients = np.stack([table.coefficients[start + i] for table, start in zip(tables, starts)])
        feeds = dict(latents=x, model_output=out, coefficients=coefficients, noise=noise, guidance_scale=guidance,
                     x0_prev=x0)
        reference = apply_step(coefficients, x, out, noise, guidance, x0, cfg=True)  # the numpy reference
        x, x0 = session.run(["latents_next", "x0"], feeds)
        np.testing.assert_allclose(x, reference[0], rtol=1e-6, atol=1e-6)
        for name, array in (("model_outputs", out), ("noise", noise), ("expected", x), ("expected_x0", x0)):
            arrays[name].append(array)
    rows = [dict(scheduler=name, num_inference_steps=n, start=start, guidance_scale=g)
            for name, n, start, g in ROWS_AT_DIFFERENT_STEPS]
    record = dict(network="unet", step_graph="unet_step", steps=steps, rows=rows)
    return record, {k: np.stack(v) if isinstance(v, list) else v for k, v in arrays.items()}


def test_cpp_host_replays_rows_at_different_steps(host_program, artifacts_fp32_b2_wide, tmp_path):
    """The per-row contract in the C++ host: every step-graph call has its two rows at different steps
    of different tables (DDIM from row 10 at guidance 1, DDPM from row 40 at guidance 5, with noise and
    learned variance) and starts from a non-zero x0. The exported step graph (ONNX Runtime) makes the
    expected latents, checked against apply_step; the host replays each row from its own table to
    1e-6, and fails when the rows' positions or guidance scales are swapped."""
    artifacts = artifacts_fp32_b2_wide[0]
    record, arrays = _rows_at_different_steps(artifacts, steps=6)
    done = _replay(host_program, artifacts, write_recording(tmp_path / "rec", record, arrays))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1].startswith("replayed 6 steps of unet_step"), done.stdout
    assert done.stdout.strip().endswith("ok"), done.stdout
    for name, swap in (("starts", "start"), ("guidance", "guidance_scale")):
        rows = [dict(row) for row in record["rows"]]
        rows[0][swap], rows[1][swap] = rows[1][swap], rows[0][swap]  # positions stay in range: 40 + 6 <= 50
        wrong = write_recording(tmp_path / f"wrong-{name}", {**record, "rows": rows}, arrays)
        done = _replay(host_program, artifacts, wrong)
        assert done.returncode == 1 and done.stdout.strip().endswith("FAIL"), (name, done.stdout + done.stderr)
