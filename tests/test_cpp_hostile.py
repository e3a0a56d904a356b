"""The C++ host reads hostile manifests and recordings safely (issue 18 §2).

runtime/cpp is built with AddressSanitizer + UndefinedBehaviorSanitizer (any report aborts) and run
on a small hand-made artifacts set (tests/cpp_helpers.py) edited one field at a time: each
reproduction of the issue, and its family, must be refused with exit status 2 and one line on
stderr that names the field, with no sanitizer report and no hang (every run has a timeout).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from cpp_helpers import build, manifest_dict, write_artifacts, write_recording

SANITIZER_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:exitcode=86",
                 "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=87"}


@pytest.fixture(scope="module")
def sanitized_host(tmp_path_factory) -> Path:
    # Debug (-O0): about half the compile time of an optimized build; the runs here are tiny.
    return build(tmp_path_factory.mktemp("cpp-asan"), "g++", "-DKTRT_SANITIZE=ON", build_type="Debug") / "ktrt_host_contract"


def run_host(program: Path, artifacts: Path, recording: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    done = subprocess.run([str(program), str(artifacts), str(recording)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **SANITIZER_ENV})
    for marker in ("Sanitizer", "runtime error:"):
        assert marker not in done.stderr, done.stderr
    return done


def assert_refused(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: "), done.stderr
    for fragment in fragments:
        assert fragment in done.stderr, done.stderr
    if not fragments[0].startswith("recording"):  # a manifest error is never blamed on the recording
        assert not done.stderr.startswith("error: recording"), done.stderr


@pytest.fixture
def case(tmp_path, sanitized_host):
    """A valid artifacts set and recording; `case.run(edit)` applies `edit(manifest)` first."""
    class Case:
        artifacts, recording = tmp_path / "artifacts", write_recording(tmp_path / "rec")
        manifest = write_artifacts(tmp_path / "artifacts")

        def run(self, edit=None, text: str | None = None) -> subprocess.CompletedProcess:
            if edit is not None:
                edit(self.manifest)
            if edit is not None or text is not None:
                (self.artifacts / "manifest.json").write_text(text if text is not None else json.dumps(self.manifest))
            return run_host(sanitized_host, self.artifacts, self.recording)
    return Case()


def test_the_hand_made_set_replays(case):
    done = case.run()
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().endswith("ok") and "per step 0.000e+00" in done.stdout, done.stdout


def _step_input(m: dict, name: str) -> dict:
    return next(t for t in m["networks"][1]["profiles"][0]["inputs"] if t["name"] == name)


@pytest.mark.parametrize("shape, fragment", [
    ([2305843009213693953, 4, 8, 8], "unet_step.profiles[0].inputs[0].shape[0]: expected an integer in [1, 2147483647]"),
    ([2147483647, 2147483647, 2147483647, 8], "unet_step.profiles[0].inputs[0].shape: expected a size of at most"),
    ([1, 4, 8, 1.5], "inputs[0].shape[3]: expected an integer in [1, 2147483647], found a non-integer number 1.5"),
    ([1, 4, 8, 8.0], "inputs[0].shape[3]: expected an integer"),
    ([1, 4, 0, 8], "inputs[0].shape[2]: expected an integer in [1, 2147483647], found an integer 0"),
    ([1, -4, 8, 8], "inputs[0].shape[1]"),
    ([1, 4, 8, "8"], "inputs[0].shape[3]: expected an integer"),
    ([1, 4, 8, 8, 1, 1, 1, 1, 1], "inputs[0].shape: expected at most 8 dims"),
    ([18446744073709551615, 4, 8, 8], "inputs[0].shape[0]: expected an integer"),
])
def test_step_graph_shapes_are_checked(case, shape, fragment):
    assert_refused(case.run(lambda m: _step_input(m, "latents").update(shape=shape)), fragment)


@pytest.mark.parametrize("latents, output", [
    ([1, 4, 8, 8], [2, 5, 8, 8]),   # the issue's: out channels neither 4 nor 8
    ([1, 4, 8, 8], [4, 8, 8, 8]),   # rows: not 2 x batch
    ([1, 4, 8, 8], [2, 8, 8, 16]),  # spatial dims differ
    ([1, 4, 8, 8], [2, 8, 64]),     # rank differs
    ([2, 4, 8, 8], [2, 8, 8, 8]),
])
def test_model_output_must_match_the_latents(case, latents, output):
    def edit(m):
        _step_input(m, "latents").update(shape=latents)
        _step_input(m, "model_output").update(shape=output)
    assert_refused(case.run(edit), "unet_step.inputs.model_output: expected")


@pytest.mark.parametrize("name, shape, fragment", [
    ("coefficients", [12], "unet_step.inputs.coefficients: expected float32[1,12] (one row per latents row), "
                           "found float32[12]"),  # what schema 3 had
    ("coefficients", [2, 12], "found float32[2,12]"),
    ("guidance_scale", [1], "unet_step.inputs.guidance_scale: expected float32[1,1] (one row per latents row), "
                            "found float32[1]"),
])
def test_per_row_step_inputs_are_checked(case, name, shape, fragment):
    assert_refused(case.run(lambda m: _step_input(m, name).update(shape=shape)), fragment)


@pytest.mark.parametrize("where", ["precision", "files", "root"])
def test_deep_nesting_is_refused_before_parsing(case, where):
    deep = "[" * 100000 + "]" * 100000
    text = json.dumps(case.manifest)
    text = deep if where == "root" else text.replace(f'"{where}": ', f'"{where}": {deep}, "_{where}": ', 1)
    assert_refused(case.run(text=text), "manifest: expected JSON nested at most 64 deep")


def test_deep_nesting_inside_strings_is_not_nesting(case):
    """Brackets inside strings do not count (a precision string full of '[')."""
    assert_refused(case.run(lambda m: m.update(precision="[" * 100000, schema_version=2)),
                   "manifest.schema_version: expected 4, found 2")


@pytest.mark.parametrize("value", ["4.5", "3.999", "4e0", "4.0", '"4"', "true", "null", "[4]",
                                   "18446744073709551615", "1e400"])
def test_schema_version_must_be_the_integer_4(case, value):
    text = json.dumps(case.manifest).replace('"schema_version": 4', f'"schema_version": {value}')
    done = case.run(text=text)
    if value == "1e400":  # nlohmann refuses numbers beyond double at parse time
        assert_refused(done, "manifest: expected JSON, found a parse error")
    else:
        assert_refused(done, "manifest.schema_version: expected an integer")


@pytest.mark.parametrize("field, value", [
    ("batch", 0), ("batch", -1), ("batch", 1.5), ("batch", 1.0), ("height", 0), ("height", -64),
    ("width", 64.5), ("width", 9223372036854775807), ("cfg", 1),
])
def test_profiles_are_checked(case, field, value):
    assert_refused(case.run(lambda m: m["profiles"][0].update({field: value})), f"profiles[0].{field}: expected")


@pytest.mark.parametrize("shape, fragment", [
    ([-1, -32], "constants[0].shape[0]: expected an integer in [1, 2147483647], found an integer -1"),
    ([4611686018427387905, 32], "constants[0].shape[0]: expected an integer"),
    ([2147483647, 2147483647, 2147483647], "constants[0].shape: expected a size of at most"),
    ([1, 32.5], "constants[0].shape[1]"),
])
def test_constant_shapes_are_checked(case, shape, fragment):
    assert_refused(case.run(lambda m: m["constants"][0].update(shape=shape)), fragment)


@pytest.mark.parametrize("size, fragment", [
    (-1, "files.tokenizer.json.size: expected an integer in [0, "),
    (13.0, "files.tokenizer.json.size: expected an integer"),
    (18446744073709551615, "files.tokenizer.json.size: expected an integer"),
    (14, "files.tokenizer.json: tokenizer.json has 13 bytes, the manifest records 14"),
])
def test_file_sizes_are_checked(case, size, fragment):
    assert_refused(case.run(lambda m: m["files"]["tokenizer.json"].update(size=size)), fragment)


def _replace_file(case, name: str, make) -> subprocess.CompletedProcess:
    path = case.artifacts / name
    path.unlink()
    make(path)
    return case.run()


def test_a_symlink_out_of_the_directory_is_refused(case):
    """Symlinks are refused altogether (O_NOFOLLOW on every component), even with a matching record."""
    passwd = Path("/etc/passwd").read_bytes()
    case.manifest["files"]["tokenizer.json"] = {"size": len(passwd), "sha256": hashlib.sha256(passwd).hexdigest()}
    (case.artifacts / "manifest.json").write_text(json.dumps(case.manifest))
    done = _replace_file(case, "tokenizer.json", lambda p: p.symlink_to("/etc/passwd"))
    assert_refused(done, "files.tokenizer.json: expected a regular file", "symlinks are refused")


def test_a_symlink_inside_the_directory_is_refused_too(case):
    (case.artifacts / "real.json").write_bytes(b'{"model": {}}')
    done = _replace_file(case, "tokenizer.json", lambda p: p.symlink_to("real.json"))
    assert_refused(done, "files.tokenizer.json: expected a regular file", "symlinks are refused")


def test_a_symlinked_subdirectory_is_refused(case, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_bytes(b'{"model": {}}')
    (case.artifacts / "sub").symlink_to(outside)
    rec = case.manifest["files"].pop("tokenizer.json")
    case.manifest["files"]["sub/tokenizer.json"] = rec
    case.manifest["tokenizers"]["decoder"]["file"] = "sub/tokenizer.json"
    assert_refused(case.run(lambda m: None), "files.sub/tokenizer.json: expected a regular file", "symlink")


def test_a_directory_in_place_of_a_file_is_refused(case):
    assert_refused(_replace_file(case, "unet.onnx", lambda p: p.mkdir()),
                   "files.unet.onnx: expected a regular file", "found a directory")


def test_a_symlink_to_dev_zero_does_not_hang(case):
    assert_refused(_replace_file(case, "unet.onnx", lambda p: p.symlink_to("/dev/zero")),
                   "files.unet.onnx: expected a regular file")


def test_a_fifo_does_not_hang(case):
    assert_refused(_replace_file(case, "unet.onnx", lambda p: os.mkfifo(p)),
                   "files.unet.onnx: expected a regular file", "found a FIFO")


def test_a_fifo_as_manifest_does_not_hang(case):
    assert_refused(_replace_file(case, "manifest.json", lambda p: os.mkfifo(p)),
                   "manifest: expected a regular file", "found a FIFO")


@pytest.mark.parametrize("name", ["../x", "/etc/passwd", "a/../../x", "", "./unet.onnx", "a//b", "a\\b"])
def test_file_names_stay_inside(case, name):
    assert_refused(case.run(lambda m: m["networks"][0].update(onnx=name)),
                   "unet.onnx: expected a file name inside the artifacts directory")


def _table(m: dict) -> dict:
    return m["schedulers"]["decoder"]["tables"]["2"]


@pytest.mark.parametrize("value", [1e300, -1e39, 3.5e38])
def test_coefficients_beyond_float32_are_refused(case, value):
    """1e300 would become inf in float32 and the latents NaN."""
    assert_refused(case.run(lambda m: _table(m)["coefficients"][0].__setitem__(4, value)),
                   'schedulers.decoder.tables["2"].coefficients[0][4]: expected a finite float32 number')


@pytest.mark.parametrize("edit, fragment", [
    (lambda t: t.update(init_noise_sigma=1e300), ".init_noise_sigma: expected a finite float32"),
    (lambda t: t["coefficients"][1].__setitem__(0, "1"), ".coefficients[1][0]: expected a finite float32"),
    (lambda t: t["coefficients"][1].pop(), ".coefficients[1]: expected a row of 12, found a row of 11"),
    (lambda t: t["timesteps"].__setitem__(0, 2.5), ".timesteps[0]: expected an integer"),
    (lambda t: t["stochastic"].__setitem__(0, 0), ".stochastic[0]: expected true or false"),
    (lambda t: t.update(num_inference_steps=3), ".num_inference_steps: expected an integer in [2, 2]"),
    (lambda t: t["timesteps"].append(1), 'tables["2"]: expected 2 timesteps, coefficient rows and stochastic flags'),
    (lambda t: t.update(columns=[[[1]]]), ".columns: expected the 12 step-graph columns"),
])
def test_tables_are_checked(case, edit, fragment):
    assert_refused(case.run(lambda m: edit(_table(m))), 'schedulers.decoder.tables["2"]', fragment)


def test_values_that_overflow_in_the_replay_fail(case):
    """Finite coefficients whose products overflow float32 give Inf/NaN latents: exit 1, never 'ok'."""
    done = case.run(lambda m: _table(m)["coefficients"][0].__setitem__(5, 3.0e38))
    assert done.returncode == 1, done.stdout + done.stderr
    assert "non-finite values" in done.stdout and done.stdout.strip().endswith("FAIL"), done.stdout


def test_a_nan_in_the_recording_fails(case):
    expected = np.fromfile(case.recording / "expected.f32", "<f4")
    expected[5] = np.nan
    expected.tofile(case.recording / "expected.f32")
    done = case.run()
    assert done.returncode == 1 and done.stdout.strip().endswith("FAIL"), done.stdout
    assert "per step nan" in done.stdout, done.stdout


def test_a_non_finite_constant_is_refused(case):
    data = np.linspace(-1, 1, 32, dtype="<f4")
    data[3] = np.inf
    (case.artifacts / "zero.f32.bin").write_bytes(data.tobytes())
    digest = hashlib.sha256(data.tobytes()).hexdigest()
    case.manifest["constants"][0]["sha256"] = digest
    case.manifest["files"]["zero.f32.bin"]["sha256"] = digest
    assert_refused(case.run(lambda m: None), "constants.zero_image_embeds: expected finite float32 values")


@pytest.mark.parametrize("edit, fragment", [
    (lambda r: r["rows"][0].update(num_inference_steps=2.5), "recording.rows[0].num_inference_steps: expected an integer"),
    (lambda r: r["rows"][0].update(guidance_scale=1e300), "recording.rows[0].guidance_scale: expected a finite float32"),
    (lambda r: r["rows"][0].update(guidance_scale="4"), "recording.rows[0].guidance_scale: expected a finite float32"),
    (lambda r: r["rows"][0].update(start=-1), "recording.rows[0].start: expected an integer in [0, 100000]"),
    (lambda r: r["rows"][0].update(start=1), "recording.rows[0].start: expected start + steps <= 2 (the rows of "
                                             "table decoder 2), found 1 + 2"),
    (lambda r: r["rows"][0].update(start=2 ** 63 - 1), "recording.rows[0].start: expected an integer in [0, 100000]"),
    (lambda r: r.update(steps=0), "recording.steps: expected an integer in [1, 100000]"),
    (lambda r: r.update(steps=2 ** 62 + 1), "recording.steps: expected an integer in [1, 100000]"),
    (lambda r: r.update(rows=[]), "recording.rows: expected 1 to 65536 rows, found 0"),
    (lambda r: r.update(rows=r["rows"] * 2), "recording.rows: expected 1 rows (one per latents row of unet_step), "
                                             "found 2"),
    (lambda r: r.update(rows=[1]), "recording.rows[0]: expected an object"),
    (lambda r: r["rows"][0].pop("scheduler"), "recording.rows[0].scheduler: expected the field, found none"),
    (lambda r: r["rows"][0].update(scheduler="prior"), "schedulers.prior"),
    (lambda r: r.update(step_graph=["unet_step"]), "recording.step_graph: expected a string"),
    (lambda r: r["files"].update(noise="../artifacts/unet.onnx"), "recording.files.noise: expected a file name inside"),
    (lambda r: r["files"].update(noise="latents.f32"), "recording.files.noise: expected 2048 bytes of float32, found 1024"),
    (lambda r: r.update(files=[1]), "recording.files: expected an object"),
])
def test_recording_errors_name_the_recording_field(case, edit, fragment):
    record = json.loads((case.recording / "recording.json").read_text())
    edit(record)
    (case.recording / "recording.json").write_text(json.dumps(record))
    assert_refused(case.run(), fragment)


def test_control_characters_in_names_keep_the_error_one_line(case):
    rec = case.manifest["files"].pop("tokenizer.json")
    case.manifest["files"]["evil\nname\r.json"] = dict(rec, size=-5)
    assert_refused(case.run(lambda m: None), "files.evil?name?.json.size: expected an integer in [0, ")


def test_manifest_errors_are_not_blamed_on_the_recording(case):
    done = case.run(lambda m: m["networks"][1]["profiles"][0].update(inputs={"latents": 1}))
    assert_refused(done, "unet_step.profiles[0].inputs: expected an array, found an object")


def test_a_symlinked_recording_file_is_refused(case):
    (case.recording / "noise.f32").unlink()
    (case.recording / "noise.f32").symlink_to("/dev/zero")
    assert_refused(case.run(), "recording.files.noise: expected a regular file", "symlinks are refused")


def test_deep_nesting_in_the_recording_is_refused(case):
    (case.recording / "recording.json").write_text("[" * 100000 + "]" * 100000)
    assert_refused(case.run(), "recording: expected JSON nested at most 64 deep")
